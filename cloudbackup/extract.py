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
import io
import os
import re
import stat
import tarfile
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

from cloudbackup.archive import pax_block
from cloudbackup.errors import IntegrityError
from cloudbackup.patterns import PathMatcher
from cloudbackup.walk import default_capacity, identity, open_parent

__all__ = ["CHUNK_SIZE", "ExtractResult", "extract"]

CHUNK_SIZE = 1 << 20
_READ_AHEAD = 1 << 16
_BLOCK = tarfile.BLOCKSIZE
_DIR_FD_CACHE = 128
_CLIMB = 16  # at most this many ``..`` steps to reopen a directory (see _RealTree._climb)
_IMPLICIT_DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that concern one member (its name or its place in the tree), not the whole restore.
_MEMBER_ERRNOS = {errno.ENAMETOOLONG, errno.EILSEQ, errno.EMLINK, errno.EINVAL}
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup"
_XATTR_PREFIX = "SCHILY.xattr."
_PAX_TIME_RE = re.compile(r"(-?)([0-9]{1,30})(?:\.([0-9]*))?", re.ASCII)

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


@dataclass(frozen=True)
class _Attrs:
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    xattrs: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> _Attrs:
        pax = member.pax_headers
        if not pax:
            return cls(member.mode & 0o7777, _ns(member.mtime), member.uid, member.gid)
        xattrs = tuple(
            (key[len(_XATTR_PREFIX) :], value.encode("utf-8", "surrogateescape"))
            for key, value in pax.items()
            if key.startswith(_XATTR_PREFIX)
        )
        mtime_ns = _pax_time_ns(pax.get("mtime"))
        if mtime_ns is None:
            mtime_ns = _ns(member.mtime)
        return cls(member.mode & 0o7777, mtime_ns, member.uid, member.gid, xattrs)


class _Refused(Exception):
    """One member cannot be extracted safely; the reason is the message."""


def _show(parts: Parts) -> str:
    return repr("/".join(parts))


class _TailReader(io.RawIOBase):
    """The raw layer under tarfile: passes reads through, counts them, keeps the last bytes
    read to check the end-of-archive block, and seeks forward only (by reading).

    ``tarfile`` silently stops at a truncated or corrupt header after the first member; the
    only proof that a stream is complete is the zero block where the next header would be.

    Forward seeks let tarfile run in its plain ``r:`` mode over a C ``BufferedReader``
    instead of its ``r|`` stream mode, whose pure-Python buffer reads the archive in 10 KiB
    steps (most of the extractor's CPU time on archives of many small files). tarfile reads
    members sequentially either way; a backward seek raises ``StreamError``, as in ``r|``.
    """

    _KEEP = 1 << 19  # more than the BufferedReader's read-ahead (_READ_AHEAD) plus a block

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self._chunks: deque[bytes] = deque()
        self._kept = 0
        self.position = 0  # bytes read so far

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def _take(self, size: int) -> bytes:
        data = self._stream.read(size)
        if data:
            self._chunks.append(data)
            self._kept += len(data)
            self.position += len(data)
            while len(self._chunks) > 1 and self._kept - len(self._chunks[0]) >= self._KEEP:
                self._kept -= len(self._chunks.popleft())
        return data

    def readinto(self, buffer: Any) -> int:
        data = self._take(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.position
        elif whence != os.SEEK_SET:
            raise tarfile.StreamError("seeking from the end is not possible in a stream")
        if offset < self.position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self.position < offset:
            if not self._take(min(offset - self.position, CHUNK_SIZE)):
                break  # past the end: the next read returns nothing, as with a file
        return self.position

    def window(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the stream from ``offset``, from what was read and kept:
        fewer when the stream was not read that far yet, none when ``offset`` is gone."""
        pos = self.position - self._kept  # the stream offset of the first byte kept
        if offset < pos:
            return b""
        parts: list[bytes] = []
        for chunk in self._chunks:
            end = pos + len(chunk)
            if end > offset:
                start = offset - pos if offset > pos else 0
                parts.append(chunk[start : start + size])
                size -= len(parts[-1])
                if size <= 0:
                    break
            pos = end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def is_zero_block_at(self, offset: int) -> bool:
        start = offset - (self.position - self._kept)
        if start < 0:
            return False
        block = b"".join(self._chunks)[start : start + _BLOCK]
        return len(block) == _BLOCK and not block.strip(b"\0")


class _MemberData:
    """Reads one member's ``size`` bytes at ``offset`` of the (forward-only) stream."""

    def __init__(self, fileobj: io.BufferedReader, offset: int, size: int) -> None:
        self._fileobj, self._position, self._remaining = fileobj, offset, size

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._remaining:
            size = self._remaining
        if size <= 0:
            return b""
        self._fileobj.seek(self._position)  # a no-op unless the reader moved on
        data = self._fileobj.read(size)
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")
        self._position += size
        self._remaining -= size
        return data


# ---------------------------------------------------------------- fast headers

_FAST_KINDS = frozenset((tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE))
_FAST_PAX_KEYS = frozenset(("mtime", "atime", "ctime", "path", "linkpath", "hdrcharset"))
_PAX_LENGTH_RE = re.compile(rb"[1-9][0-9]{0,8} ")
_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar/pax (GNU's "ustar  \0" is tarfile's job)
# The most header bytes parsed here: an extended header of up to 7 blocks, then the member's.
FAST_HEADER_BYTES = 9 * _BLOCK


def _name(field: bytes) -> str:
    """tarfile's nts(): up to the first NUL, UTF-8 with surrogate escapes."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """tarfile's nti() for plain octal fields; ValueError for base-256 or garbage."""
    if field[:1] in (b"\x80", b"\xff"):
        raise ValueError("base-256 number")
    end = field.find(b"\0")
    return int((field if end < 0 else field[:end]).strip() or b"0", 8)


# The six fixed-width octal fields (mode, uid, gid, size, mtime, checksum) as written here.
_OUR_NUMBERS = re.compile(
    rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 "
)
_EMPTY_TAIL = bytes(_BLOCK - 265)  # no owner names, device numbers or prefix


def _ustar(raw: bytes, offset: int) -> tarfile.TarInfo:
    """The TarInfo tarfile's ``frombuf`` makes of a valid POSIX ustar block (ValueError
    when it is not one: bad checksum, odd magic or numbers). Blocks laid out as the writer
    lays them out (fixed-width numbers, nothing past the version field) take a short cut."""
    if raw[257:265] != _USTAR_MAGIC:
        raise ValueError("not a POSIX ustar header")
    numbers = _OUR_NUMBERS.match(raw, 100)
    if numbers is not None and raw[265:] == _EMPTY_TAIL:
        mode, uid, gid, size, mtime, checksum = (int(field, 8) for field in numbers.groups())
        if checksum != 256 + sum(raw[:148]) + sum(raw[156:265]):
            raise ValueError("bad checksum")
        info = tarfile.TarInfo(_name(raw[:100]))
        info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
        info.chksum = checksum
        info.type = raw[156:157]
        info.linkname = _name(raw[157:257])
        info.uname = info.gname = ""
        info.devmajor = info.devminor = 0
        prefix = ""
    else:
        if _number(raw[148:156]) != 256 + sum(raw[:148]) + sum(raw[156:]):
            raise ValueError("bad checksum (or a signed one)")
        info = tarfile.TarInfo(_name(raw[:100]))
        info.mode = _number(raw[100:108])
        info.uid = _number(raw[108:116])
        info.gid = _number(raw[116:124])
        info.size = _number(raw[124:136])
        info.mtime = _number(raw[136:148])
        info.chksum = _number(raw[148:156])
        info.type = raw[156:157]
        info.linkname = _name(raw[157:257])
        info.uname = _name(raw[265:297])
        info.gname = _name(raw[297:329])
        info.devmajor = _number(raw[329:337])
        info.devminor = _number(raw[337:345])
        prefix = _name(raw[345:500])
    if info.type == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    if prefix:
        info.name = prefix + "/" + info.name
    info.offset = offset
    return info


def _pax_records(payload: bytes) -> dict[str, str]:
    """Well-formed records of the keys written here, decoded as tarfile decodes them
    (ValueError for anything else: other keys are left to tarfile)."""
    # tarfile first looks for "hdrcharset=" anywhere in the payload (inside a value too):
    # only the record this tool writes, first, gives the same answer here.
    if b"hdrcharset=" in payload and not payload.startswith(b"21 hdrcharset=BINARY\n"):
        raise ValueError("hdrcharset is left to tarfile")
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        match = _PAX_LENGTH_RE.match(payload, pos)
        if match is None:
            raise ValueError("not a record")
        length = int(match[0])
        end = pos + length
        equals = payload.find(b"=", match.end(), end)
        if equals < 0 or end > len(payload) or payload[end - 1 : end] != b"\n":
            raise ValueError("malformed record")
        keyword = payload[match.end() : equals].decode("utf-8", "surrogateescape")
        if keyword not in _FAST_PAX_KEYS and not keyword.startswith(_XATTR_PREFIX):
            raise ValueError(f"record {keyword!r} is left to tarfile")
        records[keyword] = payload[equals + 1 : end - 1].decode("utf-8", "surrogateescape")
        pos = end
    if records.get("hdrcharset", "BINARY") != "BINARY":
        raise ValueError("unknown hdrcharset")
    return records


def _fast_member(data: bytes, offset: int) -> tuple[tarfile.TarInfo, int] | None:
    """The member whose headers start ``data`` (at archive ``offset``) and the offset of
    the next header, for what this tool writes: a POSIX ustar block of a regular file,
    directory, symlink or hard link, optionally after an extended header of mtime, atime,
    ctime, path, linkpath, hdrcharset and SCHILY.xattr.* records. The TarInfo is the one
    tarfile (3.11+) makes of the same bytes, in a fraction of the time; None for any other
    header, or when ``data`` is too short: tarfile then parses (or refuses) it.
    """
    try:
        start = 0
        records = None
        if data[156:157] == tarfile.XHDTYPE:
            size = _number(data[124:136])
            if data[:_BLOCK] != pax_block(size):
                _ustar(data[:_BLOCK], offset)  # another writer's: validated as tarfile would
            start = _BLOCK + -(-size // _BLOCK) * _BLOCK
            if len(data) < start + _BLOCK or data[_BLOCK + size : start].strip(b"\0"):
                return None
            records = _pax_records(data[_BLOCK : _BLOCK + size])
        if len(data) < start + _BLOCK or data[start + 156 : start + 157] not in _FAST_KINDS:
            return None
        info = _ustar(data[start : start + _BLOCK], offset)
        if records:
            if "path" in records:
                info.name = records["path"].rstrip("/")
            if "linkpath" in records:
                info.linkname = records["linkpath"]
            if "mtime" in records:
                info.mtime = float(records["mtime"])
            info.pax_headers = records
    except ValueError:
        return None
    info.offset_data = offset + start + _BLOCK
    size = -(-info.size // _BLOCK) * _BLOCK if info.type == tarfile.REGTYPE else 0
    return info, info.offset_data + size


class _Tree(Protocol):
    """Where members go: the real target, or a model of it for dry runs."""

    created_dirs: set[Parts]

    def make_dir(self, parts: Parts) -> None: ...

    def write_file(self, parts: Parts, data: IO[bytes] | None, size: int, attrs: _Attrs) -> int: ...

    def hard_link(self, source: Parts, parts: Parts) -> None: ...

    def symlink(self, parts: Parts, target: str, attrs: _Attrs) -> None: ...

    def finish_dir(self, parts: Parts, attrs: _Attrs | None) -> None: ...

    def close(self) -> None: ...


class _RealTree:
    """Writes under ``root`` through directory fds opened with O_NOFOLLOW, never by path."""

    def __init__(
        self,
        root: Path,
        *,
        same_owner: bool,
        progress: Callable[[int], None] | None,
        warnings: list[str],
    ) -> None:
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: OrderedDict[Parts, int] = OrderedDict()
        self._capacity = min(_DIR_FD_CACHE, default_capacity())
        self._ids: dict[Parts, tuple[int, int]] = {}  # (st_dev, st_ino) of each dir opened
        self._last: Parts | None = None  # the directory _dir() returned last
        self._same_owner = same_owner
        self._mode_mask = 0o7777 if same_owner else 0o1777
        self._progress = progress
        self._warnings = warnings
        # user.* always; security.* and trusted.* need root (as when they were archived).
        root_user = os.geteuid() == 0
        self._xattr_prefixes = ("user.", "security.", "trusted.") if root_user else ("user.",)
        self._xattr_failures: dict[str, tuple[int, str]] = {}  # reason -> (count, example)
        self.created_dirs: set[Parts] = set()

    def close(self) -> None:
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
        fds = self._fds
        fd = fds.get(parts)
        if fd is None:
            fd = self._climb(parts)
        if fd is not None:
            fds.move_to_end(parts)
            self._last = parts
            return fd
        depth = len(parts) - 1
        while depth and parts[:depth] not in fds:
            depth -= 1
        parent = self._root_fd
        if depth:
            parent = fds[parts[:depth]]
            fds.move_to_end(parts[:depth])
        for end in range(depth + 1, len(parts) + 1):
            parent = self._open_dir(parent, parts[:end])
        self._last = parts
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
        """Create (if missing) and open directory ``parts`` in its parent's fd; cache it."""
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            self.created_dirs.add(parts)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot create directory {_show(parts)}: {exc.strerror}") from None
            raise
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Refused(f"{_show(parts)} is not a directory") from None
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot open directory {_show(parts)}: {exc.strerror}") from None
            raise
        self._ids[parts] = identity(fd)
        self._cache(parts, fd)
        return fd

    def make_dir(self, parts: Parts) -> None:
        self._dir(parts)

    def _remove_regular(self, parent: int, parts: Parts, what: str) -> None:
        """Make room for a later member of the same name: only a regular file gives way."""
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise _Refused(f"{what} collides with {_show(parts)}, which is {kind}")
        os.unlink(parts[-1], dir_fd=parent)

    def _apply(self, fd: int, attrs: _Attrs, *, parts: Parts) -> None:
        # chown first: it clears setuid/setgid bits that chmod then sets.
        if self._same_owner:
            try:
                os.fchown(fd, attrs.uid, attrs.gid)
            except OSError as exc:
                self._warnings.append(f"cannot set owner of {_show(parts)}: {exc.strerror}")
        os.fchmod(fd, attrs.mode & self._mode_mask)
        # After chown, which clears security.capability; before utime (it changes ctime only).
        for name, value in attrs.xattrs:
            if not name.startswith(self._xattr_prefixes):
                continue
            try:
                os.setxattr(fd, name, value)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                count, example = self._xattr_failures.get(reason, (0, f"{name} of {_show(parts)}"))
                self._xattr_failures[reason] = (count + 1, example)
        try:
            os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))
        except (OSError, OverflowError, ValueError) as exc:
            self._warnings.append(f"cannot set mtime of {_show(parts)}: {exc}")

    def write_file(self, parts: Parts, data: IO[bytes] | None, size: int, attrs: _Attrs) -> int:
        parent = self._dir(parts[:-1])
        name = parts[-1]
        try:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            self._remove_regular(parent, parts, "file")
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        except OSError as exc:
            if exc.errno in _MEMBER_ERRNOS:
                raise _Refused(f"cannot create {_show(parts)}: {exc.strerror}") from None
            raise
        written = 0
        try:
            remaining = size if data is not None else 0
            while remaining > 0:  # exactly ``size``: no extra read to find the end
                assert data is not None
                chunk = data.read(min(remaining, CHUNK_SIZE))
                if not chunk:
                    break
                remaining -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
                if self._progress is not None:
                    self._progress(len(chunk))
            self._apply(fd, attrs, parts=parts)
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

    def write_file(self, parts: Parts, data: IO[bytes] | None, size: int, attrs: _Attrs) -> int:
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


def _ns(mtime: float) -> int:
    if isinstance(mtime, int):
        return mtime * 1_000_000_000
    return int(mtime * 1e9)


def _pax_time_ns(text: str | None) -> int | None:
    """A PAX time (``1700000000.123456789``, ``-1.5``) in exact nanoseconds, or None.

    tarfile turns it into a float, which keeps only about 0.2 microseconds of today's
    times; the string is read here digit for digit (digits past nanoseconds dropped).
    """
    if text is None:
        return None
    match = _PAX_TIME_RE.fullmatch(text)
    if match is None:
        return None
    sign, seconds, fraction = match.groups()
    ns = int(seconds) * 1_000_000_000 + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


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
        dry_run: bool,
        result: ExtractResult,
    ) -> None:
        self.tree = tree
        self.matcher = matcher
        self.dry_run = dry_run
        self.result = result
        self.regular: set[Parts] = set()  # regular files extracted so far: hard link targets
        self.symlinks: dict[Parts, _PendingSymlink] = {}
        self.dir_attrs: dict[Parts, _Attrs] = {}  # every directory member, included or not
        self.root_attrs: _Attrs | None = None
        self.buffered: io.BufferedReader | None = None  # the stream tarfile reads

    def refuse(self, name: str, reason: str) -> None:
        self.result.refused.append(f"refused {name!r}: {reason}")

    def run(self, stream: BinaryIO) -> None:
        reader = _TailReader(stream)
        buffered = self.buffered = io.BufferedReader(reader, _READ_AHEAD)
        try:
            archive = tarfile.open(
                fileobj=cast(BinaryIO, buffered),  # read(), tell() and forward seek() only
                mode="r:",
                encoding="utf-8",
                errors="surrogateescape",
            )
            with archive:
                member = archive.next()
                while member is not None:
                    # tarfile keeps every member it reads; drop them to stay flat on huge archives.
                    archive.members.clear()  # type: ignore[attr-defined]
                    self.member(archive, member)
                    member = self.next_member(archive, reader)
                if not reader.is_zero_block_at(archive.offset):
                    raise tarfile.ReadError(
                        f"no valid header or end-of-archive marker at offset {archive.offset}"
                    )
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(
                f"archive is truncated or corrupt: {exc}", _INTEGRITY_HINT
            ) from exc
        self.finish()

    def next_member(self, archive: tarfile.TarFile, reader: _TailReader) -> tarfile.TarInfo | None:
        """The next member: parsed here when its headers were already read ahead and are of
        the kinds this tool writes (tarfile's generic parsing of a PAX header costs more
        than extracting a small file), else by tarfile, from the same offset."""
        if not archive.pax_headers:  # a global header applies to every member: tarfile's job
            offset = archive.offset
            parsed = _fast_member(reader.window(offset, FAST_HEADER_BYTES), offset)
            if parsed is not None:
                member, archive.offset = parsed
                return member
        return archive.next()

    def member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        try:
            parts = _split_name(name)
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
        if self.matcher and not self.matcher.matches("/".join(parts)):
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
                self.regular.discard(parts)
                data = None if self.dry_run else self.data_of(archive, member)
                self.result.bytes += self.tree.write_file(
                    parts, data, member.size, _Attrs.of(member)
                )
                self.regular.add(parts)
                self.result.files += 1
        except _Refused as exc:
            self.refuse(name, str(exc))

    def data_of(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes] | None:
        """A regular member's data, read straight from the buffered stream (what tarfile's
        ``extractfile`` does, minus two layers of Python per read); sparse ones via tarfile."""
        if member.issparse() or self.buffered is None:
            return archive.extractfile(member)
        return cast(IO[bytes], _MemberData(self.buffered, member.offset_data, member.size))

    def hard_link(self, parts: Parts, member: tarfile.TarInfo) -> None:
        try:
            source = _split_name(member.linkname, "hard link target")
        except _Refused as exc:
            raise _Refused(f"{exc} ({member.linkname!r})") from None
        if source not in self.regular:
            raise _Refused(
                f"hard link target {member.linkname!r} is not a regular file restored before it"
            )
        if source == parts:
            return  # a link to itself: the file is already there
        self.regular.discard(parts)
        self.tree.hard_link(source, parts)
        self.regular.add(parts)
        self.result.hardlinks += 1

    def add_symlink(self, name: str, parts: Parts, member: tarfile.TarInfo) -> None:
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
        # Deepest first: a child's mode or mtime never changes its parent, and a parent made
        # read-only (0o555) is done after everything inside it.
        for parts in sorted(self.tree.created_dirs, key=len, reverse=True):
            self.tree.finish_dir(parts, self.dir_attrs.get(parts))
        if self.root_attrs is not None:
            self.tree.finish_dir((), self.root_attrs)


def extract(
    stream: BinaryIO,
    target: Path,
    *,
    include: Sequence[str] = (),
    same_owner: bool | None = None,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    """Extract the uncompressed tar ``stream`` into the existing empty directory ``target``.

    ``include`` selects members with ``PathMatcher`` (a matched directory brings its subtree, a
    matched file its parent directories). ``same_owner`` (default: running as root) restores
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
    try:
        _Extraction(tree, matcher=PathMatcher(include), dry_run=dry_run, result=result).run(stream)
    finally:
        tree.close()
    return result
