"""Dry run as a wrapper over any store: reads pass through, writes are recorded, not done.

The use cases run their one code path against this wrapper, so a dry run goes through
exactly the decisions a real run makes (restic's lesson: dry-run is a backend, not an ``if``).
Only the read operations listed in ``_READS`` reach the wrapped store; any other attribute
that is a method is refused, so a write method added to a store later cannot slip through a
dry run unnoticed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from cloudbackup.storage.base import ObjectHead, ObjectInfo

# Read-only operations and plain attributes that are passed to the wrapped store.
_READS = frozenset({"list_uploads", "list_parts", "describe", "path", "root"})


@dataclass(frozen=True)
class RecordedWrite:
    """One write a dry run did not do: ``op`` is ``delete``, ``put``, ``upload`` or ``abort``."""

    op: str
    key: str


class DryRunStore:
    """Delegates reads to ``inner`` and records ``delete``/``put_bytes``/uploads/aborts."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.where: str = getattr(inner, "where", "remote")
        self.writes: list[RecordedWrite] = []

    # -- what a dry run would have done

    @property
    def deleted(self) -> list[str]:
        return [w.key for w in self.writes if w.op == "delete"]

    @property
    def put(self) -> list[str]:
        return [w.key for w in self.writes if w.op in ("put", "upload")]

    # -- reads: passed through

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)  # type: ignore[no-any-return]

    def head(self, key: str) -> ObjectHead | None:
        return self.inner.head(key)  # type: ignore[no-any-return]

    def open(self, key: str, **kwargs: Any) -> IO[bytes]:
        return self.inner.open(key, **kwargs)  # type: ignore[no-any-return]

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)  # type: ignore[no-any-return]

    # -- writes: recorded

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> None:
        self.writes.append(RecordedWrite("put", key))

    def delete(self, key: str) -> None:
        self.writes.append(RecordedWrite("delete", key))

    def upload_file(self, key: str, path: Any, spec: Any, **kwargs: Any) -> Any:
        self.writes.append(RecordedWrite("upload", key))
        return None

    def abort(self, key: str, upload_id: str) -> None:
        self.writes.append(RecordedWrite("abort", key))

    def probe_write(self, key: str) -> None:
        self.writes.append(RecordedWrite("probe", key))

    def __getattr__(self, name: str) -> Any:
        if name in _READS:
            return getattr(self.inner, name)
        raise AttributeError(f"{name!r} is not available on a dry-run store")
