"""Restarts camera processes that crash, with exponential backoff.

A camera process that ends (exit code 0: its file or folder ended; ``EXIT_GAVE_UP``: a
live source gave up after ``max_reconnects``) stays ended. One that dies otherwise (an
exception, a segfault in a decoder, the OOM killer, ``kill -9``) is started again after
``backoff_s``, doubling up to ``backoff_max_s`` while it keeps crashing within
``stable_s`` of its start; a process that ran ``stable_s`` or longer was stable, and its
next restart comes after ``backoff_s`` again. Restarts are counted in
``edge_inspect_source_restarts_total{camera}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_inspect.runtime.camera_process import EXIT_GAVE_UP

ENDED = (0, EXIT_GAVE_UP)  # exit codes of a camera that ended on purpose

log = logging.getLogger(__name__)


class SourceSupervisor:
    def __init__(self, start: Callable[[dict], object], cameras: list[dict], restarts,
                 backoff_s: float = 0.5, backoff_max_s: float = 30.0, stable_s: float = 5.0) -> None:
        """``start(cam)`` starts a camera's process and returns it; ``restarts`` is the
        labelled counter of restarts."""
        self.start, self.cameras, self.restarts = start, cameras, restarts
        self.backoff_s, self.backoff_max_s, self.stable_s = backoff_s, backoff_max_s, stable_s
        self.processes: dict[str, object] = {}
        self.started_at: dict[str, float] = {}
        self.delay: dict[str, float] = {}
        self.restart_at: dict[str, float] = {}
        self.lock = threading.Lock()  # start vs. stop: no process is started after stop
        self.stopped = False

    def start_all(self) -> None:
        for cam in self.cameras:
            self._start(cam)

    def _start(self, cam: dict) -> None:
        with self.lock:
            if self.stopped:
                return
            self.processes[cam["id"]] = self.start(cam)
            self.started_at[cam["id"]] = time.monotonic()

    def poll(self) -> None:
        """Schedule restarts of crashed processes and start those that are due."""
        now = time.monotonic()
        for cam in self.cameras:
            cid = cam["id"]
            proc = self.processes.get(cid)
            if proc is None or proc.is_alive() or proc.exitcode in ENDED or self.stopped:
                continue
            if cid not in self.restart_at:
                if now - self.started_at[cid] > self.stable_s:
                    self.delay[cid] = self.backoff_s
                delay = self.delay.get(cid, self.backoff_s)
                log.warning("camera %s: its process died (exit code %s); restarting in %.1f s",
                            cid, proc.exitcode, delay)
                self.restart_at[cid] = now + delay
                self.delay[cid] = min(delay * 2, self.backoff_max_s)
            elif now >= self.restart_at[cid]:
                del self.restart_at[cid]
                self.restarts.labels(cid).inc()
                self._start(cam)

    def pending(self) -> bool:
        """Whether a crashed camera is waiting for its restart."""
        return bool(self.restart_at)

    def run(self, stop: threading.Event, interval_s: float = 0.2) -> None:
        """Poll until ``stop``; a failed restart (e.g. too many open files) is logged and
        retried at the next poll, it never ends supervision."""
        while not stop.wait(interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - this thread must outlive any one failure
                log.exception("camera supervision: a poll failed; retrying")

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
