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

    def __init__(self, folder: str | Path, what: str, private: bool = False) -> None:
        """``private``: the folder (made 0700 when new) must belong to this user -- its ipc
        sockets are guarded only by the folder's permissions."""
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
        owner = self.folder.stat().st_uid
        if private and owner != os.getuid():
            raise ValueError(f"{what} {self.folder} belongs to another user (uid {owner}), who could "
                             f"reach its sockets; choose a {what} of your own")
        self.path = self.folder / LOCK_NAME
        try:  # O_NOFOLLOW: a planted symlink must not make us truncate another file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise ValueError(f"cannot open the lock file {self.path} ({exc.strerror}); is it a "
                             f"symlink, or is {what} {self.folder} not writable?") from None
        self.file = os.fdopen(fd, "r+")
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
