"""Downloads of a remote archive into a temp file beside the target, hashed on the way: one
streamed GET, or parallel ranged GETs; a transient error in the middle of a body starts that
download (or that part) again, up to the store's attempts."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from cloudbackup.core.errors import IntegrityError, TransientStorageError
from cloudbackup.stream.hashing import HashingSink

T = TypeVar("T")
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"
LOG = logging.getLogger("cloudbackup")

RANGED_MIN_SIZE = 64 * 1024**2  # below this, one streamed GET is always used
RANGED_PART_SIZE = 8 * 1024**2
# 1 MiB reads: 4 MiB ones allocate (mmap) and fault in fresh pages for every chunk, which
# doubled the download's wall time in the benchmark (see benchmarks/RESULTS.md).
DOWNLOAD_CHUNK = 1024**2


def fetch_archive(
    remote: Any,
    key: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Callable[[int], None] | None = None,
    concurrency: int = 1,
) -> None:
    """:func:`download` with ``concurrency`` parallel ranged GETs for an archive over
    ``RANGED_MIN_SIZE`` (``CLOUDBACKUP_S3_DOWNLOAD=ranged``), else one streamed GET."""
    parts = concurrency if concurrency > 1 and size > RANGED_MIN_SIZE else 0
    download(
        remote,
        key,
        dest,
        size=size,
        sha256=sha256,
        progress=progress,
        ranged_parts=parts,
        part_size=RANGED_PART_SIZE,
    )


def download(
    remote: Any,
    key: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Callable[[int], None] | None = None,
    ranged_parts: int = 0,
    part_size: int = RANGED_PART_SIZE,
) -> None:
    """GET ``key`` into the new file ``dest``, hashing on the way; raise IntegrityError (and
    remove ``dest``) unless it has ``size`` bytes with SHA-256 ``sha256``.

    ``ranged_parts`` > 1 fetches ``part_size`` ranges with that many parallel GETs (written
    with ``pwrite``, hashed in order as they complete); otherwise one streamed GET. The
    store retries each request; a transient error in the middle of a body starts that
    download (or that part) again, up to the store's attempts. An integrity failure is
    never retried.
    """
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if ranged_parts > 1 and size > part_size:
            sha = _download_ranged(remote, key, fd, size, ranged_parts, part_size, progress)
            count = size
        else:

            def attempt() -> tuple[Any, int]:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                return _download_stream(remote, key, fd, progress)

            sha, count = _restarting(remote, f"download of {key}", attempt)
        if count != size:
            raise IntegrityError(
                f"downloaded {count} bytes of {key}, the manifest says {size}", _INTEGRITY_HINT
            )
        digest = sha.hexdigest()
        if digest != sha256:
            raise IntegrityError(
                f"downloaded {key} has sha256 {digest}, the manifest says {sha256}; "
                "nothing was restored",
                _INTEGRITY_HINT,
            )
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)


class _Interrupted(Exception):
    """A body read failed transiently after the request itself succeeded."""

    def __init__(self, error: TransientStorageError, done: int) -> None:
        super().__init__(str(error))
        self.error, self.done = error, done


def _restarting(remote: Any, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` again when it was interrupted mid-body (requests are retried by the store)."""
    attempts = max(int(getattr(remote, "attempts", 3) or 1), 1)
    sleep = getattr(remote, "sleep", time.sleep)
    for number in range(1, attempts + 1):
        try:
            return fn()
        except _Interrupted as exc:
            if number == attempts:
                raise exc.error from None
            LOG.warning(
                "%s interrupted after %d bytes (%s); starting it again (attempt %d of %d)",
                what,
                exc.done,
                exc.error,
                number + 1,
                attempts,
            )
            sleep(min(0.5 * 2**number, 10.0))
    raise AssertionError("unreachable")


def _download_stream(
    remote: Any, key: str, fd: int, progress: Callable[[int], None] | None
) -> tuple[Any, int]:
    """One streamed GET; a writer thread hashes and writes while the next chunk arrives."""
    sha = hashlib.sha256()
    count = 0
    with remote.open(key) as body:
        sink = HashingSink(fd, sha=sha, depth=16, name="restore-writer")
        try:
            while True:
                try:
                    chunk = body.read(DOWNLOAD_CHUNK)
                except TransientStorageError as exc:
                    raise _Interrupted(exc, count) from exc
                if not chunk:
                    break
                sink.put(chunk)
                count += len(chunk)
                if progress:
                    progress(len(chunk))
        finally:
            sink.close()
    return sha, count


def _download_ranged(
    remote: Any,
    key: str,
    fd: int,
    size: int,
    workers: int,
    part_size: int,
    progress: Callable[[int], None] | None,
) -> Any:
    """Parallel ranged GETs; each part is written at its offset and hashed in order."""
    sha = hashlib.sha256()
    count = -(-size // part_size)

    def fetch(number: int) -> bytes:
        start = number * part_size
        end = min(start + part_size, size) - 1

        def attempt() -> bytes:
            try:
                return bytes(remote.open_range(key, start, end))
            except TransientStorageError as exc:  # the body read is not retried by the store
                raise _Interrupted(exc, 0) from exc

        data = _restarting(remote, f"GET of {key} part {number + 1}/{count}", attempt)
        if len(data) != end - start + 1:
            raise IntegrityError(
                f"ranged GET of {key} bytes {start}-{end} returned {len(data)} bytes",
                _INTEGRITY_HINT,
            )
        view = memoryview(data)
        offset = start
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        return data

    done_parts: dict[int, bytes] = {}
    next_to_hash = 0
    window = max(workers * 2, 2)  # bounded memory: parts in flight or waiting to be hashed
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
        pending: dict[Future[bytes], int] = {}
        submitted = 0
        try:
            while next_to_hash < count:
                while submitted < count and len(pending) + len(done_parts) < window:
                    pending[pool.submit(fetch, submitted)] = submitted
                    submitted += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    number = pending.pop(future)
                    done_parts[number] = future.result()
                while next_to_hash in done_parts:
                    data = done_parts.pop(next_to_hash)
                    sha.update(data)
                    if progress:
                        progress(len(data))
                    next_to_hash += 1
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return sha
