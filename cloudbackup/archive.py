"""The streaming archive writer: entries → tar → compressor → SHA-256 + size → ``.partial``.

One pass over the data with bounded memory. The main thread walks, encodes tar headers
and reads file data into a 4 MiB buffer that goes to the compressor (zstd compresses on
its own worker threads); a writer thread hashes the compressed output and writes it, so
hashing and disk writes overlap with reading.
"""

from __future__ import annotations

import bz2
import errno
import hashlib
import io
import lzma
import os
import queue
import stat
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from cloudbackup.errors import CloudBackupError, IntegrityError, SourceError
from cloudbackup.tarformat import XATTR_PREFIX, TarReader, member_header
from cloudbackup.walk import DirCursor, FileEntry

CHUNK = 4 * 1024 * 1024
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(CHUNK)
_NOATIME = getattr(os, "O_NOATIME", 0)
PREFETCH_BYTES = 64 * 1024 * 1024
PREFETCH_FILES = 1024
_FADVISE = getattr(os, "posix_fadvise", None)


Warn = Callable[[str, str], None]  # (category, message)


class Compressor(Protocol):
    def compress(self, data: Any, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: Any) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


class _Zstd:
    """zstd through a stream writer: output goes to ``emit`` in 1 MiB pieces as it is
    produced (a compressobj would hand back multi-MiB chunks and hold more memory)."""

    class _Out:
        def __init__(self, emit: Callable[[bytes], None]) -> None:
            self.emit = emit

        def write(self, data: Any) -> int:
            self.emit(bytes(data))
            return len(data)

    def __init__(self, level: int, emit: Callable[[bytes], None]) -> None:
        # threads=-1: one worker per core; compression overlaps with our reading.
        cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
        self._writer = cctx.stream_writer(
            self._Out(emit),  # type: ignore[arg-type]
            write_size=1024 * 1024,
            closefd=False,
        )

    def compress(self, data: Any) -> bytes:
        self._writer.write(data)
        return b""

    def flush(self) -> bytes:
        self._writer.flush(zstandard.FLUSH_FRAME)
        return b""


def make_compressor(
    compression: str, level: int | None, emit: Callable[[bytes], None] | None = None
) -> Compressor:
    if compression == "zstd":
        if emit is None:
            raise ValueError("zstd needs an output callback")
        return _Zstd(level or 3, emit)
    if compression == "gzip":
        return zlib.compressobj(level or 6, zlib.DEFLATED, 31)  # 31: gzip container
    if compression == "xz":
        return lzma.LZMACompressor(preset=6 if level is None else level)
    if compression == "bzip2":
        return bz2.BZ2Compressor(level or 9)
    if compression == "none":
        return _Identity()
    raise ValueError(f"unknown compression {compression!r}")


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


class ArchiveAbandoned(CloudBackupError):
    """The archive a tail follows was not completed (the backup failed or was refused)."""


class ArchiveTail:
    """Follows an archive while it is written, for a reader that must not wait for the end
    (the streaming uploader sends parts while later ones are still being compressed).

    The writer reports how many bytes are on disk; the reader waits for a range and reads it
    back with ``pread`` on its own descriptor (from the page cache), so the tail holds no
    data and survives the rename of the ``.partial`` file.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.fd: int | None = None
        self.written = 0
        self.size: int | None = None  # set once the archive is complete and fsynced
        self.failed = False

    def attach(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def advance(self, total: int) -> None:
        with self._cond:
            self.written = total
            self._cond.notify_all()

    def finish(self, size: int) -> None:
        with self._cond:
            self.written = self.size = size
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()

    def wait_for(self, end: int) -> tuple[int, int | None]:
        """Block until ``end`` bytes are written or the archive is complete.

        Returns (bytes written, final size or None); raises ArchiveAbandoned when the
        writer failed or the backup was given up.
        """
        with self._cond:
            while not self.failed and self.size is None and self.written < end:
                self._cond.wait()
            if self.failed:
                raise ArchiveAbandoned("the archive was not completed")
            return self.written, self.size

    def close(self) -> None:
        self.fail()  # wakes a reader still waiting
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class HashingSink:
    """Hashes and writes chunks to ``fd`` on its own thread (hashlib and os.write release
    the GIL); at most ``depth`` chunks wait, so memory stays bounded. A ``tail`` is told
    how far the file has been written."""

    def __init__(
        self,
        fd: int,
        *,
        sha: Any = None,
        depth: int = 8,
        name: str = "archive-writer",
        tail: ArchiveTail | None = None,
    ) -> None:
        self.fd = fd
        self.sha = sha if sha is not None else hashlib.sha256()
        self.size = 0
        self.tail = tail
        self.error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self.error is not None:
                continue
            try:
                self.sha.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view) :]
                self.size += len(chunk)
                if self.tail is not None:
                    self.tail.advance(self.size)
            except BaseException as exc:  # surfaced on the main thread
                self.error = exc

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        if chunk:
            self._queue.put(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


class _TarOut:
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


_XATTR_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP}


class _Xattrs:
    """Extended attributes read from an open descriptor as PAX ``SCHILY.xattr.*`` records.

    ``user.*`` always; ``security.*`` and ``trusted.*`` when running as root (as GNU tar
    ``--xattrs`` would need them to restore). System attributes (POSIX ACLs) are not kept.
    """

    def __init__(self, warn: Warn) -> None:
        self.warn = warn
        root = os.geteuid() == 0
        self.prefixes: tuple[str, ...] = ("user.", "security.", "trusted.") if root else ("user.",)

    def read(self, fd: int, entry: FileEntry) -> dict[str, str] | None:
        """The attributes of ``fd`` as PAX records, or None when it has none."""
        try:
            names = os.listxattr(fd)
        except OSError as exc:
            if exc.errno not in _XATTR_UNSUPPORTED:
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
    out: _TarOut,
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


def _write_member(
    entry: FileEntry,
    out: _TarOut,
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


def write_archive(
    entries: Iterable[FileEntry],
    partial: Path,
    *,
    compression: str,
    level: int | None,
    warn: Warn,
    progress: Callable[[int], None] | None = None,
    tail: ArchiveTail | None = None,
    prefetch: bool = False,
) -> ArchiveStats:
    """Write ``partial`` in one pass and fsync it; the caller renames it into place.

    ``tail`` follows the bytes as they are written (it is finished once the file is
    fsynced, failed on error). ``prefetch`` reads ahead of ``entries`` (see
    :func:`prefetched`): only for sources whose entries stay valid once the next one is
    asked for (files on disk, not a spool removed after its entry). On any error the partial file is removed and the error
    re-raised.
    """
    stats = ArchiveStats()

    def record(category: str, message: str) -> None:
        stats.warnings.append(message)
        if category == "unreadable":
            stats.unreadable += 1
        elif category == "vanished":
            stats.vanished += 1
        elif category == "changed":
            stats.changed += 1
        warn(category, message)

    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if tail is not None:
            tail.attach(partial)
        sink = HashingSink(fd, tail=tail)
    except BaseException:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    try:
        out = _TarOut(make_compressor(compression, level, sink.put), sink, progress)
        try:
            write_tar(prefetched(entries) if prefetch else entries, out, stats, record)
            out.finish()
        finally:
            sink.close()
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        partial.unlink(missing_ok=True)
        if tail is not None:
            tail.fail()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise SourceError(
                f"no space left on {partial.parent} while writing the archive", "free space"
            ) from None
        raise
    os.close(fd)
    stats.size = sink.size
    stats.sha256 = sink.sha.hexdigest()
    if tail is not None:
        tail.finish(stats.size)
    return stats


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


def commit(partial: Path, final: Path) -> None:
    """Atomically publish a fsynced partial file and make the rename durable."""
    os.rename(partial, final)
    fsync_dir(final.parent)


def write_file_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """temp → fsync → rename → fsync dir, for manifests and state files."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    commit(partial, path)


# ---------------------------------------------------------------- reading


class HashingReader(io.RawIOBase):
    """Wraps a stream; hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int], None] | None = None) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self.sha.update(data)
            self.count += n
            if self.progress:
                self.progress(n)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size is not None and size >= 0 else CHUNK)
        if data:
            self.sha.update(data)
            self.count += len(data)
            if self.progress:
                self.progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def open_decompressed(stream: Any, compression: str) -> Any:
    """A readable stream of the tar bytes inside a compressed archive stream."""
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            stream, read_size=1024 * 1024, read_across_frames=True
        )  # type: ignore[return-value]
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(stream, "rb")
    if compression == "bzip2":
        return bz2.BZ2File(stream, "rb")
    if compression == "none":
        return stream
    raise ValueError(f"unknown compression {compression!r}")


@dataclass
class WalkStats:
    file_count: int = 0
    uncompressed_bytes: int = 0
    dirs: int = 0


def walk_archive(stream: IO[bytes]) -> WalkStats:
    """Read a tar stream to its end, counting members as the writer counted them (member
    data is read through, not looked at; the stream must end with an end-of-archive block)."""
    stats = WalkStats()
    try:
        with TarReader(cast(BinaryIO, stream)) as tar:
            for member in tar:
                if member.isdir():
                    stats.dirs += 1
                    continue
                stats.file_count += 1
                if member.isreg():
                    stats.uncompressed_bytes += member.size
    except (
        tarfile.TarError,
        EOFError,
        zstandard.ZstdError,
        lzma.LZMAError,
        OSError,
        zlib.error,
    ) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
            raise CloudBackupError(f"cannot read the archive: {exc}") from exc
        raise IntegrityError(f"the archive is truncated or corrupt ({exc})") from exc
    return stats


def open_regular(path: Path) -> io.FileIO:
    """Open a file of the local dir for reading: never through a symlink (the local dir can
    be written by others: a planted link must not make us read, upload or restore the file
    it points to), and only a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return io.FileIO(fd, "rb", closefd=True)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open_regular(path) as handle:
        while True:
            n = handle.readinto(view)  # type: ignore[attr-defined]
            if not n:
                break
            sha.update(view[:n])
            size += n
            if progress:
                progress(n)
    return sha.hexdigest(), size
