"""Pictures of an evaluation: ROC curves, score histograms, heatmap overlays (PNG)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_inspect.trainer.metrics import roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:
    """One ROC curve per class: ``{class: (labels, scores, auroc)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for name, (labels, scores, area) in curves.items():
        if labels.min() == labels.max():
            continue
        fpr, tpr = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} ({area:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right", title="class (image AUROC)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(path: Path, per_class: dict[str, tuple[np.ndarray, np.ndarray, float | None]],
                    title: str) -> None:
    """Normal vs anomalous image scores per class, with the calibrated threshold if any."""
    plt = _pyplot()
    n = len(per_class)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, (labels, scores, threshold)) in zip(axes.flat, per_class.items(), strict=False):
        bins = np.linspace(scores.min(), scores.max() + 1e-12, 30)
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", color="tab:blue")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous", color="tab:red")
        if threshold is not None:
            ax.axvline(threshold, color="k", lw=1, ls="--", label="threshold")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("image score", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay(picture: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, vmax: float,
            caption: str) -> np.ndarray:
    """``[image | heatmap overlay]`` in BGR with the true defect outlined in green."""
    bgr = np.ascontiguousarray(picture[..., ::-1])
    if bgr.shape[1] < 256:  # small inputs: enlarge so the caption and the map are readable
        f = 256 / bgr.shape[1]
        bgr = cv2.resize(bgr, (256, round(bgr.shape[0] * f)), interpolation=cv2.INTER_NEAREST)
        mask = None if mask is None else cv2.resize(mask.astype(np.uint8), bgr.shape[1::-1],
                                                    interpolation=cv2.INTER_NEAREST)
    heat = np.uint8(255 * np.clip(amap / max(vmax, 1e-12), 0, 1))
    heat = cv2.applyColorMap(cv2.resize(heat, bgr.shape[1::-1]), cv2.COLORMAP_JET)
    mixed = cv2.addWeighted(bgr, 0.55, heat, 0.45, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(mixed, contours, -1, (0, 255, 0), 1)
    tile = np.hstack([bgr, mixed])
    band = np.full((22, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(band, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, tile])


def save_sheet(path: Path, tiles: list[np.ndarray]) -> None:
    """Stack overlay tiles vertically (resized to a common width) into one PNG."""
    if not tiles:
        return
    width = min(t.shape[1] for t in tiles)
    rows = [cv2.resize(t, (width, round(t.shape[0] * width / t.shape[1]))) for t in tiles]
    cv2.imwrite(str(path), np.vstack(rows))


def plot_loss(path: Path, log_file: Path, title: str) -> None:
    """Total loss (and its parts) against the step, one panel per phase, from
    ``train_log.jsonl``; a line per logged record."""
    import json

    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not records:
        return
    phases = list(dict.fromkeys(r["phase"] for r in records))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.2), squeeze=False)
    skip = {"phase", "step", "seconds", "lr"}
    for ax, phase in zip(axes.flat, phases, strict=True):
        rows = [r for r in records if r["phase"] == phase]
        steps = [r["step"] for r in rows]
        for key in [k for k in rows[0] if k not in skip]:
            ax.plot(steps, [r.get(key) for r in rows], lw=1.6 if key == "loss" else 1.0,
                    label=key, color="k" if key == "loss" else None)
        ax.set(xlabel="step", title=phase)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
