"""Anomalous-frame captures on disk: frame PNG, heatmap overlay PNG and header JSON.

Each capture is written into a temporary folder and renamed into place, so a capture is
either complete or absent (SIGTERM mid-write leaves nothing half-written). Only the newest
``retain`` captures are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np


class CaptureStore:
    def __init__(self, folder: str | Path = "captures", retain: int = 200) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retain = retain
        for leftover in self.folder.glob(".tmp-*"):  # from a process killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, camera: str, seq: int, frame: np.ndarray, heatmap: np.ndarray, header: dict) -> Path:
        name = f"{header.get('t_capture_ns', 0):020d}-{camera}-{seq:08d}"
        tmp = self.folder / f".tmp-{name}"
        tmp.mkdir(exist_ok=True)
        bgr = np.ascontiguousarray(frame[..., ::-1])
        cv2.imwrite(str(tmp / "frame.png"), bgr)
        heat = cv2.resize(heatmap.astype(np.float32), bgr.shape[1::-1])
        scale = max(float(heat.max()), 1e-12)
        colour = cv2.applyColorMap(np.uint8(255 * np.clip(heat / scale, 0, 1)), cv2.COLORMAP_JET)
        cv2.imwrite(str(tmp / "overlay.png"), cv2.addWeighted(bgr, 0.55, colour, 0.45, 0))
        (tmp / "header.json").write_text(json.dumps(header, indent=2))
        final = self.folder / name
        tmp.rename(final)
        self._prune()
        return final

    def _prune(self) -> None:
        kept = sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in kept[: max(0, len(kept) - self.retain)]:
            shutil.rmtree(old, ignore_errors=True)
