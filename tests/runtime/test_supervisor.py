"""Crashed camera processes are restarted with exponential backoff; clean exits are not.

Real processes (``multiprocessing``, spawn) that exit with a chosen code."""

import multiprocessing as mp
import time

from prometheus_client import CollectorRegistry, Counter

from edge_inspect.runtime.supervisor import SourceSupervisor


def _exit_with(code: int) -> None:
    raise SystemExit(code)


def _restarts():
    registry = CollectorRegistry()
    counter = Counter("restarts", "test", ["camera"], registry=registry)
    return counter, lambda cam: registry.get_sample_value("restarts_total", {"camera": cam}) or 0.0


def _poll_until(sup, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        sup.poll()
        time.sleep(0.02)


def test_crashes_are_restarted_with_growing_delays_and_clean_exits_are_not():
    ctx = mp.get_context("spawn")
    starts: list[tuple[str, float]] = []

    def start(cam):
        starts.append((cam["id"], time.monotonic()))
        proc = ctx.Process(target=_exit_with, args=(cam["code"],), daemon=True)
        proc.start()
        return proc

    counter, restarts = _restarts()
    sup = SourceSupervisor(start, [{"id": "crashy", "code": 3}, {"id": "done", "code": 0}], counter,
                           backoff_s=0.3, backoff_max_s=0.6)
    sup.start_all()
    _poll_until(sup, lambda: restarts("crashy") == 3)
    crash_starts = [t for cam, t in starts if cam == "crashy"]
    gaps = [b - a for a, b in zip(crash_starts, crash_starts[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6 and gaps[2] >= 0.6  # 0.3, then doubled, capped at 0.6
    assert [cam for cam, _ in starts].count("done") == 1 and restarts("done") == 0  # exit 0 stays ended
    sup.stop()
    n = len(starts)
    for _ in range(40):
        sup.poll()
        time.sleep(0.02)
    assert len(starts) == n  # nothing started after stop


def test_a_long_stable_run_resets_the_delay():
    counter, _ = _restarts()
    sup = SourceSupervisor(lambda cam: None, [], counter, backoff_s=1.0, backoff_max_s=8.0, stable_s=0.1)

    class Crashed:  # an ended process object (exit code 1), as multiprocessing reports it
        exitcode = 1

        def is_alive(self):
            return False

    sup.processes["cam"] = Crashed()
    sup.cameras = [{"id": "cam"}]
    sup.started_at["cam"] = time.monotonic() - 1.0  # it ran 1 s > stable_s
    sup.delay["cam"] = 8.0  # after earlier crashes
    sup.poll()
    assert sup.restart_at["cam"] - time.monotonic() < 1.5 and sup.pending()


def test_a_camera_that_ran_a_few_seconds_is_restarted_at_once_by_default():
    """Default settings: a process killed after 6 s of running was stable; its restart comes
    after ``backoff_s`` (0.5 s), not after the doubled delay of earlier crashes (with the old
    60 s stable period, 15 of 20 kill -9 recoveries took 31 s)."""
    counter, _ = _restarts()
    sup = SourceSupervisor(lambda cam: None, [{"id": "cam"}], counter)

    class Killed:
        exitcode = -9

        def is_alive(self):
            return False

    sup.processes["cam"] = Killed()
    sup.started_at["cam"] = time.monotonic() - 6.0
    sup.delay["cam"] = 30.0
    sup.poll()
    assert sup.restart_at["cam"] - time.monotonic() <= 0.5


def test_a_camera_that_gave_up_is_not_restarted():
    from edge_inspect.runtime.camera_process import EXIT_GAVE_UP

    counter, restarts = _restarts()
    ctx = mp.get_context("spawn")

    def start(cam):
        proc = ctx.Process(target=_exit_with, args=(EXIT_GAVE_UP,), daemon=True)
        proc.start()
        return proc

    sup = SourceSupervisor(start, [{"id": "cam"}], counter, backoff_s=0.05)
    sup.start_all()
    sup.processes["cam"].join(10)
    for _ in range(20):
        sup.poll()
        time.sleep(0.02)
    assert restarts("cam") == 0 and not sup.pending()
