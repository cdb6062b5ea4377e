"""A safe streaming tar extractor that never writes outside its target.

``tarfile`` is used only to *parse* the stream; none of its extraction code (nor its
extraction filters, whose bypasses were CVE-2025-4517, -4330 and -4138) is involved. Every
path is created component by component relative to directory file descriptors opened with
``O_NOFOLLOW``, so no path is ever resolved through a symlink; symlinks themselves are created
last, after every other member, with the same no-follow walk of their parents.

Member names that are absolute or contain ``..`` are refused, as are devices, FIFOs and hard
links that do not point at a regular file this run extracted; a refused member is reported in
``ExtractResult.refused`` and the rest is still extracted.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, NamedTuple, Protocol

from cloudbackup.core.errors import IntegrityError
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.fs import xattrs
from cloudbackup.fs.walk import default_capacity, identity, open_parent
from cloudbackup.stream.tarformat import XATTR_PREFIX, Header, Hints, TarReader, pax_time_ns

__all__ = ["CHUNK_SIZE", "ExtractResult", "extract"]

CHUNK_SIZE = 1 << 20
_DIR_FD_CACHE = 128
_REGTYPE = tarfile.REGTYPE
_GC_BATCH = 50_000
_CLIMB = 16  # at most this many ``..`` steps to reopen a directory (see _RealTree._climb)
_IMPLICIT_DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that concern one member (its name or its place in the tree), not the whole restore.
_MEMBER_ERRNOS = {errno.ENAMETOOLONG, errno.EILSEQ, errno.EMLINK, errno.EINVAL}
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup"

Parts = tuple[str, ...]


@dataclass
class ExtractResult:
    """What was extracted (or, on a dry run, would be)."""

    files: int = 0
    dirs: int = 0  # directories created, including parents of included members
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0  # regular file bytes written
    refused: list[str] = field(default_factory=list)
    skipped_not_included: int = 0
    warnings: list[str] = field(default_factory=list)  # e.g. an owner that could not be set
    #: Regular files written, then replaced by a later member of the same name (their
    #: bytes: those no other name keeps).
    replaced: int = 0
    replaced_bytes: int = 0

    def on_disk(self) -> tuple[int, int]:
        """(entries, bytes) this extraction left in its target: the files, symlinks and
        hard links written, less the ones a later member replaced; bytes of regular files,
        each inode once. What ``fs.tree.tally_tree`` would count in a target it alone
        wrote to, without listing it again."""
        entries = self.files + self.symlinks + self.hardlinks - self.replaced
        return entries, self.bytes - self.replaced_bytes


class _Attrs(NamedTuple):
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, member: Header) -> _Attrs:
        """The attributes of a member the reader let through (its numbers are in range:
        ``tarformat.member_problem``)."""
        pax = member.pax
        if not pax:
            mtime = member.mtime
            ns = mtime * 1_000_000_000 if type(mtime) is int else _ns(mtime)
            return cls(member.mode & 0o7777, ns, member.uid, member.gid)
        text = pax.get("mtime")
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if len(pax) > (text is not None):  # more than a sub-second mtime (the usual one)
            xattrs = tuple(
                (key[len(XATTR_PREFIX) :], value.encode("utf-8", "surrogateescape"))
                for key, value in pax.items()
                if key.startswith(XATTR_PREFIX)
            )
        mtime_ns = pax_time_ns(text) if text is not None else None
        if mtime_ns is None:
            mtime_ns = _ns(member.mtime)
        return cls(member.mode & 0o7777, mtime_ns, member.uid, member.gid, xattrs)


class _Refused(Exception):
    """One member cannot be extracted safely; the reason is the message."""


def _show(parts: Parts) -> str:
    return repr("/".join(parts))


class _Tree(Protocol):
    """Where members go: the real target, or a model of it for dry runs."""

    created_dirs: set[Parts]
    replaced: int  # regular files removed to make room for a later member of their name
    replaced_bytes: int

    def make_dir(self, parts: Parts) -> None: ...

    def write_file(self, parts: Parts, data: IO[bytes] | bytes | memoryview | None, size: int, attrs: _Attrs) -> int: ...

    def hard_link(self, source: Parts, parts: Parts) -> None: ...

    def symlink(self, parts: Parts, target: str, attrs: _Attrs) -> None: ...

    def finish_dir(self, parts: Parts, attrs: _Attrs | None) -> None: ...

    def close(self) -> None: ...


class _RealTree:
    """Writes under ``root`` through directory fds opened with O_NOFOLLOW, never by path.
    ``root`` is an open directory's descriptor (duplicated: the caller keeps its own), or a
    path, opened once (not through a symlink at its end)."""

    def __init__(
        self,
        root: Path | int,
        *,
        same_owner: bool,
        progress: Callable[[int], None] | None,
        warnings: list[str],
    ) -> None:
        self._root_fd = os.dup(root) if isinstance(root, int) else os.open(root, _DIR_FLAGS)
        self._fds: OrderedDict[Parts, int] = OrderedDict()
        self._capacity = min(_DIR_FD_CACHE, default_capacity())
        self._ids: dict[Parts, tuple[int, int]] = {}  # (st_dev, st_ino) of each dir opened
        self._last: Parts | None = None  # the directory _dir() returned last
        self._last_fd = -1  # ... and its descriptor (the newest in the LRU: never evicted)
        self._same_owner = same_owner
        self._mode_mask = 0o7777 if same_owner else 0o1777
        # Who owns what is created here (the group of a setgid directory, else ours), and
        # the umask: a file created with its mode already right needs no fchown or fchmod.
        root_st = os.fstat(self._root_fd)
        gid = root_st.st_gid if root_st.st_mode & stat.S_ISGID else os.getegid()
        self._created_owner = (os.geteuid(), gid)
        self._umask = _current_umask()
        self._progress = progress
        self._warnings = warnings
        # The namespaces the writer archives as this user (security.*, trusted.*: root).
        self._xattr_prefixes = xattrs.namespaces()
        self._xattr_failures: dict[str, tuple[int, str]] = {}  # reason -> (count, example)
        self.created_dirs: set[Parts] = set()
        self.replaced = self.replaced_bytes = 0
        self._unreported = 0  # bytes of small files written, not yet told to progress

    def close(self) -> None:
        if self._unreported and self._progress is not None:
            self._progress(self._unreported)
            self._unreported = 0
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._root_fd)
        for reason, (count, example) in self._xattr_failures.items():
            more = f" (and {count - 1} more)" if count > 1 else ""
            self._warnings.append(f"cannot set extended attribute {example}{more}: {reason}")

    def _dir(self, parts: Parts) -> int:
        """The fd of directory ``parts``, creating missing components; never follows a link.

        Iterative: from the nearest ancestor whose fd is cached (or the root), each
        component is created or opened relative to its parent. The returned fd stays valid
        until the next call (the cache is an LRU of at least 2).
        """
        if not parts:
            return self._root_fd
        if parts == self._last:  # most files: in the directory of the one before
            return self._last_fd
        fds = self._fds
        fd = fds.get(parts)
        if fd is None:
            fd = self._climb(parts)
        if fd is not None:
            fds.move_to_end(parts)
            self._last, self._last_fd = parts, fd
            return fd
        self._last = None  # the opens below may evict it (and fail before the end)
        depth = len(parts) - 1
        while depth and parts[:depth] not in fds:
            depth -= 1
        parent = self._root_fd
        if depth:
            parent = fds[parts[:depth]]
            fds.move_to_end(parts[:depth])
        for end in range(depth + 1, len(parts) + 1):
            parent = self._open_dir(parent, parts[:end])
        self._last, self._last_fd = parts, parent
        return parent

    def _climb(self, parts: Parts) -> int | None:
        """Reopen ``parts`` by ``..`` from the directory used last when that is a cached
        descendant a few levels down (archives list a deep tree's files on the way back up,
        which would otherwise reopen the whole path from the root for every level once the
        cache is full). Each level must be the directory opened before (same device and
        inode); otherwise None, and the caller opens it by name."""
        last = self._last
        depth = len(parts)
        if last is None or not depth < len(last) <= depth + _CLIMB or last[:depth] != parts:
            return None
        fd = self._fds.get(last)
        if fd is None:
            return None
        owned = False
        for end in range(len(last) - 1, depth - 1, -1):
            expected = self._ids.get(last[:end])
            up = open_parent(fd, expected) if expected is not None else None
            if owned:
                os.close(fd)
            if up is None:
                return None
            fd, owned = up, True
        self._cache(parts, fd)
        return fd

    def _cache(self, parts: Parts, fd: int) -> None:
        self._fds[parts] = fd
        if len(self._fds) > self._capacity:
            os.close(self._fds.popitem(last=False)[1])

    def _open_dir(self, parent: int, parts: Parts) -> int:
        """Create (if missing) and open directory ``parts`` in its parent's fd; cache it.
        One opened before (evicted from the cache since) is opened without a mkdir first."""
        known = parts in self._ids
        if not known:
            self._mkdir(parent, parts)
        try:
            fd = self._open_existing(parent, parts)
        except FileNotFoundError:
            if not known:
                raise
            self._mkdir(parent, parts)
            fd = self._open_existing(parent, parts)
        self._ids[parts] = identity(fd)
        self._cache(parts, fd)
        return fd

    def _mkdir(self, parent: int, parts: Parts) -> None:
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
            self.created_dirs.add(parts)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot create directory {_show(parts)}: {exc.strerror}") from None
            raise

    def _open_existing(self, parent: int, parts: Parts) -> int:
        try:
            return os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Refused(f"{_show(parts)} is not a directory") from None
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot open directory {_show(parts)}: {exc.strerror}") from None
            raise

    def make_dir(self, parts: Parts) -> None:
        self._dir(parts)

    def _remove_regular(self, parent: int, parts: Parts, what: str) -> None:
        """Make room for a later member of the same name: only a regular file gives way."""
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _Refused(f"{what} collides with {_show(parts)}, which is {kind}")
        os.unlink(parts[-1], dir_fd=parent)
        self.replaced += 1
        if st.st_nlink == 1:  # its last name: its bytes are gone too
            self.replaced_bytes += st.st_size

    def _apply(self, fd: int, attrs: _Attrs, *, parts: Parts, created: int | None = None) -> None:
        """Owner, mode, xattrs and mtime of ``fd``; ``created``: the mode it was created
        with (a chmod that would change nothing is not done)."""
        mode = attrs.mode & self._mode_mask
        # chown first: it clears setuid/setgid bits that chmod then sets.
        if self._same_owner and (attrs.uid, attrs.gid) != self._created_owner:
            try:
                os.fchown(fd, attrs.uid, attrs.gid)
            except OSError as exc:
                self._warnings.append(f"cannot set owner of {_show(parts)}: {exc.strerror}")
        if created is None or mode != created & ~self._umask:
            os.fchmod(fd, mode)
        # After chown, which clears security.capability; before utime (it changes ctime only).
        if attrs.xattrs:
            self._set_xattrs(fd, attrs, parts)
        try:
            os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))
        except (OSError, OverflowError, ValueError) as exc:
            self._warnings.append(f"cannot set mtime of {_show(parts)}: {exc}")

    def _set_xattrs(self, fd: int, attrs: _Attrs, parts: Parts) -> None:
        for name, value in attrs.xattrs:
            if not name.startswith(self._xattr_prefixes):
                continue
            try:
                os.setxattr(fd, name, value)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                count, example = self._xattr_failures.get(reason, (0, f"{name} of {_show(parts)}"))
                self._xattr_failures[reason] = (count + 1, example)

    def write_file(self, parts: Parts, data: IO[bytes] | bytes | memoryview | None, size: int, attrs: _Attrs) -> int:
        parent = self._dir(parts[:-1])
        name = parts[-1]
        # Created with its permission bits (less the umask): no fchmod afterwards. A file
        # with setuid/setgid/sticky bits is made 0600 and chmod'ed after its chown.
        perms = attrs.mode & 0o777 if not attrs.mode & 0o7000 else 0o600
        try:
            fd = os.open(name, _FILE_FLAGS, perms, dir_fd=parent)
        except FileExistsError:
            self._remove_regular(parent, parts, "file")
            fd = os.open(name, _FILE_FLAGS, perms, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot create {_show(parts)}: {exc.strerror}") from None
            raise
        written = 0
        try:
            if isinstance(data, (bytes, memoryview)):  # a small file comes whole: one write
                if data:
                    written = len(data)
                    n = os.write(fd, data)
                    if n < written:
                        _write_all(fd, data, n)
                    if self._progress is not None:
                        self._unreported += written
                        if self._unreported >= CHUNK_SIZE:  # told in 1 MiB steps, not per file
                            self._progress(self._unreported)
                            self._unreported = 0
            elif data is not None:
                remaining = size
                while remaining > 0:  # exactly ``size``: no extra read to find the end
                    chunk = data.read(min(remaining, CHUNK_SIZE))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    _write_all(fd, chunk, 0)
                    written += len(chunk)
                    if self._progress is not None:
                        self._progress(len(chunk))
            if (
                attrs.xattrs
                or attrs.mode & self._mode_mask != perms & ~self._umask
                or (self._same_owner and (attrs.uid, attrs.gid) != self._created_owner)
            ):
                self._apply(fd, attrs, parts=parts, created=perms)
            else:  # the common case: only its mtime to set
                try:
                    os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))
                except (OSError, OverflowError, ValueError) as exc:
                    self._warnings.append(f"cannot set mtime of {_show(parts)}: {exc}")
        finally:
            os.close(fd)
        return written

    def hard_link(self, source: Parts, parts: Parts) -> None:
        source_parent = os.dup(self._dir(source[:-1]))  # the next _dir() may evict it
        try:
            parent = self._dir(parts[:-1])
            try:
                os.link(
                    source[-1],
                    parts[-1],
                    src_dir_fd=source_parent,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            except FileExistsError:
                self._remove_regular(parent, parts, "hard link")
                os.link(
                    source[-1],
                    parts[-1],
                    src_dir_fd=source_parent,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            except OSError as exc:
                if exc.errno in _MEMBER_ERRNOS:
                    raise _Refused(f"cannot link {_show(parts)}: {exc.strerror}") from None
                raise
        finally:
            os.close(source_parent)

    def symlink(self, parts: Parts, target: str, attrs: _Attrs) -> None:
        parent = self._dir(parts[:-1])
        name = parts[-1]
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            self._remove_regular(parent, parts, "symlink")
            os.symlink(target, name, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot create symlink {_show(parts)}: {exc.strerror}") from None
            raise
        if self._same_owner:
            try:
                os.chown(name, attrs.uid, attrs.gid, dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                self._warnings.append(f"cannot set owner of {_show(parts)}: {exc.strerror}")
        try:
            mtime = attrs.mtime_ns
            os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
        except (OSError, OverflowError, ValueError) as exc:
            self._warnings.append(f"cannot set mtime of {_show(parts)}: {exc}")

    def finish_dir(self, parts: Parts, attrs: _Attrs | None) -> None:
        fd = self._dir(parts)
        if attrs is None:
            os.fchmod(fd, _IMPLICIT_DIR_MODE)
        else:
            self._apply(fd, attrs, parts=parts)


class _DryTree:
    """A model of the target: the same checks and collisions, nothing written."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._kinds: dict[Parts, str] = {}  # "d", "f" or "l"
        self._progress = progress
        self.created_dirs: set[Parts] = set()
        self.replaced = self.replaced_bytes = 0  # a dry run knows no sizes: none counted

    def close(self) -> None:
        pass

    def make_dir(self, parts: Parts) -> None:
        # Every prefix of a known path is known, and only directories have children: the
        # deepest known prefix is the only one to check (work linear in the depth).
        kinds = self._kinds
        depth = len(parts)
        while depth and parts[:depth] not in kinds:
            depth -= 1
        if depth and kinds[parts[:depth]] != "d":
            raise _Refused(f"{_show(parts[:depth])} is not a directory")
        for end in range(depth + 1, len(parts) + 1):
            prefix = parts[:end]
            kinds[prefix] = "d"
            self.created_dirs.add(prefix)

    def _place(self, parts: Parts, kind: str, what: str) -> None:
        self.make_dir(parts[:-1])
        existing = self._kinds.get(parts)
        if existing not in (None, "f"):
            description = "a directory" if existing == "d" else "not a regular file"
            raise _Refused(f"{what} collides with {_show(parts)}, which is {description}")
        self._kinds[parts] = kind

    def write_file(self, parts: Parts, data: IO[bytes] | bytes | memoryview | None, size: int, attrs: _Attrs) -> int:
        self._place(parts, "f", "file")
        if self._progress is not None and size:
            self._progress(size)
        return size

    def hard_link(self, source: Parts, parts: Parts) -> None:
        self._place(parts, "f", "hard link")

    def symlink(self, parts: Parts, target: str, attrs: _Attrs) -> None:
        self._place(parts, "l", "symlink")

    def finish_dir(self, parts: Parts, attrs: _Attrs | None) -> None:
        pass


def _write_all(fd: int, data: bytes | memoryview, done: int) -> None:
    """Write ``data`` past its first ``done`` bytes: one write, unless the kernel takes less."""
    view = memoryview(data)[done:]
    while view:
        view = view[os.write(fd, view) :]


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _ns(mtime: float) -> int:
    if isinstance(mtime, int):
        return mtime * 1_000_000_000
    return int(mtime * 1e9)


def _split_name(name: str, what: str = "path") -> Parts:
    """Normalised components of a member name or link target; raises _Refused if unsafe."""
    if "\0" in name:
        raise _Refused(f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise _Refused(f"{what} is absolute")
    split = name.split("/")
    if "" in split or "." in split:
        split = [part for part in split if part not in ("", ".")]
    parts = tuple(split)
    if ".." in parts:
        raise _Refused(f"{what} escapes the target")
    return parts


@dataclass
class _PendingSymlink:
    name: str
    target: str
    attrs: _Attrs


class _Extraction:
    def __init__(
        self,
        tree: _Tree,
        *,
        matcher: PathMatcher,
        select: Callable[[str], bool] | None = None,
        dry_run: bool,
        result: ExtractResult,
        hints: Hints | None = None,
    ) -> None:
        self.tree = tree
        self.matcher = matcher
        self.select = select
        self.filtering = bool(matcher) or select is not None  # once, not per member
        self.dry_run = dry_run
        self.result = result
        # Regular files extracted so far (hard link targets), by path: one string per file
        # (a tuple of components holds its own copy of every directory name).
        self.regular: set[str] = set()
        self.symlinks: dict[Parts, _PendingSymlink] = {}
        self.dir_attrs: dict[Parts, _Attrs] = {}  # every directory member, included or not
        self.root_attrs: _Attrs | None = None
        self.tar: TarReader | None = None  # the archive being read
        self.hints = hints  # headers parsed ahead (a decompression child)

    def _wanted(self, path: str) -> bool:
        if self.matcher and not self.matcher.matches(path):
            return False
        return self.select is None or self.select(path)

    def refuse(self, name: str, reason: str) -> None:
        self.result.refused.append(f"refused {name!r}: {reason}")

    def refuse_member(self, member: tarfile.TarInfo, reason: str) -> None:
        """A member whose numbers no file can have (the reader's judgement): refused, unless
        ``include`` leaves it out anyway."""
        name = member.name
        if self.filtering:
            try:
                parts = _split_name(name)
            except _Refused:
                parts = ()
            if parts and not self._wanted("/".join(parts)):
                self.result.skipped_not_included += 1
                return
        self.refuse(name, f"it {reason}")

    def run(self, stream: BinaryIO) -> None:
        try:
            with TarReader(stream, refuse=self.refuse_member, hints=self.hints) as tar:
                self.tar = tar
                for member in tar.headers():
                    self.member(member)
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(
                f"archive is truncated or corrupt: {exc}", _INTEGRITY_HINT
            ) from exc
        self.finish()

    def member(self, member: Header) -> None:
        name = member.name
        try:
            parts = _split_name(name)
        except _Refused as exc:
            self.refuse(name, str(exc))
            return
        if member.type == _REGTYPE and parts:  # most members: the short way
            if self.filtering and not self._wanted("/".join(parts)):
                self.result.skipped_not_included += 1
                return
            if self.symlinks:
                self.symlinks.pop(parts, None)
            try:
                self.regular_file(parts, member)
            except _Refused as exc:
                self.refuse(name, str(exc))
            return
        if not parts:
            if member.isdir():
                self.root_attrs = _Attrs.of(member)
            else:
                self.refuse(name, "only a directory can stand for the target itself")
            return
        if member.isdir():
            # Remembered even when not included: it restores as the parent of an included member.
            self.dir_attrs[parts] = _Attrs.of(member)
        if member.ischr() or member.isblk() or member.isfifo():
            kind = "FIFO" if member.isfifo() else "device" if member.ischr() else "block device"
            kind = "character device" if member.ischr() else kind
            self.refuse(name, f"{kind} members are not restored")
            return
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            self.refuse(name, f"unsupported member type {member.type!r}")
            return
        if self.filtering and not self._wanted("/".join(parts)):
            self.result.skipped_not_included += 1
            return
        if member.issym():
            self.add_symlink(name, parts, member)
            return
        # A later member of the same name wins over a symlink not yet created, as in tar.
        self.symlinks.pop(parts, None)
        try:
            if member.isdir():
                self.tree.make_dir(parts)
            elif member.islnk():
                self.hard_link(parts, member)
            else:
                self.regular_file(parts, member)
        except _Refused as exc:
            self.refuse(name, str(exc))

    def regular_file(self, parts: Parts, member: Header) -> None:
        path = "/".join(parts)
        tar = self.tar
        data: IO[bytes] | bytes | memoryview | None = None
        if not self.dry_run and tar is not None:
            data = tar.whole(member) if member.size <= CHUNK_SIZE else tar.data(member)
        try:
            written = self.tree.write_file(parts, data, member.size, _Attrs.of(member))
        except BaseException:
            self.regular.discard(path)  # an earlier file of its name may be gone
            raise
        self.result.bytes += written
        self.regular.add(path)
        self.result.files += 1

    def hard_link(self, parts: Parts, member: Header) -> None:
        try:
            source = _split_name(member.linkname, "hard link target")
        except _Refused as exc:
            raise _Refused(f"{exc} ({member.linkname!r})") from None
        if "/".join(source) not in self.regular:
            raise _Refused(
                f"hard link target {member.linkname!r} is not a regular file restored before it"
            )
        if source == parts:
            return  # a link to itself: the file is already there
        path = "/".join(parts)
        self.regular.discard(path)
        self.tree.hard_link(source, parts)
        self.regular.add(path)
        self.result.hardlinks += 1

    def add_symlink(self, name: str, parts: Parts, member: Header) -> None:
        target = member.linkname
        if not target:
            self.refuse(name, "symlink has an empty target")
        elif "\0" in target:
            self.refuse(name, "symlink target contains a NUL byte")
        else:
            # Created last, verbatim (absolute targets too); a later one of the same name wins.
            self.symlinks.pop(parts, None)
            self.symlinks[parts] = _PendingSymlink(name, target, _Attrs.of(member))

    def finish(self) -> None:
        for parts, pending in self.symlinks.items():
            try:
                self.tree.symlink(parts, pending.target, pending.attrs)
                self.result.symlinks += 1
            except _Refused as exc:
                self.refuse(pending.name, str(exc))
        self.result.dirs = len(self.tree.created_dirs)
        # Every directory after everything inside it (a child's mode or mtime never changes
        # its parent, and a parent made read-only, 0o555, is done last): reverse order of
        # the component tuples puts each one after its descendants, and keeps a subtree's
        # directories together (the descriptors cached stay the ones needed).
        for parts in sorted(self.tree.created_dirs, reverse=True):
            self.tree.finish_dir(parts, self.dir_attrs.get(parts))
        if self.root_attrs is not None:
            self.tree.finish_dir((), self.root_attrs)


def extract(
    stream: BinaryIO,
    target: Path | int,
    *,
    include: Sequence[str] = (),
    select: Callable[[str], bool] | None = None,
    same_owner: bool | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    hints: Hints | None = None,
) -> ExtractResult:
    """Extract the uncompressed tar ``stream`` into the existing empty directory ``target``:
    an open directory's descriptor (a restore's staging directory, never reopened by name),
    or a path (not followed if it is a symlink).

    ``include`` selects members with ``PathMatcher`` (a matched directory brings its subtree, a
    matched file its parent directories). ``select`` is a per-member filter on top of it:
    called with each member's normalised path, False leaves the member out (a chain restore
    takes each path only from the archive its index names). ``same_owner`` (default: running as root) restores
    numeric owners and setuid/setgid bits. ``dry_run`` reads the stream and counts what would
    be written without writing anything. ``progress`` receives each count of file bytes
    written. Refused members are listed in the result; the rest is extracted. A truncated or
    corrupt tar stream raises IntegrityError; errors of ``stream`` itself propagate.
    """
    if same_owner is None:
        same_owner = os.geteuid() == 0
    result = ExtractResult()
    tree: _Tree
    if dry_run:
        tree = _DryTree(progress)
    else:
        tree = _RealTree(target, same_owner=same_owner, progress=progress, warnings=result.warnings)
    # A few objects per member, nearly none of them in a cycle: the cyclic collector's
    # youngest generation is looked at every _GC_BATCH allocations rather than every 700
    # (measured: ~3 % of a restore of 200,000 small files); cycles are still collected.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], _GC_BATCH), *thresholds[1:])
    try:
        _Extraction(
            tree,
            matcher=PathMatcher(include),
            select=select,
            dry_run=dry_run,
            result=result,
            hints=hints,
        ).run(stream)
    finally:
        gc.set_threshold(*thresholds)
        tree.close()
    result.replaced, result.replaced_bytes = tree.replaced, tree.replaced_bytes
    return result
