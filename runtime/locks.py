"""One runtime per folder: an exclusive ``flock`` on a lock file, released when the process dies.

Two ``serve`` processes on one ``endpoint_dir`` would unlink each other's ipc sockets and
fight over captures; the second is refused with the first one's pid. The kernel drops the
lock with the process (even after ``kill -9``), so a stale lock file never blocks a start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".edge-inspect.lock"


class FolderLock:
    """Holds ``<folder>/.edge-inspect.lock`` until :meth:`release` (or the process ends)."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / LOCK_NAME
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open: the lock lives with it
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ValueError(f"{what} {self.folder} is in use by another edge-inspect serve (pid {holder}); "
                             f"stop that one, or give this profile its own {what}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
