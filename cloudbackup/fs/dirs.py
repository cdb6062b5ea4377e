"""Directories others can write to (the local dir, a directory destination), by descriptor.

A :class:`Dir` is an open directory. Only the root it starts from is opened by path (the
operator configured it); every directory below is opened relative to its parent's
descriptor with ``O_NOFOLLOW | O_DIRECTORY`` (created with ``mkdirat`` when asked), so a
symlink planted anywhere below the root is never followed: opening it fails with
:class:`NotFollowed`. Files are created with a random name (``O_CREAT | O_EXCL |
O_NOFOLLOW``), written, fsynced, then published under their final name without overwriting
anything (``renameat2(RENAME_NOREPLACE)``, else a hard link) — or replacing it, for state
files — and the directory is fsynced, so a name is either absent or complete.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Names this module gives its temporary files: never a valid key or backup file name.
TEMP_PREFIX = ".~tmp-"
_RENAME_NOREPLACE = 1
# Errors of renameat2/link meaning "this filesystem cannot do that": try the next way.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[..., int] = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    return function


_renameat2 = _load_renameat2()


class NotFollowed(OSError):
    """A name below a root that is a symlink (or not a directory) where a directory must be:
    it is never followed."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ELOOP, "a symlink or not a directory (never followed)", path)


def check_name(name: str) -> str:
    """One path component: not empty, not ``.`` or ``..``, no ``/`` or NUL."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"bad path component {name!r}")
    return name


class Dir:
    """An open directory; ``path`` is for messages only (nothing is opened by it)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    # -- opening

    @classmethod
    def root(cls, path: Path, *, create: bool = False) -> Dir:
        """The configured root itself (it may be a symlink: the operator chose it);
        ``create`` makes it and its parents first."""
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    def sub(self, name: str, *, create: bool = False) -> Dir:
        """The directory ``name`` in this one, never through a symlink; ``create`` makes it
        (mkdirat) when it is missing. Raises FileNotFoundError or :class:`NotFollowed`."""
        check_name(name)
        while True:
            try:
                return Dir(os.open(name, DIR_FLAGS, dir_fd=self.fd), self.path / name)
            except FileNotFoundError:
                if not create:
                    raise
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotFollowed(str(self.path / name)) from None
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=self.fd)
            except FileExistsError:
                pass  # made meanwhile (or a symlink planted meanwhile: the open says which)

    def descend(self, names: list[str] | tuple[str, ...], *, create: bool = False) -> Dir:
        """The directory at ``names`` below this one, component by component; a new
        :class:`Dir` the caller closes (this one stays open)."""
        current = Dir(os.dup(self.fd), self.path)
        try:
            for name in names:
                child = current.sub(name, create=create)
                current.close()
                current = child
        except BaseException:
            current.close()
            raise
        return current

    # -- reading

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry itself (a symlink is not followed); None when there is none."""
        try:
            return os.stat(check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """Every entry and its lstat, sorted by name (entries vanishing meanwhile skipped)."""
        found = []
        for name in sorted(os.listdir(self.fd)):
            st = self.lstat(name)
            if st is not None:
                found.append((name, st))
        return found

    def open_file(self, name: str) -> io.FileIO:
        """Open a regular file for reading, never through a symlink (nor blocking on a
        FIFO planted in its place); anything else raises OSError."""
        fd = os.open(
            check_name(name),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
            dir_fd=self.fd,
        )
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
        os.set_blocking(fd, True)
        return io.FileIO(fd, "rb", closefd=True)

    def read_file(self, name: str, limit: int | None = None) -> bytes:
        """A regular file's content (at most ``limit`` bytes when given)."""
        with self.open_file(name) as handle:
            return handle.read() if limit is None else handle.read(limit)

    # -- writing

    def create(self, name: str, mode: int = 0o600) -> int:
        """A new file named ``name`` (fails if anything, a symlink included, has that name);
        returns its write descriptor."""
        return os.open(
            check_name(name),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=self.fd,
        )

    def create_temp(self, mode: int = 0o600, *, suffix: str = "") -> tuple[str, int]:
        """A new file with a random name (:data:`TEMP_PREFIX`); (name, write descriptor)."""
        while True:
            name = f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"
            try:
                return name, self.create(name, mode)
            except FileExistsError:
                continue

    def publish(self, temp: str, name: str, *, replace: bool = False) -> None:
        """Give the complete file ``temp`` its final ``name``. Without ``replace`` an
        existing ``name`` (whatever it is) is never overwritten: FileExistsError."""
        check_name(temp)
        check_name(name)
        if replace:
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            rename_noreplace(self.fd, temp, self.fd, name, str(self.path / name))

    def unlink(self, name: str, *, missing_ok: bool = True) -> None:
        try:
            os.unlink(check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self, name: str) -> None:
        os.rmdir(check_name(name), dir_fd=self.fd)

    def fsync(self, *, best_effort: bool = False) -> None:
        """Make the names in this directory durable (``best_effort``: ignore filesystems
        that refuse to fsync a directory)."""
        try:
            os.fsync(self.fd)
        except OSError:
            if not best_effort:
                raise

    def write_atomic(
        self, name: str, data: bytes, *, mode: int = 0o600, replace: bool = False
    ) -> None:
        """temp file → write → fsync → publish (no overwrite unless ``replace``) → fsync
        the directory; the file has exactly ``mode``. On failure nothing is left under a
        new name."""
        temp, fd = self.create_temp(mode)
        try:
            try:
                os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.publish(temp, name, replace=replace)
        except BaseException:
            self.unlink(temp)
            raise
        self.fsync()

    # -- lifetime

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dir({str(self.path)!r}, fd={self.fd})"


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str, shown: str) -> None:
    """Rename without ever replacing ``dst``: ``renameat2(RENAME_NOREPLACE)``; where the
    filesystem lacks it (NFS, some FUSE), a hard link then the removal of ``src``; where it
    lacks both, a check then a rename (only that last way can race another writer)."""
    if _renameat2 is not None:
        if _renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), shown)
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        if _exists(dst_fd, dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown) from None
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    os.unlink(src, dir_fd=src_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def walk_files(
    top: Dir,
    *,
    max_depth: int,
    skip: Callable[[int, str], bool] = lambda depth, name: False,
) -> Iterator[tuple[tuple[str, ...], str, os.stat_result]]:
    """Every regular file below ``top`` (lstat: no symlink is followed or reported), at most
    ``max_depth`` directories down, in sorted order: ``(directory names, name, stat)``.

    Iterative; at most ``max_depth`` descriptors are open at once. ``skip(depth, name)``
    leaves an entry out (depth 0: the entries of ``top``). Directories that cannot be
    opened (vanished, replaced by a link, unreadable) are skipped.
    """
    stack: list[tuple[Dir | None, tuple[str, ...], Iterator[tuple[str, os.stat_result]]]] = [
        (None, (), iter(top.entries()))
    ]
    try:
        while stack:
            directory, rel, entries = stack[-1]
            current = directory or top
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if directory is not None:
                    directory.close()
                continue
            name, st = entry
            if skip(len(rel), name):
                continue
            if stat.S_ISREG(st.st_mode):
                yield rel, name, st
            elif stat.S_ISDIR(st.st_mode) and len(rel) < max_depth:
                try:
                    child = current.sub(name)
                except OSError:
                    continue
                try:
                    listed = child.entries()
                except OSError:
                    child.close()
                    continue
                stack.append((child, (*rel, name), iter(listed)))
    finally:
        for directory, _, _ in stack:
            if directory is not None:
                directory.close()
