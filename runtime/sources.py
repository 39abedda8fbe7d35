"""Frame sources: image-folder replay, synthetic frames, and OpenCV captures (camera index,
video file, RTSP/HTTP URL) with reconnect, backoff and a stall watchdog; for RGB-D, replay
of MVTec 3D-AD-layout folders (RGB PNG + xyz TIFF pairs) and a synthetic RGB-D camera.

Every source yields ``(planes, t_capture_ns)``: a mapping of plane name to array (these
sources give ``{"rgb": (H, W, 3) uint8}``; RGB-D sources add ``depth`` or ``xyz``) and
``time.monotonic_ns()`` taken when it was captured (comparable across processes on one
host). :func:`publish` numbers them per camera (``seq``) and sends them in the wire format.
Iteration stops when ``stop`` is set, so SIGTERM handlers end a source promptly. A source's
``on_event`` (set by the camera process) counts what it had to skip, by name
(``unreadable_image``); a live source that stops trying sets ``gave_up``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edge_inspect.runtime.preprocess import IMAGE_SUFFIXES, read_rgb, read_xyz
from edge_inspect.runtime.synthetic_rgbd import KINDS as RGBD_KINDS
from edge_inspect.runtime.synthetic_rgbd import render as render_rgbd
from edge_inspect.runtime.transport.sockets import Sender

log = logging.getLogger(__name__)
Frame = tuple[dict[str, np.ndarray], int]  # planes by name, capture time (ns)


class Source:
    """What every source has besides ``__iter__``: an event counter hook and ``gave_up``."""

    on_event = None  # callable(event name) or None
    gave_up = False
    current_name: str | None = None  # the file of the frame last yielded (replays)
    PLANES: tuple[str, ...] = ("rgb",)  # the planes every frame of this kind carries

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)


class Pacer:
    """Sleeps to hold a frame rate (deadline-based, so slow reads do not accumulate drift)."""

    def __init__(self, fps: float | None, stop: threading.Event) -> None:
        self.period = 1.0 / fps if fps else 0.0
        self.stop = stop
        self.next = time.monotonic()

    def wait(self) -> bool:
        """False when stopped while waiting."""
        if self.period:
            self.next += self.period
            delay = self.next - time.monotonic()
            if delay > 0:
                return not self.stop.wait(delay)
            self.next = time.monotonic()  # behind: do not burst to catch up
        return not self.stop.is_set()


class FolderSource(Source):
    """Replays images (a folder or a list of files) at ``fps``, optionally looping."""

    def __init__(self, images: str | Path | list[Path], fps: float | None = 10.0, loop: bool = False,
                 stop: threading.Event | None = None) -> None:
        where = "the image list"
        if isinstance(images, str | Path):
            folder = where = Path(images)
            if not folder.is_dir():
                raise FileNotFoundError(f"image folder {folder} not found; put the images to replay "
                                        "there or fix the camera's path")
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.files = [Path(p) for p in images]
        if not self.files:
            raise ValueError(f"no images to replay in {where} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.fps, self.loop = fps, loop
        self.stop = stop or threading.Event()
        self.unreadable: set[Path] = set()

    def read(self, path: Path) -> dict[str, np.ndarray]:
        return {"rgb": read_rgb(path)}

    def __iter__(self) -> Iterator[Frame]:
        return replay(self, self.files)


def replay(source, items: list) -> Iterator[Frame]:
    """Frames of ``source.read(item)`` for each item at ``source.fps``, looping with
    ``source.loop``; an item that cannot be read is skipped and counted
    (``unreadable_image``), logged once per item: a bad file in a replay is not fatal."""
    pacer = Pacer(source.fps, source.stop)
    while True:
        for item in items:
            if not pacer.wait():
                return
            try:
                planes = source.read(item)
            except ValueError as exc:
                source._event("unreadable_image")
                if item not in source.unreadable:
                    source.unreadable.add(item)
                    log.warning("skipping %s (logged once; every skip is counted in "
                                "edge_inspect_source_events_total)", exc)
                continue
            first = item[0] if isinstance(item, tuple | list) else item
            source.current_name = Path(first).name  # sent with the frame (captures name it)
            yield planes, time.monotonic_ns()
        if not source.loop:
            return


class SyntheticSource(Source):
    """Moving-gradient frames of a given size, for load tests without files.

    ``variants`` frames are drawn once and cycled, so generating a frame costs nothing and
    the source does not compete with the pipeline for CPU.
    """

    def __init__(self, size: tuple[int, int] = (480, 640), fps: float | None = 30.0,
                 count: int | None = None, variants: int = 16,
                 stop: threading.Event | None = None) -> None:
        self.size, self.fps, self.count, self.variants = size, fps, count, variants
        self.stop = stop or threading.Event()

    def __iter__(self) -> Iterator[Frame]:
        h, w = self.size
        base = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
        frames = []
        for i in range(self.variants):
            shifted = np.roll(base, 7 * i, axis=1)
            frames.append(np.stack([shifted, shifted[::-1], np.full_like(shifted, 16 * i % 256)], -1))
        pacer, i = Pacer(self.fps, self.stop), 0
        while (self.count is None or i < self.count) and pacer.wait():
            yield {"rgb": frames[i % self.variants]}, time.monotonic_ns()
            i += 1


class CaptureSource(Source):
    """OpenCV capture of a camera index, video file or RTSP/HTTP URL.

    Live streams (index or URL) reconnect with exponential backoff (``backoff_s`` doubling
    up to ``backoff_max_s``) when opening fails, reading fails, or no frame arrives for
    ``stall_s`` (the watchdog). A file ends at its end unless ``loop``. ``reconnects``
    counts reopenings; ``up`` says whether frames are flowing.
    """

    def __init__(self, uri: str | int, fps: float | None = None, loop: bool = False,
                 stall_s: float = 5.0, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 max_reconnects: int | None = None, stop: threading.Event | None = None) -> None:
        self.uri = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
        self.is_file = isinstance(self.uri, str) and "://" not in self.uri
        if self.is_file and not Path(self.uri).is_file():
            raise FileNotFoundError(f"video file {self.uri} not found")
        self.fps, self.loop, self.stall_s = fps, loop, stall_s
        self.backoff_s, self.backoff_max_s, self.max_reconnects = backoff_s, backoff_max_s, max_reconnects
        self.stop = stop or threading.Event()
        self.reconnects, self.up = 0, False

    def _open(self) -> cv2.VideoCapture | None:
        if self.stall_s and isinstance(self.uri, str) and not self.is_file:
            # The watchdog: a URL whose read blocks longer than stall_s fails the read and
            # reconnects. The timeouts only work as open parameters (set afterwards, FFmpeg
            # ignores them and a stalled HTTP stream blocks read() until the server hangs up).
            ms = int(self.stall_s * 1000)
            cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                              cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
        else:
            cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def __iter__(self) -> Iterator[Frame]:
        pacer, delay = Pacer(self.fps, self.stop), self.backoff_s
        while not self.stop.is_set():
            cap = self._open()
            if cap is None:
                self.up = False
                if self.is_file:
                    raise ValueError(f"cannot open video file {self.uri}")
                if self.max_reconnects is not None and self.reconnects >= self.max_reconnects:
                    log.error("giving up on %s after %d reconnects", self.uri, self.reconnects)
                    self.gave_up = True
                    return
                self.reconnects += 1
                log.warning("cannot open %s; retrying in %.1f s", self.uri, delay)
                if self.stop.wait(delay):
                    return
                delay = min(delay * 2, self.backoff_max_s)
                continue
            last = time.monotonic()
            try:
                while pacer.wait():
                    ok, bgr = cap.read()
                    if not ok:
                        if self.is_file and self.loop:
                            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                            continue
                        if self.is_file:
                            return
                        if time.monotonic() - last > self.stall_s:
                            log.warning("no frame from %s for %.1f s; reconnecting", self.uri, self.stall_s)
                        break
                    last, delay, self.up = time.monotonic(), self.backoff_s, True
                    yield {"rgb": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)}, time.monotonic_ns()
            finally:
                cap.release()
                self.up = False
            self.reconnects += 1

class RGBDFolderSource(Source):
    """Replays RGB + point-map pairs in the MVTec 3D-AD layout: every ``rgb/<name>.png`` under
    ``path`` (the folder itself or any folder below it) with its ``../xyz/<name>.tiff``,
    sent as the planes ``rgb`` and ``xyz``. An image without its point map is an error at
    start; a pair that cannot be read later is skipped and counted (``unreadable_image``)."""

    PLANES = ("rgb", "xyz")

    def __init__(self, path: str | Path, fps: float | None = 10.0, loop: bool = False,
                 stop: threading.Event | None = None) -> None:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"RGB-D folder {root} not found; point the camera's path at an "
                                    "MVTec 3D-AD class, split or defect folder")
        folders = sorted({p.parent for p in root.rglob("*") if p.parent.name == "rgb"
                          and p.suffix.lower() in IMAGE_SUFFIXES} | ({root} if root.name == "rgb" else set()))
        self.pairs = []
        for folder in folders:
            for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                xyz = folder.parent / "xyz" / f"{image.stem}.tiff"
                if not xyz.exists():
                    raise FileNotFoundError(f"{image} has no point map {xyz} (MVTec 3D-AD layout: "
                                            "rgb/<name>.png beside xyz/<name>.tiff)")
                self.pairs.append((image, xyz))
        if not self.pairs:
            raise ValueError(f"no rgb/<name>.png + xyz/<name>.tiff pairs under {root}")
        self.fps, self.loop = fps, loop
        self.stop = stop or threading.Event()
        self.unreadable: set = set()

    def read(self, pair: tuple[Path, Path]) -> dict[str, np.ndarray]:
        return {"rgb": read_rgb(pair[0]), "xyz": read_xyz(pair[1])}

    def __iter__(self) -> Iterator[Frame]:
        return replay(self, self.pairs)


class SyntheticRGBDSource(Source):
    """A synthetic RGB-D camera: scenes of :mod:`runtime.synthetic_rgbd` (planes ``rgb`` and
    ``xyz``), cycling normal, dent, stain, ...; frame ``i`` is drawn from ``(seed, i)``, so
    a receiver knows each frame's truth from its ``seq`` (:func:`rgbd_frame_kind`)."""

    PLANES = ("rgb", "xyz")

    def __init__(self, size: int = 112, fps: float | None = 10.0, count: int | None = None,
                 seed: int = 0, dropout: float = 0.0, stop: threading.Event | None = None) -> None:
        if int(size) < 16:
            raise ValueError(f"synthetic RGB-D size must be at least 16 pixels, got {size}")
        self.size, self.fps, self.count = int(size), fps, count
        self.seed, self.dropout = int(seed), float(dropout)
        self.stop = stop or threading.Event()

    def __iter__(self) -> Iterator[Frame]:
        pacer, i = Pacer(self.fps, self.stop), 0
        while (self.count is None or i < self.count) and pacer.wait():
            image, xyz, _ = self.scene(i)
            yield {"rgb": image, "xyz": xyz}, time.monotonic_ns()
            i += 1

    def scene(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame ``i``'s ``(rgb, xyz, mask)``."""
        return render_rgbd(self.size, np.random.default_rng([self.seed, 2, i]), rgbd_frame_kind(i),
                           self.dropout)


def rgbd_frame_kind(i: int) -> str:
    """The truth of the synthetic RGB-D camera's frame ``i``: good, dent, stain, good, ..."""
    return ("good", *RGBD_KINDS)[i % (1 + len(RGBD_KINDS))]


def publish(source, sender: Sender, camera: str, stop: threading.Event | None = None,
            on_event=None, frames=None) -> int:
    """Send every frame of ``source`` as ``frame.<camera>`` with a per-camera ``seq``.

    ``frames`` makes each message (:mod:`edge_inspect.runtime.transport.shm_frames`): the
    pixels in the message (default) or in the camera's shared-memory ring. every_part: a
    send that times out (the pipeline stalled) or a ring with no free slot is retried until
    it goes through or ``stop`` is set -- a camera waits, it never exits because the
    consumer is slow; each timeout is counted as ``send_blocked``. A frame too large for the
    pipeline's frame limit (the receiver's ``MAXMSGSIZE``, which would silently disconnect
    the camera; ``PayloadFrames(max_frame_bytes)``) or for a ring slot is not sent: counted
    as ``oversized_frame`` and logged once.
    """
    from edge_inspect.runtime.transport.shm_frames import PayloadFrames

    stop = stop or threading.Event()
    count = on_event or (lambda _event: None)
    frames = frames or PayloadFrames()
    seq, blocked_since, warned_size = 0, None, False
    for planes, t_ns in source:
        if stop.is_set():
            break
        problem = frames.too_large(planes)
        if problem:
            count("oversized_frame")
            if not warned_size:
                shapes = {name: p.shape for name, p in planes.items()}
                log.error("camera %s: frame %s %s (frames are counted as oversized_frame)", camera,
                          shapes, problem)
                warned_size = True
            continue
        parts = None  # once written into a ring slot, the same message is sent on every retry
        while True:
            try:
                if parts is None:
                    parts = frames.parts(camera, seq, t_ns, planes, getattr(source, "current_name", None))
                sender.send(parts)
                break
            except TimeoutError:
                count("send_blocked")
                if blocked_since is None:
                    blocked_since = time.monotonic()
                    log.warning("camera %s: the pipeline takes no frames (every_part); waiting", camera)
                if stop.is_set():
                    return seq
        if blocked_since is not None:
            log.warning("camera %s: the pipeline takes frames again after %.1f s", camera,
                        time.monotonic() - blocked_since)
            blocked_since = None
        seq += 1
    return seq
