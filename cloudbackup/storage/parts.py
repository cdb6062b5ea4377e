"""The resumable multipart upload every remote store shares: part sizes, the parallel parts
loop (bounded memory; a part already in the store is reused only when it provably holds the
same bytes), growing files, and completion that never overwrites.

A store gives the primitives (create an upload, put one part, list the parts, complete,
abort, put a small object whole, and whether an object already there holds given bytes);
:class:`MultipartStore` drives them, so the upload record (part size, part count, SHA-256
per part and their composite) is the same whatever the destination.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from cloudbackup.core.errors import CloudBackupError, IntegrityError, PermanentStorageError
from cloudbackup.storage.base import (
    GrowingFile,
    LocalFile,
    ObjectHead,
    OnCreated,
    PartInfo,
    Progress,
    SentParts,
    UploadOutcome,
    UploadSpec,
    composite_checksum,
    sha256_b64,
)

LOG = logging.getLogger("cloudbackup")

MIN_PART = 5 * 1024**2
DEFAULT_PART = 8 * 1024**2  # as the AWS CLI; parts in flight are held in memory
MIN_CHOSEN_PART = 8 * 1024**2
MAX_PART = 5 * 1024**3
MAX_PARTS = 10_000
MAX_OBJECT = 5 * 1024**4  # S3's documented limit for one object

# Codes of an upload that no longer exists (completed by a run that died before recording
# it, or aborted).
GONE_CODES = ("NoSuchUpload", "NoSuchKey", "404", "NotFound")


def choose_part_size(size: int, preferred: int | None = None) -> int:
    """At least 8 MiB (or ``preferred``, never below 5 MiB), and large enough for 10,000 parts."""
    if size > MAX_OBJECT:
        raise PermanentStorageError(
            f"an archive of {size} bytes exceeds S3's 5 TiB limit for one object",
            "split the source into several smaller sources",
        )
    part = max(preferred or DEFAULT_PART, MIN_PART)
    if preferred is None:
        part = max(part, MIN_CHOSEN_PART)
    needed = -(-size // MAX_PARTS) if size else MIN_PART
    if needed > part:
        # Round up to a whole MiB so the value reads well in manifests.
        part = -(-needed // (1024**2)) * 1024**2
    if part > MAX_PART:
        raise PermanentStorageError(f"an archive of {size} bytes exceeds S3's 10,000 × 5 GiB limit")
    return part


def file_size(file: LocalFile) -> int:
    return os.fstat(file.fileno()).st_size


def part_digests(fd: int, size: int, part_size: int) -> list[str]:
    """The SHA-256 (base64) of each ``part_size`` slice of the first ``size`` bytes of ``fd``."""
    digests = []
    for offset in range(0, max(size, 1), part_size):
        digests.append(sha256_b64(os.pread(fd, min(part_size, size - offset), offset)))
    return digests


class MultipartStore(ABC):
    """The upload half of a remote store, over its primitives (see the module docstring)."""

    concurrency: int = 4
    part_size: int | None = None  # the preferred part size (CLOUDBACKUP_S3_PART_SIZE)

    # -- the primitives a store gives

    @abstractmethod
    def describe(self, key: str) -> str: ...

    @abstractmethod
    def head(self, key: str) -> ObjectHead | None: ...

    @abstractmethod
    def create_upload(self, key: str, spec: UploadSpec) -> str: ...

    @abstractmethod
    def list_parts(self, key: str, upload_id: str) -> builtins.list[PartInfo]: ...

    @abstractmethod
    def abort(self, key: str, upload_id: str) -> None: ...

    @abstractmethod
    def _put_part(
        self, key: str, upload_id: str, number: int, data: bytes, checksum: str, label: str
    ) -> str:
        """Store part ``number`` (``checksum``: its SHA-256, base64); its ETag."""

    @abstractmethod
    def _complete(self, key: str, sent: SentParts) -> tuple[str | None, str | None]:
        """Complete the upload without overwriting: (ETag, SHA-256 hex of the whole object
        when the store computed it). Raises PermanentStorageError ``PreconditionFailed``
        (the key exists) or ``NoSuchUpload`` (the upload is gone)."""

    @abstractmethod
    def _put_whole(self, key: str, data: bytes, spec: UploadSpec) -> str | None:
        """One object in one write, never over an existing one (PreconditionFailed); its
        ETag."""

    @abstractmethod
    def _holds(
        self, head: ObjectHead, size: int, checksum: str, part_size: int, spec: UploadSpec
    ) -> bool:
        """Does the object (``head``) provably hold the bytes whose checksum (plain SHA-256
        for one part, composite for several) is ``checksum``?"""

    def _records_checksums(self) -> bool:
        """False for a store that keeps no SHA-256 (the upload record then has none)."""
        return True

    def _reusable(self, previous: PartInfo, data: bytes, checksum: str) -> bool:
        """Is a part already in the store provably these bytes?"""
        return previous.size == len(data) and previous.checksum_sha256 == checksum

    # -- uploads

    # Long: the resumable upload's one place (resume, part size, one PUT or parts, complete).
    def upload_file(
        self,
        key: str,
        file: LocalFile,
        spec: UploadSpec,
        *,
        label: str = "",
        upload_id: str | None = None,
        part_size: int | None = None,
        on_created: OnCreated | None = None,
        progress: Progress | None = None,
    ) -> UploadOutcome:
        """Upload a complete local file: one write when small, else resumable parallel parts.

        ``upload_id``/``part_size`` resume an interrupted upload (only parts whose checksum
        matches the local bytes are reused); ``on_created`` is told a new upload's id and
        part size before any part is sent, so a crash can be resumed. An error leaves the
        multipart upload in place (expired credentials, a kill): the next run resumes it.
        """
        fd = file.fileno()
        label = label or key
        size = file_size(file)
        existing: dict[int, PartInfo] = {}
        if upload_id is not None:
            try:
                existing = {p.number: p for p in self.list_parts(key, upload_id)}
            except PermanentStorageError as exc:
                if exc.code not in GONE_CODES:
                    raise
                present = self._already_present(
                    key, fd, size, part_size or choose_part_size(size, self.part_size), spec
                )
                if present is not None:
                    LOG.info("%s is already complete; not sending it again", self.describe(key))
                    if progress:
                        progress(size)
                    return present
                LOG.info("upload %s of %s is gone; starting over", upload_id[:12], key)
                upload_id, existing = None, {}
        if part_size is None and 1 in existing:
            part_size = existing[1].size  # an upload found without its local record
        part_size = part_size or choose_part_size(size, self.part_size)
        if upload_id is not None and -(-size // part_size) > MAX_PARTS:
            # A streamed upload sized its parts from an estimate the archive outgrew: its
            # parts cannot make this archive. Start over with parts that fit.
            LOG.info(
                "upload %s of %s has %d-byte parts, too small for %d bytes; starting over",
                upload_id[:12],
                key,
                part_size,
                size,
            )
            self._abort_quietly(key, upload_id)
            upload_id, existing = None, {}
            part_size = choose_part_size(size, self.part_size)
        if size <= part_size and upload_id is None:
            return self._put_small(key, fd, size, spec, part_size, progress)
        part_count = max(1, -(-size // part_size))
        if part_count > MAX_PARTS:
            raise PermanentStorageError(
                f"{label} needs {part_count} parts of {part_size} bytes; at most "
                f"{MAX_PARTS} are allowed"
            )
        if upload_id is None:
            upload_id = self.create_upload(key, spec)
            if on_created:
                on_created(upload_id, part_size)
        ranges = (
            (n, (n - 1) * part_size, min(part_size, size - (n - 1) * part_size))
            for n in range(1, part_count + 1)
        )
        sent = self._send_parts(
            key,
            upload_id,
            fd,
            ranges,
            existing,
            progress,
            total_label=f"/{part_count}",
            file_label=label,
        )
        return self.complete_parts(key, sent, size, part_size, spec)

    def upload_growing(
        self,
        key: str,
        tail: GrowingFile,
        spec: UploadSpec,
        part_size: int,
        *,
        on_created: OnCreated | None = None,
        progress: Progress | None = None,
    ) -> SentParts | None:
        """Send the parts of a file that is still being written, each once it exists.

        The multipart upload is created only when the file outgrows one part: a smaller
        file returns ``None`` (the caller PUTs it whole, once complete). Completing is left
        to :meth:`complete_parts`, so the caller decides whether the file is kept. A file
        that would need part 10,001 raises PermanentStorageError (code ``TooManyParts``)
        before sending it; the upload is left for the caller to abort.
        """
        # One byte more than a part: a file of exactly one part is one PUT.
        written, final = tail.wait_for(part_size + 1)
        if final is not None and final <= part_size:
            return None
        upload_id = self.create_upload(key, spec)
        if on_created:
            on_created(upload_id, part_size)

        def ranges(written: int) -> Iterator[tuple[int, int, int]]:
            number, offset = 1, 0  # part 1 is there already
            while True:
                if number > MAX_PARTS:
                    raise PermanentStorageError(
                        f"{key} outgrew {MAX_PARTS} parts of {part_size} bytes while streaming",
                        code="TooManyParts",
                    )
                yield number, offset, min(part_size, written - offset)
                number, offset = number + 1, offset + part_size
                written, final = tail.wait_for(offset + part_size)
                if final is not None and final <= offset:
                    return

        assert tail.fd is not None  # open since the first byte was written
        return self._send_parts(
            key, upload_id, tail.fd, ranges(written), {}, progress, total_label="", file_label=key
        )

    # Long: the parallel parts loop keeps its state (sent, reused, in flight) in one frame.
    def _send_parts(
        self,
        key: str,
        upload_id: str,
        fd: int,
        ranges: Iterator[tuple[int, int, int]],
        existing: dict[int, PartInfo],
        progress: Progress | None,
        *,
        total_label: str,
        file_label: str,
    ) -> SentParts:
        """Send ``(number, offset, length)`` ranges of ``fd``, ``concurrency`` at a time.

        ``total_label`` follows the part number in messages (``"/12"``, or ``""`` while the
        count is unknown); ``file_label`` names the local file in a short-read error.

        Memory stays bounded: each running worker reads and holds one part; at most
        2×concurrency part numbers are queued (no data). ``ranges`` may block (a growing
        file). The first error stops the queue; it is the one raised. A part already in
        ``existing`` is kept when it provably holds the same bytes.
        """
        sent = SentParts(upload_id)
        lock = threading.Lock()

        def send(number: int, offset: int, length: int) -> None:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise IntegrityError(f"{file_label} changed while uploading (short read)")
            checksum = sha256_b64(data)
            previous = existing.get(number)
            if previous is not None and self._reusable(previous, data, checksum):
                with lock:
                    sent.reused += 1
                    sent.checksums[number] = checksum
                    sent.etags[number] = previous.etag or ""
            else:
                label = f"part {number}{total_label} of {key}"
                etag = self._put_part(key, upload_id, number, data, checksum, label)
                with lock:
                    sent.checksums[number] = checksum
                    sent.etags[number] = etag
            if progress:
                progress(len(data))

        errors: builtins.list[BaseException] = []

        def guarded(number: int, offset: int, length: int) -> None:
            if errors:  # an earlier part failed: send nothing more
                return
            try:
                send(number, offset, length)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="upload") as pool:
            pending: set[Future[None]] = set()
            try:
                for number, offset, length in ranges:
                    while len(pending) >= self.concurrency * 2 and not errors:
                        _, pending = wait(pending, return_when=FIRST_COMPLETED)
                    if errors:
                        break
                    pending.add(pool.submit(guarded, number, offset, length))
                    sent.count = number
                while pending and not errors:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
            finally:
                for future in pending:
                    future.cancel()
        if errors:
            raise errors[0]
        return sent

    def complete_parts(
        self, key: str, sent: SentParts, size: int, part_size: int, spec: UploadSpec
    ) -> UploadOutcome:
        """Complete a multipart upload, never over an existing object; accept an object
        that is already there only when it is provably these bytes."""
        expected = composite_checksum([sent.checksums[n] for n in range(1, sent.count + 1)])
        sha256 = None
        try:
            etag, sha256 = self._complete(key, sent)
        except PermanentStorageError as exc:
            # NoSuchUpload: a retried Complete whose first attempt succeeded (the response was
            # lost). PreconditionFailed: the object exists already. Either way, accept what is
            # there only when it is provably these bytes.
            if exc.code not in ("NoSuchUpload", "PreconditionFailed"):
                raise
            head = self.head(key)
            if head is None or not self._holds(head, size, expected, part_size, spec):
                raise self._differs(key) from None
            etag = head.etag
            if exc.code == "PreconditionFailed":
                self._abort_quietly(key, sent.upload_id)
        return UploadOutcome(
            key=key,
            size=size,
            part_size=part_size,
            part_count=sent.count,
            checksum=expected if self._records_checksums() else None,
            etag=etag,
            upload_id=sent.upload_id,
            parts_reused=sent.reused,
            parts_sent=sent.count - sent.reused,
            sha256=sha256,
        )

    def _differs(self, key: str) -> PermanentStorageError:
        return PermanentStorageError(
            f"{self.describe(key)} already exists and differs from the local archive",
            "a different object was written there; investigate before deleting anything",
            code="PreconditionFailed",
        )

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        try:
            self.abort(key, upload_id)
        except CloudBackupError as exc:
            LOG.warning("cannot abort the leftover upload of %s: %s", key, exc)

    def _already_present(
        self, key: str, fd: int, size: int, part_size: int, spec: UploadSpec
    ) -> UploadOutcome | None:
        """The object exists and holds exactly the local bytes (same parts): say so."""
        head = self.head(key)
        if head is None or head.size != size:
            return None
        digests = part_digests(fd, size, part_size)
        expected = composite_checksum(digests)
        if not self._holds(head, size, expected, part_size, spec):
            return None
        return UploadOutcome(
            key=key,
            size=size,
            part_size=part_size,
            part_count=len(digests),
            checksum=expected if self._records_checksums() else None,
            etag=head.etag,
            parts_reused=len(digests),
            already_present=True,
        )

    def _put_small(
        self,
        key: str,
        fd: int,
        size: int,
        spec: UploadSpec,
        part_size: int,
        progress: Progress | None,
    ) -> UploadOutcome:
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise IntegrityError(f"{key}: the local file changed while uploading (short read)")
        checksum = sha256_b64(data)
        try:
            etag = self._put_whole(key, data, spec)
        except PermanentStorageError as exc:
            # A retried PUT whose first attempt succeeded, or an object already there.
            if exc.code != "PreconditionFailed":
                raise
            head = self.head(key)
            if head is None or not self._holds(head, size, checksum, part_size, spec):
                raise self._differs(key) from None
            etag = head.etag
        if progress:
            progress(size)
        return UploadOutcome(
            key,
            size,
            part_size,
            1,
            checksum if self._records_checksums() else None,
            etag,
            sha256=hashlib.sha256(data).hexdigest(),
        )
