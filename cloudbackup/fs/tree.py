"""Whole trees by directory descriptor: ``rm -rf`` (read-only directories included) and a
count of what is on disk. Iterative: any depth, any path length, no symlink followed."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cloudbackup.fs.walk import ENTER, LEAVE, OTHER, visit_tree


def remove_tree(path: Path) -> None:
    """``rm -rf`` that also removes read-only directories a restored tree may contain.

    Best effort, like ``rm -rf`` (what cannot be removed stays); iterative and by directory
    descriptor, so no depth or path length stops it and no symlink is ever followed.
    """
    top = os.fspath(path)
    try:
        for visit in visit_tree(top, make_accessible=True, onerror=lambda exc: None):
            try:
                if visit.kind == LEAVE:
                    os.rmdir(visit.name, dir_fd=visit.fd)
                elif visit.kind == OTHER:
                    os.unlink(visit.name, dir_fd=visit.fd)
            except OSError:
                pass
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # not a directory: remove the name
            with contextlib.suppress(OSError):
                os.unlink(top)
        return
    with contextlib.suppress(OSError):
        os.rmdir(top)


@dataclass
class Tally:
    files: int = 0  # non-directory entries
    bytes: int = 0  # regular-file bytes, each inode once
    dirs: int = 0


def tally_tree(root: Path) -> Tally:
    """Count what is on disk under ``root`` (no symlink followed): the restore's own check.

    Iterative and by directory descriptor: any depth, any path length.
    """
    tally = Tally()
    seen: set[tuple[int, int]] = set()
    for kind, _fd, _name, st, _parent in visit_tree(os.fspath(root)):
        if kind == ENTER:
            tally.dirs += 1
        elif kind == OTHER:
            tally.files += 1
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen:
                        continue
                    seen.add(ident)
                tally.bytes += st.st_size
    return tally
