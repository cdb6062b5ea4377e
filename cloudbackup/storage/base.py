"""The remote store protocol (S3, a directory destination) and the values that go in and out
of a store: what to write, what a listing, a HEAD, an upload or a probe says, and the
checksum bookkeeping every store shares (SHA-256 per part, AWS's composite of them)."""

from __future__ import annotations

import base64
import builtins
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One LIST entry: enough to plan retention without downloading anything."""

    key: str
    size: int
    modified: datetime
    etag: str | None = None


@dataclass
class ObjectHead:
    """What HEAD says about one object."""

    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    checksum_sha256: str | None = None
    checksum_type: str | None = None
    etag: str | None = None
    storage_class: str | None = None
    parts_count: int | None = None
    lock_until: datetime | None = None


@dataclass(frozen=True)
class UploadInfo:
    """One multipart upload in progress."""

    key: str
    upload_id: str
    initiated: datetime | None


@dataclass(frozen=True)
class PartInfo:
    """One part of a multipart upload, as the store holds it."""

    number: int
    size: int
    checksum_sha256: str | None = None  # base64, as S3 gives it
    etag: str | None = None


@dataclass(frozen=True)
class WriteProbe:
    """What a write probe did (``how``, in words), the optional features the store refused,
    and what it accepted in words (None for a store without optional features)."""

    how: str
    refused: tuple[str, ...] = ()
    accepted: str | None = None


class VerifyMethod(Enum):
    """How a remote copy is verified without ``--deep``."""

    HEAD = "head"  # compare HEAD's size, sha256 metadata and checksum: nothing downloaded
    REHASH = "rehash"  # read the object back and hash it (a directory: reading is cheap)


@dataclass
class UploadSpec:
    """Everything a PUT or CreateMultipartUpload needs (validated before any I/O)."""

    metadata: dict[str, str] = field(default_factory=dict)
    tags: list[tuple[str, str]] = field(default_factory=list)
    storage_class: str = "STANDARD"
    content_type: str = "application/octet-stream"
    lock_mode: str | None = None
    lock_until: datetime | None = None


@dataclass
class UploadOutcome:
    """What an upload left: the object's size, its parts and their checksum (composite
    for several parts; None when the store keeps none), and — when the store hashed the
    whole object as it wrote it — its SHA-256 (hex)."""

    key: str
    size: int
    part_size: int
    part_count: int
    checksum: str | None
    etag: str | None
    upload_id: str | None = None
    parts_reused: int = 0
    parts_sent: int = 0
    already_present: bool = False
    sha256: str | None = None


@dataclass
class SentParts:
    """The parts of one multipart upload that are in the store, ready to complete."""

    upload_id: str
    count: int = 0
    checksums: dict[int, str] = field(default_factory=dict)
    etags: dict[int, str] = field(default_factory=dict)
    reused: int = 0


class GrowingFile(Protocol):
    """A file still being written (an archive followed by the streaming uploader)."""

    fd: int | None

    def wait_for(self, end: int) -> tuple[int, int | None]:
        """Block until ``end`` bytes exist or the file is complete: (written, final size)."""
        ...


class LocalFile(Protocol):
    """An open local file an upload reads (by ``pread``: the position is not used)."""

    def fileno(self) -> int: ...


class ReadStream(Protocol):
    """A streaming GET: ``read`` until it returns ``b""``; close it (or use ``with``)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReadStream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


Progress = Callable[[int], None]
OnCreated = Callable[[str, int], None]


class RemoteStore(Protocol):
    """Where the offsite copies go. Keys are ``/``-separated; every operation is retried on
    transient errors by the store's own retry policy, and fails with a ``StorageError``
    (``NotFound``, ``PermanentStorageError`` with a code, ``TransientStorageError`` after
    the last attempt) or an ``IntegrityError``. Nothing is ever overwritten: a write onto
    an existing key fails with ``PermanentStorageError`` code ``PreconditionFailed``."""

    where: str  # always "remote": the word used in options, output and JSON
    verify_method: VerifyMethod
    keeps_metadata: bool  # HEAD returns the metadata a write carried (S3; not a directory)

    def describe(self, key: str) -> str:
        """A human name for ``key``: ``s3://bucket/key``, ``file:///path/key``."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        ...

    def head(self, key: str) -> ObjectHead | None: ...

    def open(self, key: str, *, size: int | None = None) -> ReadStream:
        """Stream the object; a transient error in the middle of the body is resumed by
        asking again from the current offset (bounded by the retry policy). ``size`` (when
        known) lets a store read large objects in parallel ranges."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes, *, spec: UploadSpec | None = None) -> None: ...

    def delete(self, key: str) -> None: ...

    # -- multipart, resumable

    def create_upload(self, key: str, spec: UploadSpec) -> str:
        """Start a multipart upload; its id."""
        ...

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
        """Upload a complete local file: one PUT when small, else parallel parts, resuming
        ``upload_id`` (a part is reused only when it provably holds the same bytes);
        ``on_created(upload_id, part_size)`` is told before any part is sent."""
        ...

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
        """Send the parts of a file still being written, each once it exists; None when
        the file fits in one part (the caller PUTs it whole once complete)."""
        ...

    def list_parts(self, key: str, upload_id: str) -> builtins.list[PartInfo]: ...

    def complete_parts(
        self, key: str, sent: SentParts, size: int, part_size: int, spec: UploadSpec
    ) -> UploadOutcome:
        """Complete the upload, never over an existing object (one already there is
        accepted only when it provably holds these bytes)."""
        ...

    def abort(self, key: str, upload_id: str) -> None:
        """Abort an upload (one already gone is fine)."""
        ...

    def list_uploads(self, prefix: str) -> builtins.list[UploadInfo]: ...

    def probe_write(self, key: str, spec: UploadSpec) -> WriteProbe:
        """Prove write access at ``key`` without leaving anything behind."""
        ...


# ---------------------------------------------------------------- checksum bookkeeping


def sha256_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def hex_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def composite_checksum(part_checksums_b64: builtins.list[str]) -> str:
    """AWS's multipart SHA-256: the SHA-256 of the concatenated part digests, ``-N``."""
    joined = b"".join(base64.b64decode(c) for c in part_checksums_b64)
    return f"{sha256_b64(joined)}-{len(part_checksums_b64)}"


def checksums_match(expected: str | None, actual: str | None) -> bool:
    """Compare checksums; tolerate stores that omit the ``-N`` suffix of composite ones."""
    if not expected or not actual:
        return False
    exp_value, _, exp_n = expected.partition("-")
    act_value, _, act_n = actual.partition("-")
    return exp_value == act_value and (not act_n or not exp_n or exp_n == act_n)


def head_problems(head: ObjectHead, size: int, sha256: str, checksum: str | None) -> list[str]:
    """How an object (its HEAD) differs from the size, SHA-256 and checksum expected of it."""
    problems = []
    if head.size != size:
        problems.append(f"size {head.size} ≠ {size}")
    meta_sha256 = head.metadata.get("sha256")
    if meta_sha256 is not None and meta_sha256 != sha256:
        problems.append(f"sha256 metadata {meta_sha256} ≠ {sha256}")
    if meta_sha256 is None and not checksum:
        # A streamed archive has no sha256 metadata; its S3 checksum must then be checked.
        problems.append("the object has no sha256 metadata and no S3 checksum to compare")
    if checksum and head.checksum_sha256 and not checksums_match(checksum, head.checksum_sha256):
        problems.append(f"S3 checksum {head.checksum_sha256} ≠ expected {checksum}")
    if checksum and not head.checksum_sha256:
        problems.append("S3 reports no SHA-256 checksum for the object")
    return problems
