"""The picture an operator reads: the part as it is, the part under its heatmap, a colour bar,
and a header with score, threshold and verdict (``predict`` overlays and captures).

The part is drawn twice, plain and blended at 45 % with the heatmap, so a defect's look is
never hidden under the colours. The colour scale runs from the map's minimum to its
maximum and the bar names both ends. OpenCV only (no torch, no matplotlib).
"""

from __future__ import annotations

import cv2
import numpy as np

HEADER_PX = 28
BAR_PX = 18
GREEN, RED, GREY = (40, 160, 40), (30, 30, 220), (110, 110, 110)  # BGR


def verdict_text(score: float, threshold: float | None, label: bool | None) -> tuple[str, tuple]:
    """``"score 0.734 > 0.612 threshold: ANOMALOUS"`` and its colour (BGR)."""
    if threshold is None or label is None:
        return f"score {score:.4g} (no threshold: not calibrated)", GREY
    sign, word, colour = (">", "ANOMALOUS", RED) if label else ("<=", "normal", GREEN)
    return f"score {score:.4g} {sign} {threshold:.4g} threshold: {word}", colour


def render_overlay(frame: np.ndarray, heatmap: np.ndarray, score: float,
                   threshold: float | None, label: bool | None, title: str = "") -> np.ndarray:
    """``frame (H, W, 3)`` uint8 RGB and ``heatmap (h, w)`` -> a BGR picture (for cv2.imwrite):
    header (title, verdict), then the frame and the blended heatmap side by side, then a bar."""
    bgr = np.ascontiguousarray(frame[..., ::-1])
    h, w = bgr.shape[:2]
    heat = cv2.resize(np.nan_to_num(heatmap.astype(np.float32)), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(heat.min()), float(heat.max())
    unit = np.uint8(255 * np.clip((heat - lo) / max(hi - lo, 1e-12), 0, 1))
    blend = cv2.addWeighted(bgr, 0.55, cv2.applyColorMap(unit, cv2.COLORMAP_JET), 0.45, 0)
    body = np.concatenate([bgr, np.full((h, 4, 3), 255, np.uint8), blend], axis=1)
    width = body.shape[1]
    scale = max(0.35, min(0.6, width / 900))
    text, colour = verdict_text(score, threshold, label)
    header = np.full((HEADER_PX, width, 3), 255, np.uint8)
    cv2.putText(header, f"{title}  {text}" if title else text, (4, HEADER_PX - 9),
                cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    ramp = np.uint8(np.linspace(0, 255, width))[None, :].repeat(BAR_PX, axis=0)
    bar = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    legend = np.full((BAR_PX, width, 3), 255, np.uint8)
    cv2.putText(legend, f"map {lo:.3g}", (2, BAR_PX - 5), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8,
                (0, 0, 0), 1, cv2.LINE_AA)
    right = f"{hi:.3g}"
    (tw, _), _ = cv2.getTextSize(right, cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8, 1)
    cv2.putText(legend, right, (width - tw - 2, BAR_PX - 5), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, body, bar, legend], axis=0)
