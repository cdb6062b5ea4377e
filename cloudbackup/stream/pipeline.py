"""The archive pipeline both ways.

Write: entries → tar (``tarwriter``) → compressor (``compress``) → SHA-256 + size
(``hashing``) → ``.partial`` file, and the tail an uploader follows; one pass over the data
with bounded memory. The main thread walks, encodes tar headers and reads file data into a
4 MiB buffer that goes to the compressor (zstd compresses on its own worker threads); a
writer thread hashes the compressed output and writes it, so hashing and disk writes
overlap with reading. Read: bytes → hash → decompress → tar members.
"""

from __future__ import annotations

import errno
import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

import zstandard

from cloudbackup.core.errors import CloudBackupError, IntegrityError, SourceError
from cloudbackup.core.model import IndexFacts
from cloudbackup.fs.dirs import Dir
from cloudbackup.fs.walk import FileEntry
from cloudbackup.stream.compress import make_compressor
from cloudbackup.stream.hashing import ArchiveTail, HashingSink
from cloudbackup.stream.index import IndexWriter
from cloudbackup.stream.tarformat import TarReader
from cloudbackup.stream.tarwriter import ArchiveStats, TarOut, Warn, write_tar


# Long: the one pass (archive, index, tail) and its undoing on any error.
def write_archive(
    entries: Iterable[FileEntry],
    directory: Dir,
    partial: str,
    *,
    compression: str,
    level: int | None,
    warn: Warn,
    progress: Callable[[int], None] | None = None,
    tail: ArchiveTail | None = None,
    prefetch: bool = False,
    index: IndexFile | None = None,
) -> ArchiveStats:
    """Write the new file ``partial`` of ``directory`` in one pass and fsync it; the
    caller publishes it under its final name. It is created relative to the directory's
    descriptor, never through a symlink and never over an existing file.

    ``tail`` follows the bytes as they are written (it is finished once the file is
    fsynced, failed on error). ``prefetch`` opens and reads ahead of ``entries`` (see
    ``tarwriter.prefetched``): only for sources whose entries stay valid once the next one
    is asked for (files on disk, not a spool removed after its entry). On any error the
    partial file is removed and the error re-raised.

    ``index``: the backup's index, written by the same pass (one record per path, archived
    or not); the caller publishes and describes it once the archive is complete.
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

    fd = directory.create(partial)
    try:
        if tail is not None:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            tail.attach(os.open(partial, flags, dir_fd=directory.fd))
        sink = HashingSink(fd, tail=tail)
    except BaseException:
        os.close(fd)
        directory.unlink(partial)
        raise
    try:
        out = TarOut(make_compressor(compression, level, sink.put), sink, progress)
        try:
            write_tar(
                entries,
                out,
                stats,
                record,
                prefetch=prefetch,
                index=index.writer if index is not None else None,
            )
            out.finish()
            if index is not None:
                index.finish()
        finally:
            sink.close()
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        directory.unlink(partial)
        if tail is not None:
            tail.fail()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise SourceError(
                f"no space left on {directory.path} while writing the archive", "free space"
            ) from None
        raise
    os.close(fd)
    stats.size = sink.size
    stats.sha256 = sink.sha.hexdigest()
    if tail is not None:
        tail.finish(stats.size)
    return stats


class IndexFile:
    """The index being written into ``partial`` of ``directory`` (created here, never over
    an existing file), hashed as written; :meth:`publish` gives it its final name."""

    def __init__(self, directory: Dir, partial: str, backup_id: str) -> None:
        self.directory = directory
        self.partial = partial
        self.sha = hashlib.sha256()
        self.size = 0
        self.fd = directory.create(partial)
        self.writer = IndexWriter(self._put, backup_id)

    def _put(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def finish(self) -> None:
        self.writer.finish()
        os.fsync(self.fd)

    def publish(self, name: str) -> IndexFacts:
        os.close(self.fd)
        self.fd = -1
        self.directory.publish(self.partial, name)
        return IndexFacts(name, self.size, self.sha.hexdigest())

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.directory.unlink(self.partial)


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
            for member in tar.headers():
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
