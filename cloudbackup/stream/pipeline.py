"""The archive pipeline both ways.

Write: entries → tar (``tarwriter``) → compressor (``compress``) → [age encryption
(``age``), when there are recipients] → SHA-256 + size (``hashing``) → ``.partial`` file, and
the tail an uploader follows; one pass over the data with bounded memory. The main thread walks, encodes tar headers and reads file data into a
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

import zstandard

from cloudbackup.core.errors import CloudBackupError, IntegrityError, SourceError
from cloudbackup.core.model import IndexFacts
from cloudbackup.fs.dirs import Dir
from cloudbackup.fs.walk import FileEntry
from cloudbackup.stream.age import Decryption, EncryptStage
from cloudbackup.stream.compress import make_compressor, open_decompressed
from cloudbackup.stream.hashing import ArchiveTail, HashingSink
from cloudbackup.stream.index import IndexWriter
from cloudbackup.stream.tarformat import TarReader
from cloudbackup.stream.tarwriter import ArchiveStats, Sink, TarOut, Warn, write_tar


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
    recipients: Sequence[str] = (),
    index: IndexFile | None = None,
) -> ArchiveStats:
    """Write the new file ``partial`` of ``directory`` in one pass and fsync it; the
    caller publishes it under its final name. It is created relative to the directory's
    descriptor, never through a symlink and never over an existing file.

    ``tail`` follows the bytes as they are written (it is finished once the file is
    fsynced, failed on error). ``prefetch`` opens and reads ahead of ``entries`` (see
    ``tarwriter.prefetched``): only for sources whose entries stay valid once the next one
    is asked for (files on disk, not a spool removed after its entry). With ``recipients``
    the compressed stream is encrypted to them (age) before it is hashed and written: the
    sha256 and size are the stored, encrypted bytes'. On any error the partial file is
    removed and the error re-raised.

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
    stage: EncryptStage | None = None
    try:
        front: Sink = sink
        if recipients:
            stage = front = EncryptStage(recipients, sink.write)
        out = TarOut(make_compressor(compression, level, front.put), front, progress)
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
            if stage is not None:
                stage.close()
                stage = None
            if index is not None:
                index.finish()
        finally:
            if stage is not None:
                stage.abort()
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
    an existing file), hashed as written; :meth:`publish` gives it its final name.

    With ``recipients`` (SPEC "Encryption") the same compressed bytes also go through an
    age stage into a second hashing sink (``<partial>`` of the encrypted name): that copy is
    the one uploaded and described by the manifest; the plaintext stays in the local dir
    only, the parent of the next incremental (the host needs no identity to read it)."""

    def __init__(
        self,
        directory: Dir,
        partial: str,
        backup_id: str,
        *,
        recipients: Sequence[str] = (),
        sealed_partial: str | None = None,
    ) -> None:
        self.directory = directory
        self.partial = partial
        self.sealed_partial = sealed_partial if recipients else None
        self.sha = hashlib.sha256()
        self.size = 0
        self.fd = directory.create(partial)
        self._sealed_fd = -1
        self._sealed: HashingSink | None = None
        self._stage: EncryptStage | None = None
        try:
            if self.sealed_partial is not None:
                self._sealed_fd = directory.create(self.sealed_partial)
                self._sealed = HashingSink(self._sealed_fd)
                self._stage = EncryptStage(recipients, self._sealed.write)
        except BaseException:
            self.discard()
            raise
        self.writer = IndexWriter(self._put, backup_id)

    def _put(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        if self._stage is not None:
            self._stage.put(data)

    def finish(self) -> None:
        self.writer.finish()
        os.fsync(self.fd)
        if self._stage is not None and self._sealed is not None:
            self._stage.close()
            self._stage = None
            self._sealed.close()
            os.fsync(self._sealed_fd)

    def publish(self, name: str, sealed_name: str | None = None) -> IndexFacts:
        """Publish the plaintext as ``name`` (and the encrypted copy as ``sealed_name``);
        the facts describe the copy that is uploaded: the encrypted one when there is one."""
        os.close(self.fd)
        self.fd = -1
        if self._sealed is not None:
            assert sealed_name is not None and self.sealed_partial is not None
            os.close(self._sealed_fd)
            self._sealed_fd = -1
            self.directory.publish(self.sealed_partial, sealed_name)
            self.directory.publish(self.partial, name)
            return IndexFacts(sealed_name, self._sealed.size, self._sealed.sha.hexdigest())
        self.directory.publish(self.partial, name)
        return IndexFacts(name, self.size, self.sha.hexdigest())

    def discard(self) -> None:
        if self._stage is not None:
            self._stage.abort()
            self._stage = None
        if self._sealed is not None:
            self._sealed.close()
            self._sealed = None
        for fd, partial in ((self.fd, self.partial), (self._sealed_fd, self.sealed_partial)):
            if fd >= 0:
                os.close(fd)
            if partial is not None:
                self.directory.unlink(partial)
        self.fd = self._sealed_fd = -1


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


def walk_stored(stream: IO[bytes] | Any, compression: str, decryption: Decryption | None) -> WalkStats:
    """Walk an archive as stored: decrypted (when ``decryption``), decompressed, read to the
    end of the ciphertext, so age authenticates every byte (its verdict is raised)."""
    if decryption is None:
        return walk_archive(open_decompressed(stream, compression))
    plain = decryption.open(stream)
    try:
        stats = walk_archive(open_decompressed(plain, compression))
        plain.drain()
    finally:
        plain.close()
    return stats
