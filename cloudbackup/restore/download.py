"""A remote archive into a temp file beside the target, hashed on the way.

The store streams it (``RemoteStore.open``: it resumes a body interrupted mid-way, and reads
large objects in parallel ranges when configured to); this module only hashes, counts and
writes what arrives, and refuses the file unless it is exactly the bytes the manifest names.
A mismatch is an integrity failure, never retried into success.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cloudbackup.core.errors import IntegrityError
from cloudbackup.storage.base import RemoteStore
from cloudbackup.stream.hashing import HashingSink

_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"

# 1 MiB reads: 4 MiB ones allocate (mmap) and fault in fresh pages for every chunk, which
# doubled the download's wall time in the benchmark (see benchmarks/RESULTS.md).
DOWNLOAD_CHUNK = 1024**2


def fetch_archive(
    remote: RemoteStore,
    key: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """GET ``key`` into the new file ``dest``, hashing on the way (a writer thread hashes
    and writes while the next chunk arrives); raise IntegrityError (and remove ``dest``)
    unless it has ``size`` bytes with SHA-256 ``sha256``."""
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        count = 0
        with remote.open(key, size=size) as body:
            sink = HashingSink(fd, depth=16, name="restore-writer")
            try:
                while chunk := body.read(DOWNLOAD_CHUNK):
                    sink.put(chunk)
                    count += len(chunk)
                    if progress:
                        progress(len(chunk))
            finally:
                sink.close()
        if count != size:
            raise IntegrityError(
                f"downloaded {count} bytes of {remote.describe(key)}, the manifest says {size}",
                _INTEGRITY_HINT,
            )
        digest = sink.sha.hexdigest()
        if digest != sha256:
            raise IntegrityError(
                f"downloaded {remote.describe(key)} has sha256 {digest}, the manifest says "
                f"{sha256}; nothing was restored",
                _INTEGRITY_HINT,
            )
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)
