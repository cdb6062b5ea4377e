"""The tar writer: each ``FileEntry`` becomes a tar member (PAX headers from ``tarformat``),
its data read through its directory's descriptor, into a 4 MiB buffer that feeds the
compressor; ``prefetched`` keeps the kernel reading ahead of it. The pipeline around it
(compressor, hashing, the ``.partial`` file) is ``cloudbackup.stream.pipeline``.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import stat
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from cloudbackup.fs.walk import DirCursor, FileEntry
from cloudbackup.fs.xattrs import UNSUPPORTED as XATTR_UNSUPPORTED
from cloudbackup.fs.xattrs import namespaces as xattr_namespaces
from cloudbackup.stream.compress import Compressor
from cloudbackup.stream.hashing import HashingSink
from cloudbackup.stream.tarformat import XATTR_PREFIX, member_header

CHUNK = 4 * 1024 * 1024
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(CHUNK)
_NOATIME = getattr(os, "O_NOATIME", 0)
PREFETCH_BYTES = 64 * 1024 * 1024
PREFETCH_FILES = 1024
_FADVISE = getattr(os, "posix_fadvise", None)


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


class TarOut:
    """Accumulates tar bytes in a fixed buffer and feeds the compressor in big chunks."""

    def __init__(
        self, compressor: Compressor, sink: HashingSink, progress: Callable[[int], None] | None
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

    def copy_from(self, reader: io.FileIO, remaining: int) -> int:
        """Read up to ``remaining`` bytes straight into the buffer; returns bytes read.

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
                    _FADVISE(reader.fileno(), advised, PREFETCH_BYTES // 2, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                advised += PREFETCH_BYTES // 2
            if self.pos == CHUNK:
                self.flush()
            want = min(remaining, CHUNK - self.pos)
            n = reader.readinto(self.view[self.pos : self.pos + want])
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
) -> int:
    """Open a file for reading, never following a symlink and never waiting on a FIFO.

    With ``dir_fd``, ``name`` is opened relative to that directory descriptor and ``path``
    only names the file in errors; without it, ``path`` itself is opened (a spooled file).
    O_NONBLOCK: a file replaced by a FIFO since the walk must not hang the backup (the
    caller checks the type, then makes the descriptor blocking again for its reads). A
    regular file under a kernel lease (Samba, an NFS server) answers EWOULDBLOCK to a
    non-blocking open: it is opened again, blocking, which waits for the lease to break
    (unless ``wait_for_lease`` is false: the prefetch helper skips such a file).
    """
    target = path if dir_fd is None else name
    assert target is not None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        return os.open(target, flags | _NOATIME, dir_fd=dir_fd)
    except PermissionError:
        if not _NOATIME:
            raise
        return os.open(target, flags, dir_fd=dir_fd)  # O_NOATIME needs ownership
    except BlockingIOError:
        if not (nonblocking and wait_for_lease):
            raise
        return _open_nofollow(path, dir_fd=dir_fd, name=name, nonblocking=False)
    except OSError as exc:
        if exc.errno == errno.EPERM and _NOATIME:
            return os.open(target, flags, dir_fd=dir_fd)
        raise


def _open_entry(entry: FileEntry, cursor: DirCursor, *, wait_for_lease: bool = True) -> int:
    """Open ``entry`` through its directory's descriptor (``cursor`` keeps it pinned)."""
    if entry.parent is None:
        return _open_nofollow(entry.path, wait_for_lease=wait_for_lease)
    return _open_nofollow(
        entry.path,
        dir_fd=cursor.fd_for(entry.parent),
        name=entry.name,
        wait_for_lease=wait_for_lease,
    )


def prefetched(entries: Iterable[FileEntry]) -> Iterator[FileEntry]:
    """Yield ``entries`` while the kernel reads the next ones into the page cache.

    Archiving reads one file at a time, so the disk has one request in flight (as with GNU
    tar); on a cold cache with many small files that is mostly waiting. A helper thread
    opens the regular files up to 1,024 entries / 64 MiB ahead (through their directory
    handles, as the writer does) and calls ``posix_fadvise(WILLNEED)``, so the disk works
    on many requests at once. The data lands in the page cache, not in our memory; the
    archive still reads every byte itself. Member names count against the 64 MiB too, so
    a window of very deep paths stays small.
    """
    if _FADVISE is None:
        yield from entries
        return
    work: queue.SimpleQueue[tuple[FileEntry, int] | None] = queue.SimpleQueue()

    def advise() -> None:
        cursor = DirCursor()
        try:
            while (item := work.get()) is not None:
                entry, length = item
                try:
                    fd = _open_entry(entry, cursor, wait_for_lease=False)
                except OSError:
                    continue  # the archive reports what it cannot read
                try:
                    _FADVISE(fd, 0, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                finally:
                    os.close(fd)
                del entry, item
        finally:
            cursor.release()

    helper = threading.Thread(target=advise, name="prefetch", daemon=True)
    helper.start()
    window: deque[tuple[FileEntry, int]] = deque()
    ahead = 0
    source = iter(entries)
    try:
        while True:
            while len(window) < PREFETCH_FILES and ahead < PREFETCH_BYTES:
                entry = next(source, None)
                if entry is None:
                    break
                cost = len(entry.arcname)
                if stat.S_ISREG(entry.st.st_mode) and entry.st.st_size:
                    length = min(entry.st.st_size, PREFETCH_BYTES)
                    work.put((entry, length))
                    cost += length
                window.append((entry, cost))
                ahead += cost
            if not window:
                return
            entry, cost = window.popleft()
            ahead -= cost
            yield entry
    finally:
        work.put(None)


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
            if exc.errno not in XATTR_UNSUPPORTED:
                self.warn(
                    "unreadable",
                    f"{entry.path}: cannot list extended attributes ({exc.strerror})",
                )
            return None
        if not names:
            return None
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


def write_tar(
    entries: Iterable[FileEntry],
    out: TarOut,
    stats: ArchiveStats,
    warn: Warn,
) -> None:
    """Write each entry as a tar member (data read through its directory's descriptor).

    A regular file is archived only when the object opened is the one the walk saw (type
    and ``(st_dev, st_ino)``); one that changed size while read is padded or truncated to
    the header's size, as GNU tar does, with a ``changed`` warning.
    """
    hardlinks: dict[tuple[int, int], str] = {}
    cursor = DirCursor()
    xattr_reader = _Xattrs(warn)
    try:
        for entry in entries:
            _write_member(entry, out, stats, warn, hardlinks, cursor, xattr_reader)
    finally:
        cursor.release()


# Long: one member per call, on the hot path: split, it would cost calls per small file.
def _write_member(
    entry: FileEntry,
    out: TarOut,
    stats: ArchiveStats,
    warn: Warn,
    hardlinks: dict[tuple[int, int], str],
    cursor: DirCursor,
    xattr_reader: _Xattrs,
) -> None:
    st = entry.st
    mode = st.st_mode
    mtime = st.st_mtime_ns
    xattrs: dict[str, str] | None = None
    perm = stat.S_IMODE(mode)
    if stat.S_ISDIR(mode):
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
                entry.arcname, tarfile.DIRTYPE, perm, st.st_uid, st.st_gid, 0, mtime, "", xattrs
            )
        )
        stats.dirs += 1
        return
    if stat.S_ISLNK(mode):
        try:
            if entry.parent is None:
                linkname = os.readlink(entry.path)
            else:
                linkname = os.readlink(entry.name, dir_fd=cursor.fd_for(entry.parent))
        except FileNotFoundError:
            warn("vanished", f"{entry.path}: vanished while reading")
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                warn("vanished", f"{entry.path}: no longer a symlink while reading; skipped")
            else:
                warn("unreadable", f"{entry.path}: cannot read link ({exc.strerror})")
            return
        # Symlinks keep no extended attributes: Linux allows no user.* on them.
        out.write(
            member_header(
                entry.arcname, tarfile.SYMTYPE, perm, st.st_uid, st.st_gid, 0, mtime, linkname
            )
        )
        stats.symlinks += 1
        stats.file_count += 1
        return
    if not stat.S_ISREG(mode):
        return  # sources already skip FIFOs, sockets and devices with a note
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in hardlinks:
        out.write(
            member_header(
                entry.arcname,
                tarfile.LNKTYPE,
                perm,
                st.st_uid,
                st.st_gid,
                0,
                mtime,
                hardlinks[key],
            )
        )
        stats.hardlinks += 1
        stats.file_count += 1
        return
    try:
        fd = _open_entry(entry, cursor)
    except FileNotFoundError:
        warn("vanished", f"{entry.path}: vanished while reading")
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            warn("vanished", f"{entry.path}: replaced by a symlink while reading; skipped")
        else:
            warn("unreadable", f"{entry.path}: cannot open ({exc.strerror})")
        return
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        warn("vanished", f"{entry.path}: replaced by a special file while reading; skipped")
        return
    if (opened.st_dev, opened.st_ino) != key:
        os.close(fd)
        warn("vanished", f"{entry.path}: replaced by another file while reading; skipped")
        return
    os.set_blocking(fd, True)  # a short read must mean end of file, never EAGAIN
    with io.FileIO(fd, "rb", closefd=True) as reader:
        xattrs = xattr_reader.read(fd, entry)
        size = st.st_size
        out.write(
            member_header(
                entry.arcname, tarfile.REGTYPE, perm, st.st_uid, st.st_gid, size, mtime, "", xattrs
            )
        )
        try:
            got = out.copy_from(reader, size)
        except OSError as exc:
            # Header already written: keep the tar consistent, as GNU tar does.
            got = -1
            warn(
                "unreadable",
                f"{entry.path}: read error ({exc.strerror}); rest filled with zeros",
            )
        if got >= 0 and got < size:
            warn(
                "changed",
                f"{entry.path}: shrank from {size} to {got} bytes while reading; padded with zeros",
            )
        if got < size:
            out.zeros(size - max(got, 0))
        elif got == size:
            now = os.fstat(reader.fileno()).st_size
            if now > size:
                warn(
                    "changed",
                    f"{entry.path}: grew from {size} to {now} bytes while reading; truncated",
                )
    if size % BLOCK:
        out.write(bytes(BLOCK - size % BLOCK))
    if st.st_nlink > 1:
        hardlinks[key] = entry.arcname
    stats.file_count += 1
    stats.uncompressed_bytes += size


