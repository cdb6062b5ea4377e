"""The small store protocol shared by the local directory and S3, and the values that go in
and out of a remote store (what to write, what an upload left, how a copy compares)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Protocol


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


class GrowingFile(Protocol):
    """A file still being written (an archive followed by the streaming uploader)."""

    fd: int | None

    def wait_for(self, end: int) -> tuple[int, int | None]:
        """Block until ``end`` bytes exist or the file is complete: (written, final size)."""
        ...


class Store(Protocol):
    """Keys are ``/``-separated paths; ``where`` is ``local`` or ``remote``."""

    where: str

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def head(self, key: str) -> ObjectHead | None: ...

    def open(self, key: str) -> IO[bytes]: ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes, *, kind: str = "manifest") -> None: ...

    def delete(self, key: str) -> None: ...


def checksums_match(expected: str | None, actual: str | None) -> bool:
    """Compare checksums; tolerate stores that omit the ``-N`` suffix of composite ones."""
    if not expected or not actual:
        return False
    exp_value, _, exp_n = expected.partition("-")
    act_value, _, act_n = actual.partition("-")
    return exp_value == act_value and (not act_n or not exp_n or exp_n == act_n)


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


@dataclass
class SentParts:
    """The parts of one multipart upload that are in S3, ready to complete."""

    upload_id: str
    count: int = 0
    checksums: dict[int, str] = field(default_factory=dict)
    etags: dict[int, str] = field(default_factory=dict)
    reused: int = 0


def head_problems(head: Any, size: int, sha256: str, checksum: str | None) -> list[str]:
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
