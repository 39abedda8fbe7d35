"""Log lines a sender or a broken file could repeat without end, at most once per key and period.

A factory log must show that something happens, not drown in it: a camera restarting its
sequence, an unreadable image in a looping replay folder, a writer falling behind. The
first occurrence per key is logged, repeats within ``every_s`` are counted and summed
into the next line that is logged.
"""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    """``info`` / ``warning`` by key, at most one line per key every ``every_s`` seconds.

    ``max_keys`` bounds the memory when keys come from outside (oldest keys are forgotten).
    """

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, max_keys: int = 1024) -> None:
        self.logger, self.every_s, self.max_keys = logger, every_s, max_keys
        self.last: dict[object, tuple[float, int]] = {}  # key -> (time logged, repeats since)

    def log(self, level: int, key: object, msg: str, *args) -> bool:
        """True when the line was written, False when it was only counted."""
        now = time.monotonic()
        when, repeats = self.last.get(key, (None, 0))
        if when is not None and now - when < self.every_s:
            self.last[key] = (when, repeats + 1)
            return False
        if repeats:
            msg += f" (and {repeats} more like it in the last {self.every_s:.0f} s)"
        self.last.pop(key, None)
        if len(self.last) >= self.max_keys:
            self.last.pop(next(iter(self.last)))
        self.last[key] = (now, 0)
        self.logger.log(level, msg, *args)
        return True

    def info(self, key: object, msg: str, *args) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: object, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
