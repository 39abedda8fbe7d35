r"""Anomalous-frame captures on disk: frame PNG, overlay PNG (the part, the part under its
heatmap, a colour bar, score / threshold / verdict: :mod:`runtime.overlay`) and header JSON
(with the source's image name when the camera replays files; and for RGB-D frames each
geometry plane as ``<plane>.tiff``, float32 as received, with a ``<plane>.png`` depth
preview: z min-max over the valid points, nearer brighter, missing black).

Captures live in one folder per camera, ``<folder>/<camera>/<UTC time>-<camera>-<seq>/``
(e.g. ``20261123T215020.123456Z-line1-00000042``), named by the runtime's own wall clock
when the result was submitted (never by the sender's ``t_capture_ns``, which a sender could
set to the far future and so evict every real capture); the newest ``retain`` are kept per
camera, so no camera evicts another's. Each
capture is written into a temporary folder and renamed into place, so a capture is either
complete or absent (SIGTERM mid-write leaves nothing half-written). The pipeline
:meth:`~CaptureStore.submit`\ s captures to a writer thread, so PNG encoding stays off the
per-frame path; when the writer falls ``queue_size`` captures behind, new ones are skipped
and counted (``skipped``, logged at most once a minute) instead of stalling inference.
Captures are readable by the group (files 0640, folders 0750).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

from edge_inspect.runtime.logs import ThrottledLog
from edge_inspect.runtime.overlay import render_overlay

log = logging.getLogger(__name__)


class CaptureStore:
    def __init__(self, folder: str | Path = "captures", retain: int = 200, queue_size: int = 32,
                 on_skip=None) -> None:
        """``on_skip(camera)``: called for every capture skipped because the writer is behind
        (the runtime counts them in a metric)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retain = retain
        for leftover in self.folder.glob("**/.tmp-*"):  # from a process killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        self.pending: queue.Queue = queue.Queue(maxsize=queue_size)
        self.skipped = 0
        self.on_skip = on_skip
        self.skip_log = ThrottledLog(log, every_s=60.0)
        self.writer = threading.Thread(target=self._write_loop, name="captures", daemon=True)
        self.writer.start()

    def submit(self, camera: str, seq: int, frame: np.ndarray, heatmap: np.ndarray,
               header: dict, geometry: dict[str, np.ndarray] | None = None) -> str | None:
        """Queue a capture for the writer thread; its folder name (under the camera's folder),
        or None (skipped, counted) when the writer is too far behind."""
        received_ns = time.time_ns()
        try:
            self.pending.put_nowait((camera, seq, frame, heatmap, header, received_ns, geometry))
            return capture_name(camera, seq, received_ns)
        except queue.Full:
            self.skipped += 1
            if self.on_skip is not None:
                self.on_skip(camera)
            self.skip_log.warning("skip", "capture of %s seq %d skipped: the writer is %d behind "
                                  "(a slow disk?)", camera, seq, self.pending.maxsize)
            return None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted capture is on disk (at most ``timeout_s``: a hung disk
        must not hold up a shutdown); False when some were still pending."""
        if timeout_s is None:
            self.pending.join()
            return True
        deadline = time.monotonic() + timeout_s
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.pending.unfinished_tasks:
            log.error("%d captures not written within %.1f s of stopping (a slow disk?)",
                      self.pending.unfinished_tasks, timeout_s)
            return False
        return True

    def _write_loop(self) -> None:
        while True:
            item = self.pending.get()
            try:
                self.save(*item)
            except OSError as exc:  # a full disk must not stop the writer
                log.error("capture not written: %s", exc)
            finally:
                self.pending.task_done()

    def save(self, camera: str, seq: int, frame: np.ndarray, heatmap: np.ndarray, header: dict,
             received_ns: int | None = None, geometry: dict[str, np.ndarray] | None = None) -> Path:
        received_ns = time.time_ns() if received_ns is None else received_ns
        folder = self.folder / camera
        folder.mkdir(mode=0o750, exist_ok=True)
        name = capture_name(camera, seq, received_ns)
        tmp = folder / f".tmp-{name}"
        tmp.mkdir(mode=0o750, exist_ok=True)
        bgr = np.ascontiguousarray(frame[..., ::-1])
        cv2.imwrite(str(tmp / "frame.png"), bgr)
        label = header.get("label")
        title = f"{camera} #{seq}" + (f" {header['source']}" if header.get("source") else "")
        picture = render_overlay(frame, heatmap, float(header.get("score", float("nan"))),
                                 header.get("threshold"), None if label is None else bool(label), title)
        cv2.imwrite(str(tmp / "overlay.png"), picture)
        for plane_name, plane in (geometry or {}).items():
            tifffile.imwrite(tmp / f"{plane_name}.tiff", np.ascontiguousarray(plane, np.float32),
                             photometric="rgb" if plane.shape[-1] == 3 else "minisblack")
            cv2.imwrite(str(tmp / f"{plane_name}.png"), depth_preview(plane))
        (tmp / "header.json").write_text(json.dumps({**header, "received_unix_ns": received_ns}, indent=2))
        for f in tmp.iterdir():
            os.chmod(f, 0o640)
        final = folder / name
        tmp.rename(final)
        self._prune(folder)
        return final

    def _prune(self, folder: Path) -> None:
        """Keep the newest ``retain`` captures of one camera (names sort by the runtime's clock)."""
        kept = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in kept[: max(0, len(kept) - self.retain)]:
            shutil.rmtree(old, ignore_errors=True)


def capture_name(camera: str, seq: int, received_ns: int) -> str:
    """A capture's folder name: ``<UTC time>-<camera>-<seq>``."""
    return f"{capture_time(received_ns)}-{camera}-{seq:08d}"


def capture_time(unix_ns: int) -> str:
    """``20261123T215020.123456Z``: UTC, fixed width, so names sort by time."""
    seconds, ns = divmod(int(unix_ns), 1_000_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{ns // 1000:06d}Z"


def depth_preview(plane: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` xyz or ``(H, W, 1)`` depth -> uint8 grey: z min-max over the valid
    (finite, non-zero) points, nearer brighter, missing black."""
    z = plane[..., -1].astype(np.float64)
    valid = np.isfinite(z) & (z != 0)
    out = np.zeros(z.shape, np.uint8)
    if valid.any():
        lo, hi = z[valid].min(), z[valid].max()
        out[valid] = np.round(255 * (hi - z[valid]) / max(hi - lo, 1e-12)).astype(np.uint8)
    return out
