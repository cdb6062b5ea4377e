"""The tar writer: each ``FileEntry`` becomes a tar member (PAX headers from ``tarformat``),
its data read through its directory's descriptor straight into a 4 MiB buffer that feeds the
compressor in large batches; ``prefetched`` opens the files ahead of the writer and has the
kernel read them meanwhile. The pipeline around it (compressor, hashing, the ``.partial``
file) is ``cloudbackup.stream.pipeline``.

A small file costs one ``fstat`` (the object opened must be the one the walk saw), one
``flistxattr``, one ``read`` (of one byte more than its size: a file that grew says so
without a second call) and a ``close``, plus the ``open`` and ``posix_fadvise`` of the
read-ahead; its header, data and padding go into the buffer in place.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import tarfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cloudbackup.fs.walk import DirCursor, DirHandle, FileEntry
from cloudbackup.fs.xattrs import UNSUPPORTED as XATTR_UNSUPPORTED
from cloudbackup.fs.xattrs import namespaces as xattr_namespaces
from cloudbackup.stream.compress import Compressor
from cloudbackup.stream.index import IndexWriter
from cloudbackup.stream.tarformat import XATTR_PREFIX, member_header

CHUNK = 4 * 1024 * 1024
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(CHUNK)
_PADDING = [bytes(n) for n in range(BLOCK)]  # after a member's data, by its length
_NOATIME = getattr(os, "O_NOATIME", 0)
_EUID = os.geteuid()
PREFETCH_BYTES = 64 * 1024 * 1024
PREFETCH_FILES = 256
_FADVISE = getattr(os, "posix_fadvise", None)
_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG
_S_IFDIR = stat.S_IFDIR
_S_IFLNK = stat.S_IFLNK


Warn = Callable[[str, str], None]  # (category, message)


@dataclass
class ArchiveStats:
    size: int = 0
    sha256: str = ""
    file_count: int = 0  # every member that is not a directory
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    uncompressed_bytes: int = 0  # regular-file content
    warnings: list[str] = field(default_factory=list)
    unreadable: int = 0
    vanished: int = 0
    changed: int = 0  # files that shrank or grew while read (GNU tar exits 1 for those)

    def members(self) -> dict[str, int]:
        return {"dirs": self.dirs, "symlinks": self.symlinks, "hardlinks": self.hardlinks}


class ReadFailed(Exception):
    """Reading a member's data failed (``error``); the member was completed with zeros.

    Kept apart from OSError: a failure to compress or write the archive (a full disk) must
    stop the backup, not pass for an unreadable input file."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def _read_into(fd: int, view: memoryview) -> int:
    """One ``read`` into ``view``; a descriptor still non-blocking (as opened, so that a
    FIFO planted since the walk cannot hang us) is made blocking if it ever answers EAGAIN.
    Raises ReadFailed."""
    try:
        try:
            return os.readv(fd, [view])
        except BlockingIOError:
            os.set_blocking(fd, True)
            return os.readv(fd, [view])
    except OSError as exc:
        raise ReadFailed(exc) from exc


class Sink(Protocol):
    """Where compressed bytes go: the hashing sink, or a stage before it (encryption)."""

    def put(self, chunk: bytes) -> None: ...


class TarOut:
    """Accumulates tar bytes in a fixed buffer and feeds the compressor in big chunks."""

    def __init__(
        self, compressor: Compressor, sink: Sink, progress: Callable[[int], None] | None
    ) -> None:
        self.compressor = compressor
        self.sink = sink
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.total = 0
        self.progress = progress

    def flush(self) -> None:
        if self.pos:
            self.sink.put(self.compressor.compress(self.view[: self.pos]))
            self.total += self.pos
            if self.progress:
                self.progress(self.pos)
            self.pos = 0

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self.pos + n > CHUNK:
            self.flush()
        if n >= CHUNK:
            self.sink.put(self.compressor.compress(data))
            self.total += n
            return
        self.buf[self.pos : self.pos + n] = data
        self.pos += n

    def zeros(self, count: int) -> None:
        while count > 0:
            step = min(count, CHUNK)
            self.write(_ZEROS[:step])
            count -= step

    def add_file(self, header: bytes, fd: int, size: int) -> int:
        """One regular file's member: ``header``, ``size`` bytes read from ``fd``, padding.

        Returns how much the file held: ``size``; less when it shrank (the rest is zeros);
        ``size + 1`` when it holds more (it grew: the member keeps ``size`` bytes). A read
        error completes the member with zeros, then raises ReadFailed. A file that fits the buffer
        (the common case) is read straight into it with one ``read`` of ``size + 1`` bytes.
        """
        room = len(header) + size + BLOCK  # the data's padding, or the byte beyond it
        if self.pos + room > CHUNK:
            if room > CHUNK:
                self.write(header)
                return self._copy_large(fd, size)
            self.flush()
        pos = self.pos
        start = pos + len(header)
        end = start + size
        buf = self.buf
        buf[pos:start] = header
        view = self.view
        got = 0
        try:
            while True:
                n = _read_into(fd, view[start + got : end + 1])
                if not n:
                    break
                got += n
                if got >= size:
                    break
        finally:
            if got < size:
                buf[start + got : end] = _ZEROS[: size - got]
            pad = -size % BLOCK
            buf[end : end + pad] = _PADDING[pad]
            self.pos = end + pad
        return got

    def _copy_large(self, fd: int, size: int) -> int:
        """``add_file`` for a file larger than the buffer: read in buffer-sized steps."""
        start = self.total + self.pos
        got = 0
        try:
            got = self.copy_from(fd, size)
        finally:
            got = self.total + self.pos - start  # also what a failed read left written
            if got < size:
                self.zeros(size - got)
            if size % BLOCK:
                self.write(_PADDING[-size % BLOCK])
        if got == size and os.fstat(fd).st_size > size:
            return size + 1
        return got

    def copy_from(self, fd: int, remaining: int) -> int:
        """Read up to ``remaining`` bytes of ``fd`` straight into the buffer; returns bytes read.

        A file larger than the prefetch window (whose head :func:`prefetched` asked for)
        keeps the kernel reading ``PREFETCH_BYTES`` ahead of us, so the disk stays busy
        while the data read so far is compressed.
        """
        got = 0
        advised = min(remaining, PREFETCH_BYTES)
        total = remaining
        while remaining > 0:
            if _FADVISE is not None and advised < total and got + PREFETCH_BYTES // 2 >= advised:
                try:
                    _FADVISE(fd, advised, PREFETCH_BYTES // 2, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                advised += PREFETCH_BYTES // 2
            if self.pos == CHUNK:
                self.flush()
            want = min(remaining, CHUNK - self.pos)
            n = _read_into(fd, self.view[self.pos : self.pos + want])
            if not n:
                break
            self.pos += n
            got += n
            remaining -= n
        return got

    def finish(self) -> None:
        # End-of-archive: two zero blocks, padded to a full record like GNU tar.
        self.write(bytes(2 * BLOCK))
        remainder = (self.total + self.pos) % RECORD
        if remainder:
            self.write(bytes(RECORD - remainder))
        self.flush()
        self.sink.put(self.compressor.flush())


def _open_nofollow(
    path: str,
    *,
    dir_fd: int | None = None,
    name: str | None = None,
    nonblocking: bool = True,
    wait_for_lease: bool = True,
    noatime: bool = True,
) -> int:
    """Open a file for reading, never following a symlink and never waiting on a FIFO.

    With ``dir_fd``, ``name`` is opened relative to that directory descriptor and ``path``
    only names the file in errors; without it, ``path`` itself is opened (a spooled file).
    O_NONBLOCK: a file replaced by a FIFO since the walk must not hang the backup (the
    caller checks the type; a read that ever answers EAGAIN makes the descriptor blocking).
    A regular file under a kernel lease (Samba, an NFS server) answers EWOULDBLOCK to a
    non-blocking open: it is opened again, blocking, which waits for the lease to break
    (unless ``wait_for_lease`` is false: the read-ahead leaves such a file to the writer).
    ``noatime``: try O_NOATIME (allowed to a file's owner and to root; the caller knows the
    owner, so a file of someone else costs no refused open first).
    """
    target = path if dir_fd is None else name
    assert target is not None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        return os.open(target, flags | _NOATIME if noatime else flags, dir_fd=dir_fd)
    except PermissionError:
        if not (_NOATIME and noatime):
            raise
        return os.open(target, flags, dir_fd=dir_fd)  # O_NOATIME needs ownership
    except BlockingIOError:
        if not (nonblocking and wait_for_lease):
            raise
        return _open_nofollow(path, dir_fd=dir_fd, name=name, nonblocking=False, noatime=noatime)
    except OSError as exc:
        if exc.errno == errno.EPERM and _NOATIME and noatime:
            return os.open(target, flags, dir_fd=dir_fd)
        raise


def _open_entry(entry: FileEntry, cursor: DirCursor, *, wait_for_lease: bool = True) -> int:
    """Open ``entry`` through its directory's descriptor (``cursor`` keeps it pinned)."""
    noatime = _EUID == 0 or entry.st.st_uid == _EUID
    if entry.parent is None:
        return _open_nofollow(entry.path, wait_for_lease=wait_for_lease, noatime=noatime)
    return _open_nofollow(
        entry.path,
        dir_fd=cursor.fd_for(entry.parent),
        name=entry.name,
        wait_for_lease=wait_for_lease,
        noatime=noatime,
    )


def window_files() -> int:
    """Entries in the read-ahead window (each may hold a descriptor): ``PREFETCH_FILES``,
    but no more than a quarter of the soft ``RLIMIT_NOFILE`` (the walk's directories take at
    most an eighth), unless that is below 16."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        return PREFETCH_FILES
    return min(PREFETCH_FILES, max(16, soft // 4))


def prefetched(entries: Iterable[FileEntry]) -> Generator[tuple[FileEntry, int], None, None]:
    """Each entry of ``entries``, in order, with a descriptor of it already open, or -1.

    Archiving reads one file at a time, so the disk has one request in flight (as with GNU
    tar); on a cold cache with many small files that is mostly waiting. This keeps a window
    of entries ahead of the writer (up to ``window_files()`` entries, ``PREFETCH_BYTES`` of
    data and member names): each regular file with data is opened as it joins the window
    (through its directory's descriptor, as the writer would) and the kernel asked to read
    its first ``PREFETCH_BYTES`` (``posix_fadvise(WILLNEED)``), so the disk works on many
    requests at once while the writer needs no second open. The data lands in the page
    cache, not in our memory. Everything runs on the caller's thread: a helper thread cost
    more in GIL hand-offs than its system calls. A file that cannot be opened ahead (gone,
    refused, under a lease) comes with -1: the writer opens it and reports. The caller
    owns (closes) each descriptor handed out; closing the generator closes the rest.
    """
    source = iter(entries)
    if _FADVISE is None:
        for entry in source:
            yield entry, -1
        return
    advise = _FADVISE
    limit = window_files()
    cursor = DirCursor()
    window: deque[tuple[FileEntry, int, int]] = deque()
    ahead = 0
    root = _EUID == 0
    directory: DirHandle | None = None  # the one ``cursor`` has pinned, at ``dir_fd``
    dir_fd = -1
    try:
        while True:
            while len(window) < limit and ahead < PREFETCH_BYTES:
                following = next(source, None)
                if following is None:
                    break
                entry = following
                st = entry.st
                cost = len(entry.arcname)
                fd = -1
                if st.st_mode & _S_IFMT == _S_IFREG and st.st_size and entry.carry is None:
                    length = min(st.st_size, PREFETCH_BYTES)
                    cost += length
                    parent = entry.parent
                    noatime = root or st.st_uid == _EUID
                    try:
                        if parent is None:
                            fd = _open_nofollow(entry.path, wait_for_lease=False, noatime=noatime)
                        else:
                            if parent is not directory:
                                directory = None
                                dir_fd = cursor.fd_for(parent)
                                directory = parent
                            fd = _open_nofollow(
                                entry.path,
                                dir_fd=dir_fd,
                                name=entry.name,
                                wait_for_lease=False,
                                noatime=noatime,
                            )
                    except OSError:
                        pass  # the writer tries again, and reports
                    else:
                        try:
                            advise(fd, 0, length, os.POSIX_FADV_WILLNEED)
                        except OSError:
                            pass
                window.append((entry, fd, cost))
                ahead += cost
            if not window:
                return
            entry, fd, cost = window.popleft()
            ahead -= cost
            yield entry, fd
    finally:
        for _entry, fd, _cost in window:
            if fd >= 0:
                os.close(fd)
        cursor.release()


def _unopened(entries: Iterable[FileEntry]) -> Generator[tuple[FileEntry, int], None, None]:
    for entry in entries:
        yield entry, -1


class _Xattrs:
    """Extended attributes read from an open descriptor as PAX ``SCHILY.xattr.*`` records,
    in the namespaces of ``fs.xattrs.namespaces``."""

    def __init__(self, warn: Warn) -> None:
        self.warn = warn
        self.prefixes = xattr_namespaces()

    def read(self, fd: int, entry: FileEntry) -> dict[str, str] | None:
        """The attributes of ``fd`` as PAX records, or None when it has none."""
        try:
            names = os.listxattr(fd)
        except OSError as exc:
            self.failed(entry, exc)
            return None
        return self.records(fd, entry, names) if names else None

    def failed(self, entry: FileEntry, exc: OSError) -> None:
        """``listxattr`` failed: a warning, unless the filesystem keeps none."""
        if exc.errno not in XATTR_UNSUPPORTED:
            self.warn(
                "unreadable", f"{entry.path}: cannot list extended attributes ({exc.strerror})"
            )

    def records(self, fd: int, entry: FileEntry, names: list[str]) -> dict[str, str] | None:
        """The attributes ``names`` (listed from ``fd``) as PAX records, or None."""
        path = entry.path
        out: dict[str, str] = {}
        for name in sorted(names):
            if not name.startswith(self.prefixes):
                continue
            if "=" in name or not name.isprintable() or not _encodable(name):
                self.warn("skipped", f"{path}: extended attribute {name!r} cannot be archived")
                continue
            try:
                value = os.getxattr(fd, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # removed since it was listed: churn
                    self.warn(
                        "unreadable",
                        f"{path}: cannot read extended attribute {name} ({exc.strerror})",
                    )
                continue
            out[XATTR_PREFIX + name] = value.decode("utf-8", "surrogateescape")
        return out or None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class _Counts:
    files: int = 0  # every member that is not a directory
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    data: int = 0


def write_tar(
    entries: Iterable[FileEntry],
    out: TarOut,
    stats: ArchiveStats,
    warn: Warn,
    *,
    prefetch: bool = False,
    index: IndexWriter | None = None,
) -> None:
    """Write each entry as a tar member (data read through its directory's descriptor).

    A regular file is archived only when the object opened is the one the walk saw (type
    and ``(st_dev, st_ino)``); one that changed size while read is padded or truncated to
    the header's size, as GNU tar does, with a ``changed`` warning. ``prefetch`` reads
    ahead of ``entries`` (:func:`prefetched`).

    ``index`` gets one record per path, archived or not: an entry whose ``carry`` is set
    (unchanged since the parent backup) is indexed and not archived; a file read only in
    part is indexed as such (the next backup archives it again).
    """
    items = prefetched(entries) if prefetch else _unopened(entries)
    counts = _Counts()
    hardlinks: dict[tuple[int, int], str] = {}
    cursor = DirCursor()
    xattr_reader = _Xattrs(warn)
    try:
        _write_members(items, out, counts, warn, hardlinks, cursor, xattr_reader, index)
    finally:
        items.close()
        cursor.release()
        stats.file_count += counts.files
        stats.dirs += counts.dirs
        stats.symlinks += counts.symlinks
        stats.hardlinks += counts.hardlinks
        stats.uncompressed_bytes += counts.data


# A regular file is written here with no call of ours but its header and its data.
# Long: the per-member loop, on the hot path (a split would cost calls per small file).
def _write_members(
    items: Iterator[tuple[FileEntry, int]],
    out: TarOut,
    counts: _Counts,
    warn: Warn,
    hardlinks: dict[tuple[int, int], str],
    cursor: DirCursor,
    xattr_reader: _Xattrs,
    index: IndexWriter | None = None,
) -> None:
    files = data = 0
    add_file = out.add_file
    listxattr = os.listxattr
    fstat = os.fstat
    close = os.close
    try:
        for entry, fd in items:
            st = entry.st
            mode = st.st_mode
            if entry.carry is not None and index is not None:
                if fd >= 0:
                    close(fd)
                index.carry(entry, entry.carry)
                continue
            if mode & _S_IFMT != _S_IFREG:
                if mode & _S_IFMT == _S_IFDIR:
                    _write_dir(entry, out, xattr_reader)
                    counts.dirs += 1
                    if index is not None:
                        index.add(entry)
                elif mode & _S_IFMT == _S_IFLNK:
                    target = _write_symlink(entry, out, warn, cursor)
                    if target is not None:
                        counts.symlinks += 1
                        files += 1
                        if index is not None:
                            index.add(entry, target)
                # sources already skip FIFOs, sockets and devices with a note
                continue
            if st.st_nlink > 1 and (st.st_dev, st.st_ino) in hardlinks:
                if fd >= 0:
                    close(fd)
                _write_hardlink(entry, out, hardlinks[st.st_dev, st.st_ino])
                counts.hardlinks += 1
                files += 1
                if index is not None:
                    index.add(entry)
                continue
            if fd < 0:
                fd = _open_for_writer(entry, cursor, warn)
                if fd < 0:
                    continue
            try:
                opened = fstat(fd)
                if opened.st_mode & _S_IFMT != _S_IFREG:
                    warn(
                        "vanished",
                        f"{entry.path}: replaced by a special file while reading; skipped",
                    )
                    continue
                if opened.st_ino != st.st_ino or opened.st_dev != st.st_dev:
                    warn(
                        "vanished", f"{entry.path}: replaced by another file while reading; skipped"
                    )
                    continue
                size = st.st_size
                try:
                    names = listxattr(fd)
                except OSError as exc:
                    xattr_reader.failed(entry, exc)
                    names = None
                header = member_header(
                    entry.arcname,
                    tarfile.REGTYPE,
                    mode & 0o7777,
                    st.st_uid,
                    st.st_gid,
                    size,
                    st.st_mtime_ns,
                    "",
                    xattr_reader.records(fd, entry, names) if names else None,
                )
                complete = False
                try:
                    got = add_file(header, fd, size)
                except ReadFailed as failed:
                    # The member was completed with zeros: the tar stays consistent, as
                    # GNU tar keeps it.
                    warn(
                        "unreadable",
                        f"{entry.path}: read error ({failed.error.strerror}); "
                        "rest filled with zeros",
                    )
                else:
                    complete = got == size
                    if not complete:
                        _changed(entry, fd, size, got, warn)
                if index is not None:
                    index.add(entry, None, not complete)
            finally:
                close(fd)
            if st.st_nlink > 1:
                hardlinks[st.st_dev, st.st_ino] = entry.arcname
            files += 1
            data += size
    finally:
        counts.files += files
        counts.data += data


def _open_for_writer(entry: FileEntry, cursor: DirCursor, warn: Warn) -> int:
    """Open ``entry`` (which the read-ahead did not open); -1, with a warning, when it
    cannot be."""
    try:
        return _open_entry(entry, cursor)
    except FileNotFoundError:
        warn("vanished", f"{entry.path}: vanished while reading")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            warn("vanished", f"{entry.path}: replaced by a symlink while reading; skipped")
        else:
            warn("unreadable", f"{entry.path}: cannot open ({exc.strerror})")
    return -1


def _changed(entry: FileEntry, fd: int, size: int, got: int, warn: Warn) -> None:
    if got < size:
        warn(
            "changed",
            f"{entry.path}: shrank from {size} to {got} bytes while reading; padded with zeros",
        )
        return
    now = max(os.fstat(fd).st_size, got)
    warn("changed", f"{entry.path}: grew from {size} to {now} bytes while reading; truncated")


def _write_dir(entry: FileEntry, out: TarOut, xattr_reader: _Xattrs) -> None:
    st = entry.st
    xattrs: dict[str, str] | None = None
    handle = entry.handle
    if handle is not None:
        try:
            fd = handle.pin()
        except OSError:
            pass  # replaced since it was listed: its metadata is what the walk saw
        else:
            try:
                xattrs = xattr_reader.read(fd, entry)
            finally:
                handle.unpin()
    out.write(
        member_header(
            entry.arcname,
            tarfile.DIRTYPE,
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            0,
            st.st_mtime_ns,
            "",
            xattrs,
        )
    )


def _write_symlink(entry: FileEntry, out: TarOut, warn: Warn, cursor: DirCursor) -> str | None:
    """The symlink's member (its target returned); None (with a warning) when it is gone or
    no longer a link."""
    st = entry.st
    try:
        if entry.parent is None:
            linkname = os.readlink(entry.path)
        else:
            linkname = os.readlink(entry.name, dir_fd=cursor.fd_for(entry.parent))
    except FileNotFoundError:
        warn("vanished", f"{entry.path}: vanished while reading")
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            warn("vanished", f"{entry.path}: no longer a symlink while reading; skipped")
        else:
            warn("unreadable", f"{entry.path}: cannot read link ({exc.strerror})")
        return None
    # Symlinks keep no extended attributes: Linux allows no user.* on them.
    out.write(
        member_header(
            entry.arcname,
            tarfile.SYMTYPE,
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            0,
            st.st_mtime_ns,
            linkname,
        )
    )
    return linkname


def _write_hardlink(entry: FileEntry, out: TarOut, target: str) -> None:
    st = entry.st
    out.write(
        member_header(
            entry.arcname,
            tarfile.LNKTYPE,
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            0,
            st.st_mtime_ns,
            target,
        )
    )
