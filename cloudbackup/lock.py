"""One exclusive, non-blocking ``flock`` on the local dir per writing command.

The lock file is opened relative to the local dir's descriptor with ``O_NOFOLLOW`` and must
be a regular file before anything is written to it: a symlink (or a FIFO, a device) planted
at ``.lock`` never makes the tool truncate or write another file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from cloudbackup.core.errors import ConfigError, LockHeld
from cloudbackup.fs.dirs import Dir

LOCK_NAME = ".lock"
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class DirLock:
    def __init__(self, local_dir: Path) -> None:
        self.path = local_dir / LOCK_NAME
        self.fd: int | None = None

    def _open(self) -> int:
        local_dir = self.path.parent
        try:
            with Dir.root(local_dir, create=True) as root:
                fd = os.open(LOCK_NAME, _FLAGS, 0o600, dir_fd=root.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(
                    f"cannot use the local dir {local_dir}: {self.path} is a symlink",
                    f"the lock file is never followed through a link; remove {self.path}",
                ) from None
            raise ConfigError(
                f"cannot use the local dir {local_dir}: {exc.strerror}",
                "set CLOUDBACKUP_LOCAL_DIR to a writable directory",
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(
                f"cannot use the local dir {local_dir}: {self.path} is not a regular file",
                f"remove {self.path}",
            )
        return fd

    def acquire(self) -> DirLock:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
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
