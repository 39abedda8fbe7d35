"""The shared-memory frame ring: frames cross processes in place, a slot rewritten while in
use is caught (never read torn), forged references are refused with a reason, and no
segment outlives its runtime (an attaching process exiting does not remove it; a killed
runtime's rings are swept)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edge_inspect.runtime.transport.shm_ring import (
    SHM_DIR,
    FrameRing,
    SlotRef,
    StaleReference,
    ring_name,
    sweep_stale,
)

FRAME = (108, 192, 3)  # a 1080p frame / 10 per side: the same code path, small


@pytest.fixture()
def ring():
    r = FrameRing(ring_name(f"test{time.monotonic_ns() % 10**9}"), slots=4,
                  slot_bytes=3 * int(np.prod(FRAME)) + 4096, create=True)
    yield r
    r.close()


def _write_one(name: str, value: int, conn) -> None:
    ring = FrameRing(name)
    ref = ring.write({"rgb": np.full(FRAME, value, np.uint8),
                      "depth": np.full((108, 192, 1), 0.5, np.float32)})
    conn.send(ref)
    ring.close()


def test_a_frame_crosses_processes_in_place_and_the_ring_outlives_a_writer(ring):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_write_one, args=(ring.name, 7, child))
    proc.start()
    ref = parent.recv()
    proc.join(10)
    assert proc.exitcode == 0
    assert (SHM_DIR / ring.name).exists()  # the writer's exit did not unlink it (resource tracker)
    planes = ring.view(ref)
    assert planes["rgb"].shape == FRAME and int(planes["rgb"].min()) == int(planes["rgb"].max()) == 7
    assert planes["depth"].dtype == np.float32 and float(planes["depth"].mean()) == 0.5
    assert not planes["rgb"].flags.writeable and ring.still_valid(ref)
    assert SlotRef(**{**ref.__dict__}) == ref and ref.as_header()["slot"] == ref.slot


def test_a_slot_rewritten_while_in_use_is_caught(ring):
    ref = ring.write({"rgb": np.full(FRAME, 1, np.uint8)})
    view = ring.view(ref)["rgb"]
    for k in range(ring.slots):  # the writer comes round to the same slot
        ring.write({"rgb": np.full(FRAME, 2 + k, np.uint8)})
    assert not ring.still_valid(ref) and int(view[0, 0, 0]) != 1  # in use: the bytes changed
    with pytest.raises(StaleReference) as err:
        ring.view(ref)
    assert err.value.reason == "overwritten"


def _hammer(name: str, n: int, refs) -> None:
    ring = FrameRing(name)
    for k in range(n):
        refs.put(ring.write({"rgb": np.full(FRAME, k % 251, np.uint8)}))
    refs.put(None)
    ring.close()


def test_a_writer_lapping_the_reader_never_yields_a_torn_frame(ring):
    """The writer runs flat out over 4 slots while the reader is slow: frames overwritten during
    use are detected and dropped; every frame kept is whole (one value throughout)."""
    ctx = mp.get_context("spawn")
    refs = ctx.Queue()
    proc = ctx.Process(target=_hammer, args=(ring.name, 3000, refs))
    proc.start()
    kept = overwritten = torn_kept = 0
    while (ref := refs.get(timeout=30)) is not None:
        try:
            frame = ring.view(ref)["rgb"]
        except StaleReference as exc:
            overwritten += exc.reason == "overwritten"
            continue
        copy = frame.copy()  # "use" it (the pipeline fits it here)
        if not ring.still_valid(ref):
            overwritten += 1
            continue
        kept += 1
        torn_kept += int(copy.min() != copy.max())
    proc.join(10)
    assert torn_kept == 0 and kept > 0 and overwritten > 0, (kept, overwritten)
    print(f"{kept} frames kept whole, {overwritten} caught overwritten, 0 torn")


def test_forged_references_are_refused_with_a_reason(ring):
    ref = ring.write({"rgb": np.zeros(FRAME, np.uint8)})
    cases = {
        "another ring": (SlotRef("edge-inspect-1-other", ref.slot, ref.generation, ref.planes), "malformed"),
        "slot out of range": (SlotRef(ring.name, 99, ref.generation, ref.planes), "malformed"),
        "odd generation": (SlotRef(ring.name, ref.slot, ref.generation + 1, ref.planes), "malformed"),
        "old generation": (SlotRef(ring.name, ref.slot, ref.generation + 2, ref.planes), "overwritten"),
        "overrun": (SlotRef(ring.name, ref.slot, ref.generation, (("rgb", (4000, 4000, 3), "uint8"),)),
                    "malformed"),
        "negative size": (SlotRef(ring.name, ref.slot, ref.generation, (("rgb", (-5, 4, 3), "uint8"),)),
                          "malformed"),
    }
    for what, (forged, reason) in cases.items():
        with pytest.raises((StaleReference, ValueError)) as err:
            ring.view(forged)
        assert getattr(err.value, "reason", "malformed") == reason, what
    with pytest.raises(ValueError, match="does not fit a slot"):
        ring.write({"rgb": np.zeros((2000, 2000, 3), np.uint8)})


def _exit_now() -> None:
    pass


def test_the_owner_removes_its_ring_and_a_dead_runtimes_rings_are_swept():
    ring = FrameRing(ring_name("owned"), slots=2, slot_bytes=64, create=True)
    path = SHM_DIR / ring.name
    assert path.exists()
    ring.close()
    assert not path.exists()
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=_exit_now)
    dead.start()
    dead.join(10)
    orphan = FrameRing(ring_name("cam0", pid=dead.pid), slots=2, slot_bytes=64, create=True)
    orphan.owner = False  # as if its runtime had been killed: nobody will unlink it
    orphan.close()
    mine = FrameRing(ring_name("cam1"), slots=2, slot_bytes=64, create=True)  # a live runtime's
    # a live runtime in another PID namespace sharing /dev/shm: its pid means nothing here,
    # its lock does
    foreign = FrameRing(ring_name("cam2", pid=dead.pid), slots=2, slot_bytes=64, create=True)
    try:
        removed = sweep_stale()
        assert orphan.name in removed and not (SHM_DIR / orphan.name).exists()
        assert (SHM_DIR / mine.name).exists() and mine.name not in removed
        assert (SHM_DIR / foreign.name).exists() and foreign.name not in removed
    finally:
        mine.close()
        foreign.close()
    assert not list(Path(SHM_DIR).glob(f"edge-inspect-{dead.pid}-*"))


def test_a_ring_swept_before_its_creator_locked_it_is_made_again(monkeypatch):
    """Another runtime's sweep may find a new ring in the instant before its creator locks
    it and remove it; the creator notices (it cannot take the lock, or the name now points
    elsewhere) and makes another ring instead of serving from an unlinked one."""
    import fcntl

    from edge_inspect.runtime.transport.shm_frames import RingSet

    real_flock, calls = fcntl.flock, []

    def swept_first(fd, op):
        calls.append(op)
        if len(calls) == 1:  # the sweeper got there first: it holds the lock and unlinks
            os.unlink(os.readlink(f"/proc/self/fd/{fd}"))
            raise BlockingIOError("locked by the sweeper")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", swept_first)
    rings = RingSet.create(["cam0"], 2, 64)
    try:
        name = rings.name("cam0")
        assert len(calls) == 2 and (SHM_DIR / name).exists()
        assert len(list(Path(SHM_DIR).glob(f"edge-inspect-{os.getpid()}-*-cam0"))) == 1  # nothing else left
    finally:
        rings.close()
