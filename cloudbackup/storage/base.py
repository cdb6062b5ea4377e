"""The small store protocol shared by the local directory and S3."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Protocol


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
