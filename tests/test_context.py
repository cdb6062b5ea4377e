"""The context is a value; its catalogs and host claim own what a run learns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import PermanentStorageError
from cloudbackup.storage.base import ObjectHead, ObjectInfo
from cloudbackup.storage.local import LocalStore

NOW = datetime(2026, 11, 21, 2, 15, tzinfo=UTC)


class Bucket:
    """Objects in memory; every call recorded."""

    bucket = "bkt"
    keeps_metadata = True

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse_put: PermanentStorageError | None = None

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls.append(("list", prefix))
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, len(self.objects[key][0]), NOW)

    def head(self, key: str) -> ObjectHead | None:
        self.calls.append(("head", key))
        if key not in self.objects:
            return None
        return ObjectHead(key=key, size=len(self.objects[key][0]), metadata=self.objects[key][1])

    def get_bytes(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return self.objects[key][0]

    def put_bytes(self, key: str, data: bytes, *, spec: Any = None) -> None:
        self.calls.append(("put", key))
        if self.refuse_put is not None:
            raise self.refuse_put
        self.objects[key] = (data, dict(spec.metadata) if spec is not None else {})


def make_ctx(tmp_path: Path, remote: Bucket | None, machine: str | None = "m1", **kw: Any) -> Context:
    settings = Settings(local_dir=tmp_path / "local", host="h1", s3_bucket="bkt", **kw)
    return Context(
        settings=settings,
        local=LocalStore(settings.local_dir),
        now=lambda: NOW,
        machine_id=machine,
        remote=remote,
    )


def test_the_context_is_frozen(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.remote = Bucket()  # type: ignore[misc]


def test_a_derived_context_gets_catalogs_of_its_own_stores(tmp_path: Path) -> None:
    bucket = Bucket()
    bucket.objects["cloudbackup/h1/www/www-20261120T021500Z.tar.zst"] = (b"x", {})
    bucket.objects["cloudbackup/h1/www/www-20261120T021500Z.manifest.json"] = (b"{}", {})
    ctx = make_ctx(tmp_path, bucket)
    assert len(ctx.remote_catalog.listing().refs) == 1
    offline = dataclasses.replace(ctx, remote=None)
    assert offline.remote_catalog.listing().refs == []
    assert offline.remote_catalog is not ctx.remote_catalog
    assert offline.host_claim is not ctx.host_claim


def test_one_listing_per_scope_until_refresh_or_invalidate(tmp_path: Path) -> None:
    bucket = Bucket()
    ctx = make_ctx(tmp_path, bucket)
    catalog = ctx.remote_catalog
    first = catalog.listing()
    assert catalog.listing() is first
    assert bucket.calls == [("list", "cloudbackup/h1/")]
    catalog.listing(all_hosts=True)
    catalog.listing(all_hosts=True)
    assert bucket.calls[1:] == [("list", "cloudbackup/")]
    bucket.objects["cloudbackup/h1/www/www-20261120T021500Z.tar.zst"] = (b"x", {})
    bucket.objects["cloudbackup/h1/www/www-20261120T021500Z.manifest.json"] = (b"{}", {})
    assert len(catalog.refresh().refs) == 1
    assert catalog.listing(all_hosts=True).refs == []  # the other scope is kept
    catalog.invalidate()
    assert len(catalog.listing(all_hosts=True).refs) == 1
    assert len(bucket.calls) == 4


def test_the_host_claim_is_made_once_and_its_failure_remembered(tmp_path: Path) -> None:
    bucket = Bucket()
    claim = make_ctx(tmp_path, bucket).host_claim
    claim.ensure()
    claim.ensure()
    assert [c for c in bucket.calls if c[0] == "put"] == [("put", "cloudbackup/h1/.host-id")]
    assert bucket.objects["cloudbackup/h1/.host-id"][0] == b"m1\n"

    other = make_ctx(tmp_path / "other", bucket, machine="m2").host_claim
    with pytest.raises(PermanentStorageError, match="claimed by another machine") as first:
        other.ensure()
    calls = len(bucket.calls)
    with pytest.raises(PermanentStorageError) as again:
        other.ensure()
    assert again.value is first.value and len(bucket.calls) == calls  # no second attempt
    assert claim.problem("h1") is None
    assert "claimed by another machine" in (other.problem("h1") or "")


def test_a_command_that_writes_nothing_has_no_machine_id_and_makes_none(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, None, machine=None)
    assert ctx.machine_id is None
    assert not (tmp_path / "local").exists()
