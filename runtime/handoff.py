"""The hand-over between the pipeline's intake thread and its inference thread.

The intake thread receives, decodes and preprocesses the next frames while the engine runs
on the current batch, so the engine never waits for Python work. The two delivery modes
need different hand-overs:

- ``every_part`` (:meth:`FrameHandoff.put` blocks): a FIFO of at most ``capacity`` frames;
  a full hand-over stops the intake, ZeroMQ's queue fills, and the camera blocks. Nothing
  is lost.
- ``live`` (:meth:`FrameHandoff.put` replaces): one slot per camera holding its newest
  frame; a frame still waiting when a newer one of the same camera arrives is returned
  to the caller to be counted as ``stale``. Cameras are served oldest-waiting first, so
  more cameras than ``max_batch`` all get their turn.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class FrameHandoff:
    def __init__(self, latest_wins: bool, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"hand-over capacity must be >= 1, got {capacity}")
        self.latest_wins, self.capacity = latest_wins, capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._next_key = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, camera: str, item: Any, stopped: Callable[[], bool]) -> Any | None:
        """Hand over ``item``; returns the item it replaced (``live``), else None.

        ``every_part`` waits while the hand-over is full, checking ``stopped`` every 50 ms;
        a stopped pipeline's item is not queued (returned, like a replaced one).
        """
        with self._cond:
            if self.latest_wins:
                replaced = self._items.pop(camera, None)
                self._items[camera] = item  # re-inserted at the end: its wait starts now
                self._cond.notify()
                return replaced
            while len(self._items) >= self.capacity:
                if stopped():
                    return item
                self._cond.wait(0.05)
            self._items[self._next_key] = item
            self._next_key += 1
            self._cond.notify()
            return None

    def take(self, max_items: int, max_wait_s: float, timeout_s: float) -> list:
        """Up to ``max_items``, oldest first: waits ``timeout_s`` for the first one, then at
        most ``max_wait_s`` more for the batch to fill. Empty after the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            fill_by = time.monotonic() + max_wait_s
            while len(self._items) < max_items:
                left = fill_by - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            out = []
            while self._items and len(out) < max_items:
                out.append(self._items.popitem(last=False)[1])
            self._cond.notify_all()  # room for a waiting put
            return out
