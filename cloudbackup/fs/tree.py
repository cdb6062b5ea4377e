"""Whole trees by directory descriptor: opening a directory without following a symlink on
the way, ``rm -rf`` (read-only directories included) and a count of what is on disk.
Iterative: any depth, any path length, no symlink followed."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cloudbackup.fs.walk import DIR_FLAGS, LEAVE, OTHER, DirCursor, DirTable, visit_tree

#: What opening a symlink with O_NOFOLLOW | O_DIRECTORY gives (ELOOP or ENOTDIR).
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)


class LinkInPath(OSError):
    """A component of a path that is walked without following symlinks is one."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ELOOP, "a symlink where a directory belongs (never followed)", path)


def open_directory(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """A descriptor of the directory ``path``, opened component by component from ``/``,
    each with ``O_NOFOLLOW``: a symlink anywhere on the way raises LinkInPath (naming it)
    and is never followed. ``create`` makes missing components (``mkdir -p``: mode 0777
    less the umask). Other failures raise OSError naming the component. ``path`` is made
    absolute lexically (``..`` is resolved by name, never through a link)."""
    text = os.path.abspath(os.fspath(path))
    fd = os.open("/", DIR_FLAGS)
    walked = ""
    try:
        for name in text.split("/"):
            if not name:
                continue
            walked += "/" + name
            child = _open_component(fd, name, walked, create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_component(parent: int, name: str, walked: str, create: bool) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), walked) from None
    except OSError as exc:
        raise _component_error(exc, parent, name, walked) from None
    try:
        os.mkdir(name, 0o777, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile: opened below like any other
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, walked) from None
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _component_error(exc, parent, name, walked) from None


def _component_error(exc: OSError, parent: int, name: str, walked: str) -> OSError:
    if exc.errno in _NOT_A_DIR:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                return LinkInPath(walked)
    return OSError(exc.errno, exc.strerror, walked)


def remove_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """``rm -rf`` that also removes read-only directories a restored tree may contain.

    Best effort, like ``rm -rf`` (what cannot be removed stays); iterative and by directory
    descriptor, so no depth or path length stops it and no symlink is ever followed (a
    symlink at ``path`` itself is removed, not followed). ``dir_fd``: ``path`` is relative
    to that directory.
    """
    try:
        fd = os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in _NOT_A_DIR:  # not a directory: remove the name
            with contextlib.suppress(OSError):
                os.unlink(path, dir_fd=dir_fd)
        return
    try:
        empty_tree(fd, os.fspath(path))
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path, dir_fd=dir_fd)


def empty_tree(fd: int, label: str = "") -> None:
    """Remove everything below the open directory ``fd`` (best effort, as remove_tree);
    ``label`` names it in messages."""
    try:
        for visit in visit_tree(
            label or f"/proc/self/fd/{fd}",
            root_fd=fd,
            make_accessible=True,
            onerror=lambda exc: None,
        ):
            try:
                if visit.kind == LEAVE:
                    os.rmdir(visit.name, dir_fd=visit.fd)
                elif visit.kind == OTHER:
                    os.unlink(visit.name, dir_fd=visit.fd)
            except OSError:
                pass
    except OSError:
        return


@dataclass
class Tally:
    files: int = 0  # non-directory entries
    bytes: int = 0  # regular-file bytes, each inode once
    dirs: int = 0


def tally_tree(root: Path | int) -> Tally:
    """Count what is on disk under ``root`` (a path, or an open directory's descriptor; no
    symlink followed): the restore's own check.

    Iterative and by directory descriptor (``DirTable``: bounded descriptors, each directory
    checked to be the one listed): any depth, any path length. Each directory is listed once
    with ``scandir`` and its entries judged by their type in the listing: only regular files
    (their size, their links) and directories (their identity) are stat'ed.
    """
    tally = Tally()
    seen: set[tuple[int, int]] = set()
    if isinstance(root, int):
        top = DirTable(f"/proc/self/fd/{root}").open_root(fd=root)
    else:
        top = DirTable(os.fspath(root)).open_root()
    cursor = DirCursor()
    try:
        pending = [(top, _tally_listing(cursor.fd_for(top), tally, seen))]
        while pending:
            handle, subdirs = pending[-1]
            if not subdirs:
                pending.pop()
                continue
            name, st = subdirs.pop()
            tally.dirs += 1
            child = handle.open_child(name, st, cursor.fd_for(handle))
            pending.append((child, _tally_listing(cursor.fd_for(child), tally, seen)))
    finally:
        cursor.release()
    return tally


def _tally_listing(
    fd: int, tally: Tally, seen: set[tuple[int, int]]
) -> list[tuple[str, os.stat_result]]:
    """Count the entries of the directory ``fd`` but its subdirectories, which are returned
    (name and what ``lstat`` says of each). ``fd`` stays open meanwhile (entries are stat'ed
    through it)."""
    subdirs: list[tuple[str, os.stat_result]] = []
    files = size = 0
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append((entry.name, st))
                        continue
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                else:
                    files += 1  # a symlink (or a device, a FIFO): counted, not stat'ed
                    continue
            except FileNotFoundError:
                continue  # gone since it was listed
            files += 1
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen:
                        continue
                    seen.add(ident)
                size += st.st_size
    tally.files += files
    tally.bytes += size
    return subdirs
