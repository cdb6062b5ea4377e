"""Trees by directory descriptor: no path below a root is ever resolved by the kernel.

Every directory is opened relative to its parent's descriptor with ``O_NOFOLLOW |
O_DIRECTORY`` and checked against the ``(st_dev, st_ino)`` its parent's listing showed, so a
directory swapped for a symlink (or for another directory) while a tree is walked is never
followed. Files are opened, stat'ed and read-linked relative to their directory's descriptor.

A ``DirHandle`` stands for one directory; every file entry keeps its directory's handle, and
the archive writer and the read-ahead helper open files through it. Descriptors are bounded:
a ``DirTable`` keeps at most ``capacity`` of them open (least recently used closed first), and
a handle whose descriptor was closed reopens it by name from its nearest open ancestor,
checking every ``(st_dev, st_ino)`` on the way down; a directory that is no longer the one the
walk saw raises ``Replaced``. A handle's descriptor is closed when the handle is evicted or
when nothing refers to it any more (CPython frees it at once), so neither depth nor the number
of entries in flight raises the number of open descriptors.

Every algorithm here is iterative: no depth of tree exhausts the Python stack.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "DIR_FLAGS",
    "DirCursor",
    "DirHandle",
    "DirTable",
    "FileEntry",
    "Replaced",
    "ENTER",
    "LEAVE",
    "OTHER",
    "Visit",
    "default_capacity",
    "identity",
    "open_parent",
    "visit_tree",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", 0) | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors of an open by name that mean "this name is no longer the directory we saw".
_GONE_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR}


class Replaced(FileNotFoundError):
    """A directory is no longer the one the walk saw (moved, replaced, or now a symlink).

    A FileNotFoundError: for the archive it is churn, like a file that vanished.
    """

    def __init__(self, path: str, detail: str = "replaced during the walk") -> None:
        super().__init__(errno.ENOENT, detail, path)


def default_capacity() -> int:
    """Open directory descriptors per table: an eighth of the soft ``RLIMIT_NOFILE``
    (cron and systemd commonly give 1,024), between 16 and 256."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(16, min(256, soft // 8))


class DirTable:
    """The open descriptors of one tree's directories, at most ``capacity`` of them.

    The table refers to its handles weakly: a handle that nothing else refers to closes its
    own descriptor. All changes to descriptors and pins happen under ``lock`` (the archive
    writer and the read-ahead helper share handles).
    """

    def __init__(self, root: str, capacity: int | None = None) -> None:
        self.root = root  # the root's path, for messages only
        self.capacity = max(4, capacity if capacity is not None else default_capacity())
        self.lock = threading.RLock()
        self._open: OrderedDict[int, weakref.ref[DirHandle]] = OrderedDict()

    def open_root(self, *, follow: bool = False, fd: int | None = None) -> DirHandle:
        """The root's handle (pinned for its lifetime, never evicted). Raises OSError.

        ``follow`` allows the root itself to be a symlink; the default refuses one. ``fd``:
        a directory already open (duplicated: the caller keeps its own) is the root, and
        ``root`` only names it in messages.
        """
        if fd is not None:
            fd = os.dup(fd)
        else:
            fd = os.open(self.root, DIR_FLAGS & ~os.O_NOFOLLOW if follow else DIR_FLAGS)
        handle = DirHandle(self, None, "", *identity(fd))
        handle.fd = fd
        handle.pins = 1
        return handle

    def open_count(self) -> int:
        """Descriptors held by live handles other than the root (for tests)."""
        with self.lock:
            return sum(1 for ref in self._open.values() if (h := ref()) is not None and h.fd)

    def _register(self, handle: DirHandle, fd: int) -> None:
        """Record ``handle``'s new descriptor; close the least recently used beyond capacity."""
        handle.fd = fd
        key = id(handle)
        self._open[key] = weakref.ref(handle)
        self._open.move_to_end(key)  # the key of a dead handle may have been reused
        excess = len(self._open) - self.capacity
        if excess <= 0:
            return
        victims: list[tuple[int, DirHandle | None]] = []
        for other_key, ref in self._open.items():
            other = ref()
            if other is None or other.fd is None or not other.pins:
                victims.append((other_key, other))
                if len(victims) >= excess:
                    break
        for other_key, other in victims:
            del self._open[other_key]
            if other is not None and other.fd is not None:
                fd_, other.fd = other.fd, None
                os.close(fd_)

    def _touch(self, handle: DirHandle) -> None:
        key = id(handle)
        if key in self._open:
            self._open.move_to_end(key)

    def _reopen(self, handle: DirHandle, hint: DirHandle | None) -> int:
        """Open ``handle`` again and register it; raises Replaced or OSError.

        Two routes, the shorter first: up from ``hint`` (an open descendant, usually the
        directory the caller used last) through ``..``, or down from the nearest open
        ancestor by name. Every directory on the way must have the identity the walk saw,
        so neither route can lead anywhere else. Intermediate levels are opened only for
        the way through (registering them would evict directories still in use).
        """
        up: list[DirHandle] | None = None
        if hint is not None and hint.fd is not None:
            chain: list[DirHandle] = []
            current: DirHandle | None = hint
            while current is not None and current is not handle:
                chain.append(current)
                current = current.parent
            if current is handle:
                up = chain  # hint, its parent, ..., the child of ``handle``
        down: list[DirHandle] = []
        current = handle
        while current.fd is None and (up is None or len(down) <= len(up)):
            down.append(current)
            assert current.parent is not None  # the root is never closed while alive
            current = current.parent
        fd: int | None = None
        climbed = up is not None and (current.fd is None or len(up) < len(down))
        if climbed:
            assert up is not None
            fd = _climb(up, handle)
        if fd is None:
            while current.fd is None:
                down.append(current)
                assert current.parent is not None
                current = current.parent
            try:
                fd = _descend(current, down)
            except Replaced:
                # Its name now leads elsewhere; from the directory in use, ".." may still
                # lead to it (moved, not replaced).
                fd = _climb(up, handle) if up is not None and not climbed else None
                if fd is None:
                    raise
        self._register(handle, fd)
        return fd


def _climb(chain: list[DirHandle], target: DirHandle) -> int | None:
    """``target``'s descriptor reached by ``..`` from ``chain[0]`` (open) through the rest of
    ``chain`` (its ancestors below ``target``); None when a level is not the one expected."""
    fd = chain[0].fd
    assert fd is not None
    owned = False  # whether ``fd`` is a transient descriptor of ours
    for level in [*chain[1:], target]:
        if level.fd is not None and level is not target:
            if owned:
                os.close(fd)
            fd, owned = level.fd, False
            continue
        parent = open_parent(fd, (level.dev, level.ino))
        if owned:
            os.close(fd)
        if parent is None:
            return None
        fd, owned = parent, True
    return fd


def _descend(ancestor: DirHandle, chain: list[DirHandle]) -> int:
    """The descriptor of ``chain[0]``, opened by name from ``ancestor`` (open) down through
    ``chain`` (``chain[-1]`` is a child of ``ancestor``)."""
    fd = ancestor.fd
    assert fd is not None
    owned = False
    for level in reversed(chain):
        try:
            child = _open_dir(level.name, fd, level)
        finally:
            if owned:
                os.close(fd)
        fd, owned = child, True
    return fd


def identity(fd: int) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of an open descriptor, which is closed if fstat fails."""
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return st.st_dev, st.st_ino


def open_parent(fd: int, expected: tuple[int, int]) -> int | None:
    """A new descriptor of ``..`` of the directory ``fd`` when that is the directory
    ``expected`` (``(st_dev, st_ino)``), else None. ``..`` is never a symlink; the check
    makes sure a directory moved elsewhere does not lead anywhere new."""
    try:
        parent = os.open("..", DIR_FLAGS, dir_fd=fd)
    except OSError:
        return None
    if identity(parent) != expected:
        os.close(parent)
        return None
    return parent


def _open_dir(name: str, dir_fd: int, expected: DirHandle) -> int:
    """Open ``name`` in ``dir_fd`` as the directory ``expected`` stands for, or raise Replaced."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            raise Replaced(expected.path) from None
        raise
    if identity(fd) != (expected.dev, expected.ino):
        os.close(fd)
        raise Replaced(expected.path)
    return fd


class DirHandle:
    """One directory of a walked tree: its name in its parent, identity and descriptor.

    ``pin()`` returns a descriptor that stays open until the matching ``unpin()``; between
    the two the table never closes it. The descriptor is reopened on demand (see DirTable).
    """

    __slots__ = ("__weakref__", "dev", "fd", "ino", "name", "parent", "pins", "table")

    def __init__(
        self, table: DirTable, parent: DirHandle | None, name: str, dev: int, ino: int
    ) -> None:
        self.table = table
        self.parent = parent
        self.name = name
        self.dev = dev
        self.ino = ino
        self.fd: int | None = None
        self.pins = 0

    def __repr__(self) -> str:
        return f"DirHandle({self.path!r})"

    def __del__(self) -> None:
        # Nothing can be using the descriptor: a pin needs a reference to the handle.
        fd = self.fd
        if fd is not None:
            self.fd = None
            try:
                os.close(fd)
            except (OSError, TypeError):  # TypeError: interpreter shutdown
                pass

    @property
    def path(self) -> str:
        """The directory's path, for messages (never used to open anything)."""
        names: list[str] = []
        current: DirHandle | None = self
        while current is not None and current.parent is not None:
            names.append(current.name)
            current = current.parent
        return "/".join([self.table.root, *reversed(names)]) if names else self.table.root

    def pin(self, hint: DirHandle | None = None) -> int:
        """This directory's descriptor, open until ``unpin()``; raises Replaced or OSError.

        ``hint``: a pinned handle the caller used last, from which a closed descriptor may
        be reopened faster (see DirTable._reopen).
        """
        table = self.table
        with table.lock:
            fd = self.fd
            if fd is None:
                fd = table._reopen(self, hint)
            else:
                table._touch(self)
            self.pins += 1
            return fd

    def unpin(self) -> None:
        with self.table.lock:
            self.pins -= 1

    def open_child(self, name: str, st: os.stat_result, dir_fd: int) -> DirHandle:
        """Open subdirectory ``name`` (``dir_fd`` is this directory's pinned descriptor),
        checking it is the directory ``st`` describes; raises Replaced or OSError."""
        child = DirHandle(self.table, self, name, st.st_dev, st.st_ino)
        fd = _open_dir(name, dir_fd, child)
        with self.table.lock:
            self.table._register(child, fd)
        return child

    def child_path(self, name: str) -> str:
        return f"{self.path}/{name}"


class DirCursor:
    """One thread's pinned directory: consecutive entries of a directory share one pin."""

    __slots__ = ("fd", "handle")

    def __init__(self) -> None:
        self.handle: DirHandle | None = None
        self.fd = -1

    def fd_for(self, handle: DirHandle) -> int:
        if handle is not self.handle:
            fd = handle.pin(self.handle)  # the old one stays pinned: it may be the way back
            self.release()
            self.handle, self.fd = handle, fd
        return self.fd

    def release(self) -> None:
        if self.handle is not None:
            self.handle.unpin()
            self.handle = None
            self.fd = -1


class FileEntry:
    """A filesystem object to archive: its member name, ``lstat`` and how to open it.

    Walked entries are opened as ``name`` relative to ``parent`` (a DirHandle); a
    directory's own handle is ``handle``. A standalone file (a spooled database copy) has
    no parent and is opened by ``path``. ``path`` is otherwise for messages only.
    """

    __slots__ = ("_path", "arcname", "carry", "handle", "name", "parent", "st")

    def __init__(
        self,
        path: str | None,
        arcname: str,
        st: os.stat_result,
        parent: DirHandle | None = None,
        name: str = "",
        handle: DirHandle | None = None,
    ) -> None:
        self._path = path
        self.arcname = arcname
        self.st = st
        self.parent = parent
        self.name = name
        self.handle = handle
        #: An incremental backup's record of this path in its parent's index when the path
        #: is unchanged: the writer indexes it without archiving it again.
        self.carry: Any = None

    @property
    def path(self) -> str:
        if self._path is None:
            root = self.parent.table.root if self.parent is not None else ""
            self._path = f"{root}/{self.arcname}"
        return self._path

    def __repr__(self) -> str:
        return f"FileEntry({self.arcname!r})"


# ---------------------------------------------------------------- a plain iterative visit

ENTER, LEAVE, OTHER = "enter", "leave", "other"


class Visit(NamedTuple):
    """One step of ``visit_tree``: ``fd`` is the pinned descriptor of the directory that
    holds ``name`` (valid until the next step). ``kind`` is ENTER (a directory, before its
    contents), LEAVE (the same directory, after them) or OTHER (anything else)."""

    kind: str
    fd: int
    name: str
    st: os.stat_result
    parent: DirHandle


@dataclass
class _Level:
    handle: DirHandle
    names: list[str]
    index: int = 0
    entered: list[os.stat_result] = field(default_factory=list)


def visit_tree(
    root: str,
    *,
    root_fd: int | None = None,
    make_accessible: bool = False,
    onerror: Callable[[OSError], None] | None = None,
) -> Iterator[Visit]:
    """Every object below ``root`` (not ``root`` itself), depth first, iteratively, never
    following a symlink, with a bounded number of open descriptors. ``root_fd``: the root
    is that open directory (``root`` only names it), never opened by name.

    ``make_accessible`` (for removing a restored tree) gives each directory mode 0700
    before listing it, so a read-only restored directory can be emptied. Raises OSError
    when ``root`` cannot be opened. A directory that cannot be opened or listed (or was
    replaced, see Replaced) raises, or with ``onerror`` is reported there and skipped
    (no LEAVE for it).
    """
    table = DirTable(root)
    top = table.open_root(fd=root_fd)
    cursor = DirCursor()
    try:
        if make_accessible:
            _chmod_fd(top.fd)
        assert top.fd is not None
        stack = [_Level(top, os.listdir(top.fd))]
        while stack:
            level = stack[-1]
            if level.index == len(level.names):
                stack.pop()
                if stack:
                    parent = stack[-1]
                    fd = cursor.fd_for(parent.handle)
                    yield Visit(LEAVE, fd, level.handle.name, parent.entered.pop(), parent.handle)
                continue
            name = level.names[level.index]
            level.index += 1
            fd = cursor.fd_for(level.handle)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                yield Visit(OTHER, fd, name, st, level.handle)
                continue
            yield Visit(ENTER, fd, name, st, level.handle)
            try:
                fd = cursor.fd_for(level.handle)  # the consumer may have used other handles
                try:
                    child = level.handle.open_child(name, st, fd)
                except PermissionError:
                    if not make_accessible:
                        raise
                    _chmod_at(fd, name, st)
                    child = level.handle.open_child(name, st, fd)
                child_fd = cursor.fd_for(child)
                if make_accessible:
                    _chmod_fd(child_fd)
                names = os.listdir(child_fd)
            except OSError as exc:
                if onerror is None:
                    raise
                onerror(exc)
                continue
            level.entered.append(st)
            stack.append(_Level(child, names))
    finally:
        cursor.release()


def _chmod_fd(fd: int | None) -> None:
    assert fd is not None
    try:
        os.fchmod(fd, 0o700)
    except OSError:
        pass


def _chmod_at(dir_fd: int, name: str, st: os.stat_result) -> None:
    """chmod 0700 the directory ``name`` that cannot be opened for reading, through an
    O_PATH descriptor (never following a symlink), when it is still the one ``st`` shows."""
    fd = os.open(name, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)
