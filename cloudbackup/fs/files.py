"""Files of restore targets and spools: directory fsync, private files, and opening a file
never through a symlink. (Atomic writes into a directory others can write are ``fs.dirs``'s.)"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path


def fsync_dir(path: Path, *, best_effort: bool = False) -> None:
    """Make a rename in ``path`` durable; ``best_effort`` ignores filesystems that refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def open_regular(path: Path) -> io.FileIO:
    """Open a file of the local dir for reading: never through a symlink (the local dir can
    be written by others: a planted link must not make us read, upload or restore the file
    it points to), and only a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return io.FileIO(fd, "rb", closefd=True)


def create_private(path: Path) -> None:
    """Create an empty file only its owner can read (fails if it already exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.close(fd)
