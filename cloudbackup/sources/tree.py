"""What tree sources (directory, glob) share: the walk, by directory descriptor, iterative,
never following a symlink (see cloudbackup.fs.walk), and a base class."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cloudbackup.core.errors import SourceError
from cloudbackup.fs.walk import DirCursor, DirHandle, DirTable, FileEntry
from cloudbackup.sources.base import RestoreAs, Source, SourceContext

LOG = logging.getLogger("cloudbackup")

_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG
_S_IFDIR = stat.S_IFDIR
_S_IFLNK = stat.S_IFLNK


def _is_special(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _open_root(root: str, fd: int | None = None) -> DirHandle:
    """The walk's root: ``fd`` when the source opened it (a glob's prefix, opened without
    following a link on the way), else opened once by path (a symlink there was resolved
    by the source)."""
    try:
        return DirTable(root).open_root(fd=fd)
    except FileNotFoundError:
        raise SourceError(
            f"source path {root} does not exist", "check the path or the mount"
        ) from None
    except PermissionError:
        raise SourceError(
            f"source path {root} is not readable", "run as a user who can read it"
        ) from None
    except OSError as exc:
        # O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR (or ELOOP) rather than a follow.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise SourceError(
                f"source path {root} was replaced by a symlink since it was resolved",
                "check the path",
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise SourceError(
                f"source path {root} is not a directory", "give a directory or a glob"
            ) from None
        raise SourceError(f"source path {root}: {exc.strerror}", "check the path") from None


@dataclass
class _Level:
    """One directory on the walk's stack: its handle, sorted names and entry (glob mode)."""

    handle: DirHandle
    names: list[str]
    entry: FileEntry | None
    index: int = 0


# A level's state is kept in locals while its names are read.
# Long: the walk's one loop, on the hot path (no call of ours per entry or per level).
def walk_tree(
    root: str,
    ctx: SourceContext,
    *,
    select: Callable[[str], bool] | None = None,
    root_fd: int | None = None,
) -> Iterator[FileEntry]:
    """Depth-first and sorted, by directory descriptor, iterative, never following symlinks.

    Every directory is opened relative to its parent with O_NOFOLLOW and must be the
    directory the parent's listing showed; one that was swapped (for a symlink or anything
    else) is skipped with a warning. ``select`` filters non-directories (glob sources);
    parent directories of selected entries are emitted before them. Holds one name list
    per level and a bounded number of descriptors (see cloudbackup.fs.walk), whatever the depth.
    ``root_fd``: the root is that open directory (``root`` names it), never reopened by name.
    """
    top = _open_root(root, root_fd)
    warn = ctx.warn
    exclude = ctx.exclude if ctx.exclude else None
    skip = ctx.skip_inodes
    explain = LOG.isEnabledFor(logging.DEBUG)  # -v: what the walk leaves out, and why
    visited: set[tuple[int, int]] = {(top.dev, top.ino)}
    pending: list[FileEntry] = []  # glob mode: directories of the current path not yet emitted
    cursor = DirCursor()
    lstat = os.lstat
    try:
        try:
            names = sorted(os.listdir(cursor.fd_for(top)))
        except OSError as exc:
            warn("unreadable", f"{root}: cannot list directory ({exc.strerror})")
            return
        stack = [_Level(top, names, None)]
        rel = ""  # the member name of the directory on top of the stack
        while stack:
            level = stack[-1]
            handle = level.handle
            names = level.names
            index = level.index
            count = len(names)
            fd = -1  # the directory's descriptor, pinned by ``cursor`` once asked for
            descended = False
            while index < count:
                name = names[index]
                index += 1
                arcname = f"{rel}/{name}" if rel else name
                if exclude is not None and exclude.matches_child(arcname, name):
                    if explain:
                        LOG.debug(
                            "%s: excluded (CLOUDBACKUP_EXCLUDE, --exclude)",
                            handle.child_path(name),
                        )
                    continue
                if fd < 0:
                    try:
                        fd = cursor.fd_for(handle)
                    except OSError as exc:
                        # Its descriptor had been closed (bounded window) and it moved since.
                        gone = isinstance(exc, FileNotFoundError)
                        warn(
                            "vanished" if gone else "unreadable",
                            f"{handle.path}: "
                            + (
                                "replaced during the walk"
                                if gone
                                else f"cannot reopen ({exc.strerror})"
                            )
                            + "; the rest of it skipped",
                        )
                        index = count
                        break
                try:
                    st = lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    warn("vanished", f"{handle.child_path(name)}: vanished while reading")
                    continue
                except OSError as exc:
                    warn("unreadable", f"{handle.child_path(name)}: cannot stat ({exc.strerror})")
                    continue
                if skip and (st.st_dev, st.st_ino) in skip:
                    if explain:
                        LOG.debug(
                            "%s: skipped (the local dir, the log or the .env file)",
                            handle.child_path(name),
                        )
                    continue
                mode = st.st_mode
                kind = mode & _S_IFMT
                if kind != _S_IFDIR and (
                    kind == _S_IFREG or kind == _S_IFLNK or not _is_special(mode)
                ):
                    if select is not None:
                        if not select(arcname):
                            continue
                        if pending:
                            yield from pending
                            pending.clear()
                    yield FileEntry(None, arcname, st, handle, name)
                    continue
                if kind != _S_IFDIR:
                    warn("skipped", f"{handle.child_path(name)}: {_kind_name(mode)} skipped")
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    warn(
                        "skipped",
                        f"{handle.child_path(name)}: directory loop (bind mount?) skipped",
                    )
                    continue
                visited.add(key)
                try:
                    child = handle.open_child(name, st, fd)
                except FileNotFoundError:
                    warn(
                        "vanished",
                        f"{handle.child_path(name)}: replaced during the walk; "
                        "skipped (never followed)",
                    )
                    continue
                except OSError as exc:
                    entry = FileEntry(None, arcname, st, handle, name)
                    warn("unreadable", f"{entry.path}: cannot list directory ({exc.strerror})")
                    if select is None:
                        yield entry
                    continue
                entry = FileEntry(None, arcname, st, handle, name, child)
                if select is None:
                    yield entry
                else:
                    pending.append(entry)
                fd = -1  # the cursor moves to the child
                try:
                    child_names = sorted(os.listdir(cursor.fd_for(child)))
                except OSError as exc:
                    gone = isinstance(exc, FileNotFoundError)
                    warn(
                        "vanished" if gone else "unreadable",
                        f"{entry.path}: "
                        + ("replaced during the walk" if gone else "cannot list directory")
                        + ("" if gone else f" ({exc.strerror})"),
                    )
                    if pending and pending[-1] is entry:
                        pending.pop()
                    continue
                stack.append(_Level(child, child_names, entry))
                rel = arcname
                descended = True
                break
            level.index = index
            if descended:
                continue
            stack.pop()
            if pending and pending[-1] is level.entry:
                pending.pop()
            rel = rel[: len(rel) - len(handle.name) - 1] if len(stack) > 1 else ""
    finally:
        cursor.release()


class TreeSource(Source):
    """A tree of files in place: walked, every file counted by the shrink guard, read ahead
    by the writer, surveyed for a dry run, and restored into a directory."""

    restore_as = RestoreAs.TREE
    counts_files = True
    prefetch = True
    chain_capable = True

    def survey(self, ctx: SourceContext) -> tuple[int, int] | None:
        files = size = 0
        for entry in self.entries(ctx):
            if not stat.S_ISDIR(entry.st.st_mode):
                files += 1
                if stat.S_ISREG(entry.st.st_mode):
                    size += entry.st.st_size
        return files, size
