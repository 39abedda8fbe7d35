"""The intake -> inference hand-over: FIFO with backpressure, or newest frame per camera."""

import threading
import time

import pytest

from edge_inspect.runtime.handoff import FrameHandoff


def test_every_part_keeps_order_and_blocks_when_full():
    h = FrameHandoff(latest_wins=False, capacity=2)
    assert h.put("a", 1, lambda: False) is None
    assert h.put("a", 2, lambda: False) is None
    blocked_put = threading.Thread(target=h.put, args=("b", 3, lambda: False))
    blocked_put.start()
    time.sleep(0.2)
    assert blocked_put.is_alive() and len(h) == 2  # full: the third frame waits, nothing lost
    assert h.take(1, 0.0, timeout_s=1) == [1]
    blocked_put.join(2)
    assert not blocked_put.is_alive()
    assert h.take(4, 0.0, timeout_s=1) == [2, 3]


def test_every_part_put_gives_up_when_stopped():
    h = FrameHandoff(latest_wins=False, capacity=1)
    h.put("a", 1, lambda: False)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    assert h.put("a", 2, stop.is_set) == 2  # returned, not queued
    assert time.monotonic() - t0 < 1 and h.take(4, 0.0, 0.1) == [1]


def test_take_waits_for_the_batch_to_fill_only_up_to_max_wait():
    h = FrameHandoff(latest_wins=False, capacity=4)
    assert h.take(4, 0.0, timeout_s=0.05) == []
    h.put("a", 1, lambda: False)
    threading.Timer(0.05, h.put, args=("a", 2, lambda: False)).start()
    t0 = time.monotonic()
    assert h.take(4, 0.3, timeout_s=1) == [1, 2]  # the second arrived within max_wait
    assert 0.25 < time.monotonic() - t0 < 1.0  # then waited out max_wait for 3 and 4


def test_live_keeps_the_newest_per_camera_and_serves_the_longest_waiting_first():
    h = FrameHandoff(latest_wins=True, capacity=1)
    assert h.put("cam0", "a0", lambda: False) is None
    assert h.put("cam1", "b0", lambda: False) is None
    assert h.put("cam0", "a1", lambda: False) == "a0"  # superseded: the caller counts it stale
    assert len(h) == 2
    assert h.take(1, 0.0, timeout_s=1) == ["b0"]  # cam1 has waited longest
    assert h.take(4, 0.0, timeout_s=1) == ["a1"]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        FrameHandoff(latest_wins=False, capacity=0)
