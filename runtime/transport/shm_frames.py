"""Frames through shared memory: a camera writes into its ring, ZeroMQ carries the reference.

Camera side, a frame writer turns ``(camera, seq, t_capture_ns, planes, source)`` into the
message to send: :class:`PayloadFrames` puts the pixels in the message (the default,
``transport: {kind: zmq}``); :class:`RingFrames` copies them into the camera's ring and sends
only the reference (``kind: shm``). ``every_part``: :class:`RingFrames` waits for a free
slot and raises ``TimeoutError`` after ``wait_s``, as a blocked ZeroMQ send does, so the
camera counts ``send_blocked`` and keeps waiting.

Pipeline side, :class:`RingSet` holds the runtime's rings (one per camera process, created,
owned and removed by the runtime) and does the reader's steps: :meth:`RingSet.read` puts
read-only views of the frame in the message, :meth:`RingSet.unchanged` says (after the
frame has been fitted, the one copy) whether the slot still holds it, :meth:`RingSet.release`
hands the slot back (every_part: once the frame is in the engine or dropped; a live camera
never waits for a slot), :meth:`RingSet.finish` does both.
"""

from __future__ import annotations

import logging

import numpy as np

from edge_inspect.runtime.transport.shm_ring import (
    FrameRing,
    RingSwept,
    StaleReference,
    frame_bytes,
    ring_name,
    sweep_stale,
)
from edge_inspect.runtime.transport.wire import Message, encode_frame, encode_frame_ref

log = logging.getLogger(__name__)
TRANSPORTS = ("zmq", "shm")


class PayloadFrames:
    """The pixels travel in the ZeroMQ message."""

    def __init__(self, max_frame_bytes: int | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes

    def too_large(self, planes: dict[str, np.ndarray]) -> str | None:
        """Why the frame cannot be sent (the receiver's MAXMSGSIZE would disconnect the camera)."""
        if self.max_frame_bytes and max(p.nbytes for p in planes.values()) > self.max_frame_bytes:
            return (f"exceeds the pipeline's limit of {self.max_frame_bytes} bytes per plane; raise "
                    "pipeline.max_frame_pixels in the profile or lower the camera's resolution")
        return None

    def parts(self, camera: str, seq: int, t_ns: int, planes: dict, source: str | None) -> list:
        return encode_frame(camera, seq, t_ns, planes, source)

    def close(self) -> None:
        pass


class RingFrames:
    """The pixels go into the camera's ring (only ``planes`` the bundle reads, when given)."""

    def __init__(self, ring: str, mode: str, planes: tuple[str, ...] | None = None, wait_s: float = 1.0,
                 stop=None) -> None:
        self.ring = FrameRing(ring)
        self.wait = mode == "every_part"
        self.planes, self.wait_s, self.stop = planes, wait_s, stop

    def _selected(self, planes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return planes if self.planes is None else {k: planes[k] for k in self.planes if k in planes}

    def too_large(self, planes: dict[str, np.ndarray]) -> str | None:
        total = frame_bytes(self._selected(planes))
        if total > self.ring.slot_bytes:
            return (f"needs {total} bytes, more than a shared-memory slot holds ({self.ring.slot_bytes}); "
                    "raise transport.frame_pixels in the profile or lower the camera's resolution")
        return None

    def parts(self, camera: str, seq: int, t_ns: int, planes: dict, source: str | None) -> list:
        if self.wait and not self.ring.wait_free(self.wait_s, self.stop):
            raise TimeoutError(f"no free slot in ring {self.ring.name} within {self.wait_s} s")
        ref = self.ring.write(self._selected(planes))
        return encode_frame_ref(camera, seq, t_ns, ref, source)

    def close(self) -> None:
        self.ring.close()


class RingSet:
    """The runtime's rings by camera id, and the reader's side of them."""

    def __init__(self, rings: dict[str, FrameRing]) -> None:
        self.rings = rings

    @classmethod
    def create(cls, cameras: list[str], slots: int, slot_size: int) -> RingSet:
        """One ring per camera, named after this process and the camera; rings of runtimes
        that no longer run are removed first."""
        swept = sweep_stale()
        if swept:
            log.warning("removed %d shared-memory frame rings of runtimes that no longer run: %s",
                        len(swept), ", ".join(swept))
        rings: dict[str, FrameRing] = {}
        try:
            for cam in cameras:
                for attempt in range(3):
                    try:
                        rings[cam] = FrameRing(ring_name(cam), slots, slot_size, create=True)
                        break
                    except RingSwept:  # another runtime's sweep took it before it was locked
                        if attempt == 2:
                            raise
        except BaseException:
            for ring in rings.values():
                ring.close()
            raise
        return cls(rings)

    def name(self, camera: str) -> str:
        return self.rings[camera].name

    def read(self, msg: Message) -> None:
        """Views of ``msg``'s planes in place (``msg.arrays``); :class:`StaleReference` with the
        drop reason when the reference does not fit the camera's ring or was overwritten."""
        ring = self.rings.get(msg.camera)
        if ring is None:
            raise StaleReference("malformed", f"camera {msg.camera} has no frame ring")
        planes = ring.view(msg.ref)
        msg.arrays = list(planes.values())

    def finish(self, msg: Message) -> bool:
        """After the frame was used: whether its slot still held it throughout; the slot is
        handed back."""
        ring = self.rings.get(msg.camera)  # None once the runtime is closing
        valid = ring is not None and ring.still_valid(msg.ref)
        if ring is not None:
            ring.release(msg.ref)
        return valid

    def unchanged(self, msg: Message) -> bool:
        """Whether the slot still holds ``msg``'s frame (after a second use of its views)."""
        ring = self.rings.get(msg.camera)
        return ring is not None and ring.still_valid(msg.ref)

    def release(self, msg: Message) -> None:
        """Hand back the slot of a frame done with (scored or dropped); nothing for a frame
        whose pixels came in the message."""
        ring = self.rings.get(msg.camera)
        if ring is not None and msg.ref is not None:
            ring.release(msg.ref)

    def close(self) -> None:
        """Detach and remove every ring (the runtime owns them)."""
        for ring in self.rings.values():
            ring.close()
        self.rings = {}
