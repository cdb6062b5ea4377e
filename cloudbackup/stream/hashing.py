"""SHA-256 and size in the same pass as the data: a hashing sink for the writer (on its own
thread), a hashing reader for restore and verify, and the tail an uploader follows while
the archive is still being written."""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cloudbackup.core.errors import CloudBackupError
from cloudbackup.fs.files import open_regular

CHUNK = 4 * 1024 * 1024


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

    def attach(self, source: Path | int) -> None:
        """Follow the file at ``source``, or the one open for reading as descriptor
        ``source`` (the tail then owns it)."""
        self.fd = source if isinstance(source, int) else os.open(source, os.O_RDONLY | os.O_CLOEXEC)

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
                self.write(chunk)
            except BaseException as exc:  # surfaced on the main thread
                self.error = exc

    def write(self, chunk: bytes | memoryview) -> None:
        """Hash and write ``chunk`` now, on the caller's thread: for a stage that has a
        thread of its own (encryption's, which reads the child's output into one reused
        buffer), instead of ``put``. A caller uses one of the two, never both."""
        self.sha.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(chunk)
        if self.tail is not None:
            self.tail.advance(self.size)

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


class Readable(Protocol):
    """Anything with ``read`` (a file, a store's streaming GET)."""

    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader(io.RawIOBase):
    """Wraps a stream; hashes and counts every byte read through it."""

    def __init__(self, raw: Readable, progress: Callable[[int], None] | None = None) -> None:
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
