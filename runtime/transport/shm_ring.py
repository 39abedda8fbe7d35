"""A ring of frame slots in POSIX shared memory: the pixels stay in place, a small reference
(ring, slot, generation, planes) travels over ZeroMQ instead (the Frigate pattern).

Layout of one segment: a header of ``slots`` int64 generation counters (one per slot, 64
bytes apart so two slots never share a cache line), then ``slots`` data areas of
``slot_bytes`` each. Writing a frame into slot ``i`` (a seqlock): the generation goes to an
odd value, the planes are copied in, the generation goes to the next even value, which the
reference carries. A reader checks, after it has used the frame in place (fitted it: the
one copy the pipeline makes), that the slot still holds that generation; if the writer has
come round meanwhile the frame is discarded and counted as ``overwritten``, never scored
torn. References that do not fit the ring (another ring, a slot out of range, a generation
that is odd or not the slot's, planes larger than a slot) are refused with a reason.

Flow control (``every_part``): beside its generation each slot has a ``consumed`` counter
the reader sets to the generation it has finished with (:meth:`FrameRing.release`); the
writer does not reuse a slot it wrote until the reader has released that frame
(:meth:`FrameRing.wait_free`), so nothing is overwritten unread. A writer restarted after a
crash owes nothing to its predecessor's slots (frames of the dead process still in flight
may then be caught as ``overwritten``). ``live`` writers never wait.

Ownership: the runtime creates each camera's ring (named ``edge-inspect-<pid>-<random>-
<camera>``: the pid tells people which runtime, the random part keeps apart two runtimes
with one pid in containers that share ``/dev/shm``), holds an exclusive ``flock`` on it
while it runs and unlinks it when it stops; a camera process only attaches. Python's
resource tracker would unlink a segment when an attaching process's tracker ends (CPython
issue 82300), so attaching never registers it (:func:`attach_untracked`). A runtime killed
outright leaves its rings behind, unlocked; the next runtime removes every ring nobody
holds a lock on (:func:`sweep_stale`; not by pid, which another PID namespace reuses).

Slot layout: planes one after another, each starting on a 64-byte boundary. Memory order:
the seqlock relies on stores becoming visible in program order, which x86-64 guarantees
(total store order); on aarch64 (Jetson) that is not guaranteed without fences, which
Python cannot issue, and has not been verified.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock, no sweep
    fcntl = None

PREFIX = "edge-inspect-"
GEN_STRIDE = 8  # int64 entries between two slots' generation counters (64 bytes)
NAME = re.compile(rf"{re.escape(PREFIX)}\d{{1,10}}-[0-9a-f]{{8}}-[A-Za-z0-9_-]{{1,64}}")
ALIGN = 64  # bytes: every plane starts on a cache line
SHM_DIR = Path("/dev/shm")


class RingSwept(RuntimeError):
    """A new ring removed by another runtime's sweep before its creator could lock it."""


class StaleReference(ValueError):
    """A reference that does not (or no longer) match the ring; ``reason`` is the drop reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class SlotRef:
    """What a frame message carries instead of the pixels."""

    ring: str
    slot: int
    generation: int
    planes: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype)

    def as_header(self) -> dict:
        """The wire header's ``shm`` object (the planes travel in its ``parts``)."""
        return {"ring": self.ring, "slot": self.slot, "generation": self.generation}


def ring_name(camera: str, pid: int | None = None) -> str:
    """``edge-inspect-<pid>-<8 random hex digits>-<camera>``."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}-{camera}"


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def frame_bytes(planes: dict[str, np.ndarray]) -> int:
    """Bytes ``planes`` take in a slot (each plane padded to :data:`ALIGN`)."""
    return sum(aligned(p.nbytes) for p in planes.values())


class FrameRing:
    """One camera's ring. ``create=True`` (the runtime) makes and owns the segment."""

    def __init__(self, name: str, slots: int = 8, slot_bytes: int = 0, create: bool = False) -> None:
        line = 8 * GEN_STRIDE  # bytes per cache line: the meta block, then one per slot counter
        if create:
            if slots < 2 or slot_bytes < 1:
                raise ValueError(f"a ring needs >= 2 slots of >= 1 byte, got {slots} x {slot_bytes}")
            size = line * (slots + 1) + slots * slot_bytes
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self.lock_fd = _hold(self.shm)
            _reserve(self.shm, size, self.lock_fd)
            np.ndarray((2,), np.int64, self.shm.buf)[:] = [slots, slot_bytes]
        else:
            self.shm = attach_untracked(name)
            self.lock_fd = None
        self.name, self.owner = name, create
        meta = np.ndarray((2,), np.int64, self.shm.buf)
        self.slots, self.slot_bytes = int(meta[0]), int(meta[1])
        self.data_offset = line * (self.slots + 1)
        table = np.ndarray((self.slots, GEN_STRIDE), np.int64, self.shm.buf, offset=line)
        self.generations, self.consumed = table[:, 0], table[:, 1]
        self.next_slot = 0
        self.written = [0] * self.slots  # writer side: the generation this process last wrote per slot

    # -- writer (a camera process) ----------------------------------------------------------------
    def write(self, planes: dict[str, np.ndarray], slot: int | None = None) -> SlotRef:
        """Copy ``planes`` into the next slot (or ``slot``); returns the reference to send."""
        total = frame_bytes(planes)
        if total > self.slot_bytes:
            raise ValueError(f"frame of {total} bytes does not fit a slot of {self.slot_bytes} bytes")
        i = self.next_slot if slot is None else slot
        self.next_slot = (i + 1) % self.slots
        gen = int(self.generations[i])
        self.generations[i] = gen + 1 if gen % 2 == 0 else gen + 2  # odd: being written
        offset = self.data_offset + i * self.slot_bytes
        described = []
        for name, plane in planes.items():
            plane = np.ascontiguousarray(plane)
            view = np.ndarray(plane.shape, plane.dtype, self.shm.buf, offset=offset)
            np.copyto(view, plane)
            described.append((name, tuple(plane.shape), plane.dtype.name))
            offset += aligned(plane.nbytes)
        done = int(self.generations[i]) + 1  # even: complete
        self.generations[i] = done
        self.written[i] = done
        return SlotRef(self.name, i, done, tuple(described))

    def slot_free(self, slot: int | None = None) -> bool:
        """The reader has released what this writer last put in ``slot`` (default: the next)."""
        i = self.next_slot if slot is None else slot
        return self.written[i] == 0 or int(self.consumed[i]) >= self.written[i]

    def wait_free(self, timeout_s: float, stop=None) -> bool:
        """Wait until the next slot is free (every_part); False after ``timeout_s`` or once
        ``stop`` (an Event) is set. Polls with a back-off of 50 us to 1 ms: a full ring means
        the consumer is behind, so the wait is long next to the poll."""
        deadline, pause = time.monotonic() + timeout_s, 50e-6
        while not self.slot_free():
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    # -- reader (the pipeline) --------------------------------------------------------------------
    def view(self, ref: SlotRef) -> dict[str, np.ndarray]:
        """Read-only views of the referenced frame in place; raises :class:`StaleReference`
        for a reference that does not fit this ring or whose slot was rewritten already."""
        if ref.ring != self.name:
            raise StaleReference("malformed", f"reference to ring {ref.ring!r}, not {self.name!r}")
        if not 0 <= ref.slot < self.slots:
            raise StaleReference("malformed", f"slot {ref.slot} outside 0..{self.slots - 1}")
        if ref.generation <= 0 or ref.generation % 2:
            raise StaleReference("malformed", f"generation {ref.generation} is not a written frame")
        if int(self.generations[ref.slot]) != ref.generation:
            raise StaleReference("overwritten", f"slot {ref.slot} holds another frame already")
        offset, out = self.data_offset + ref.slot * self.slot_bytes, {}
        end = offset + self.slot_bytes
        for name, shape, dtype in ref.planes:
            dt = np.dtype(dtype)
            nbytes = math.prod(shape) * dt.itemsize  # Python ints: no overflow
            if min(shape, default=0) < 0 or offset + nbytes > end:
                raise StaleReference("malformed", f"plane {name} of {shape} {dtype} overruns the slot")
            view = np.ndarray(shape, dt, self.shm.buf, offset=offset)
            view.flags.writeable = False
            out[name] = view
            offset += aligned(nbytes)
        return out

    def still_valid(self, ref: SlotRef) -> bool:
        """After using :meth:`view`'s arrays: False when the writer came round meanwhile."""
        return int(self.generations[ref.slot]) == ref.generation

    def release(self, ref: SlotRef) -> None:
        """The reader is done with ``ref``'s frame: its slot may be written again. Only the
        frame the slot holds now is released (a stale or forged reference frees nothing)."""
        if ref.ring == self.name and 0 <= ref.slot < self.slots \
                and int(self.generations[ref.slot]) == ref.generation:
            self.consumed[ref.slot] = ref.generation

    def close(self) -> None:
        """Detach (the owner also removes the segment)."""
        self.generations = self.consumed = None
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
        if self.lock_fd is not None:  # after the unlink: a sweeper never sees it unlocked
            os.close(self.lock_fd)
            self.lock_fd = None


def _hold(shm: shared_memory.SharedMemory) -> int | None:
    """An exclusive lock on the new segment's file, held while the owner runs: what tells
    :func:`sweep_stale` the ring is in use (the kernel drops it when the owner dies). A
    sweep between the creation and the lock may have removed it: :class:`RingSwept`."""
    path = SHM_DIR / shm.name.lstrip("/")
    if fcntl is None or not SHM_DIR.is_dir():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        shm.close()
        resource_tracker.unregister(getattr(shm, "_name", "/" + shm.name), "shared_memory")
        raise RingSwept(shm.name) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError:  # a sweeper holds it or has unlinked it: not ours any more
        os.close(fd)
        shm.close()
        resource_tracker.unregister(getattr(shm, "_name", "/" + shm.name), "shared_memory")
        raise RingSwept(shm.name) from None
    return fd


def _reserve(shm: shared_memory.SharedMemory, size: int, fd: int | None) -> None:
    """Back the whole segment with memory now: a tmpfs that fills up later (a small Docker
    ``/dev/shm``) would otherwise kill the writer with SIGBUS mid-frame."""
    if fd is None or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        shm.close()
        shm.unlink()
        os.close(fd)
        free = shutil.disk_usage(SHM_DIR).free
        raise ValueError(f"cannot reserve {size / 2**20:.0f} MiB in {SHM_DIR} for frame ring {shm.name} "
                      f"({exc.strerror}; {free / 2**20:.0f} MiB free): lower transport.slots or "
                      "transport.frame_pixels in the profile, or give the machine more shared memory "
                      "(docker run --shm-size)") from None


def attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker (Python < 3.13 registers every
    attach, and a tracker that outlives the attaching process unlinks the owner's segment;
    unregistering afterwards would also drop the owner's own registration when both share
    one tracker, as spawned camera processes do)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def sweep_stale(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove rings no runtime holds a lock on (left by one killed outright); returns their
    names. (A ring created but not yet locked may go too: its creator notices and makes
    another, :class:`RingSwept`.)"""
    removed: list[str] = []
    if fcntl is None or not shm_dir.is_dir():
        return removed
    for entry in shm_dir.iterdir():
        if not NAME.fullmatch(entry.name):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            entry.unlink()
            removed.append(entry.name)
        except OSError:  # held by a running runtime (or gone meanwhile)
            pass
        finally:
            os.close(fd)
    return removed
