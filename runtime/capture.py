r"""Anomalous-frame captures on disk: frame PNG, heatmap overlay PNG and header JSON.

Each capture is written into a temporary folder and renamed into place, so a capture is
either complete or absent (SIGTERM mid-write leaves nothing half-written). Only the newest
``retain`` captures are kept. The pipeline :meth:`~CaptureStore.submit`\ s captures to a
writer thread, so PNG encoding stays off the per-frame path; when the writer falls
``queue_size`` captures behind, new ones are skipped (and logged) instead of stalling
inference.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class CaptureStore:
    def __init__(self, folder: str | Path = "captures", retain: int = 200, queue_size: int = 32) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retain = retain
        for leftover in self.folder.glob(".tmp-*"):  # from a process killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        self.pending: queue.Queue = queue.Queue(maxsize=queue_size)
        self.writer = threading.Thread(target=self._write_loop, name="captures", daemon=True)
        self.writer.start()

    def submit(self, camera: str, seq: int, frame: np.ndarray, heatmap: np.ndarray,
               header: dict) -> bool:
        """Queue a capture for the writer thread; False (skipped) when it is too far behind."""
        try:
            self.pending.put_nowait((camera, seq, frame, heatmap, header))
            return True
        except queue.Full:
            log.warning("capture of %s seq %d skipped: the writer is %d behind", camera, seq,
                        self.pending.maxsize)
            return False

    def flush(self) -> None:
        """Wait until every submitted capture is on disk."""
        self.pending.join()

    def _write_loop(self) -> None:
        while True:
            item = self.pending.get()
            try:
                self.save(*item)
            except OSError as exc:  # a full disk must not stop the writer
                log.error("capture not written: %s", exc)
            finally:
                self.pending.task_done()

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
