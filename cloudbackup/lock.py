"""One exclusive, non-blocking ``flock`` on the local dir per writing command."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from cloudbackup.core.errors import ConfigError, LockHeld

LOCK_NAME = ".lock"


class DirLock:
    def __init__(self, local_dir: Path) -> None:
        self.path = local_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot use the local dir {self.path.parent}: {exc.strerror}",
                "set CLOUDBACKUP_LOCAL_DIR to a writable directory",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise LockHeld(
                f"another cloudbackup run holds the lock on {self.path.parent}{who}",
                "wait for it to finish; the lock is released when that process exits",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
