"""model: ids, object names (name_for / parse_name are exact inverses) and manifests."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup.model import (
    COMPRESSION_EXT,
    BackupId,
    Manifest,
    ParsedName,
    UploadRecord,
    build_listing,
    name_for,
    parse_name,
    valid_name,
)

NAME_CHARS = "abcXYZ019._-"
TS = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC)
)
TS_TEXT = TS.map(lambda d: d.strftime("%Y%m%dT%H%M%SZ"))

plain_names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=12).filter(valid_name)
# Names that themselves look like backup ids, or end in digits like a sequence suffix.
tricky_names = st.one_of(
    st.builds(lambda a, ts: f"{a}-{ts}", plain_names, TS_TEXT),
    st.builds(lambda a, ts, n: f"{a}-{ts}-{n}", plain_names, TS_TEXT, st.integers(1, 99)),
    st.builds(lambda a, n: f"{a}-{n}", plain_names, st.integers(0, 999)),
    st.builds(lambda a: f"{a}-", plain_names),
    st.sampled_from(["-", "--", "a--b", "20261121T021500Z", "x-20261121T021500Z-2"]),
)
names = st.one_of(plain_names, tricky_names)
prefixes = st.one_of(
    st.just(""),
    st.just("/"),
    st.lists(plain_names, min_size=1, max_size=3).map("/".join),
    st.lists(plain_names, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p) + "/"),
)
seqs = st.one_of(st.just(1), st.integers(2, 10_000))
FAST = settings(max_examples=300, deadline=None)


@FAST
@given(source=names, moment=TS, seq=seqs)
def test_backup_id_round_trip(source: str, moment: datetime, seq: int) -> None:
    backup_id = BackupId(source, moment, seq)
    text = str(backup_id)
    assert BackupId.parse(text) == backup_id
    assert text.startswith(f"{source}-")
    assert text.endswith("Z") == (seq == 1)


@FAST
@given(
    prefix=prefixes,
    host=names,
    source=names,
    moment=TS,
    seq=seqs,
    kind=st.sampled_from(["archive", "manifest", "upload"]),
    compression=st.sampled_from(sorted(COMPRESSION_EXT)),
)
def test_name_for_and_parse_name_are_inverse(
    prefix: str, host: str, source: str, moment: datetime, seq: int, kind: str, compression: str
) -> None:
    backup_id = BackupId(source, moment, seq)
    key = name_for(prefix, host, backup_id, kind, compression)
    assert "//" not in key and not key.startswith("/")
    expected = ParsedName(host, source, backup_id, kind, compression if kind == "archive" else None)
    assert parse_name(key, prefix) == expected


def test_name_layout() -> None:
    backup_id = BackupId.new("www", datetime(2026, 11, 21, 2, 15, 0, 999, tzinfo=UTC))
    assert str(backup_id) == "www-20261121T021500Z"
    assert str(backup_id.next()) == "www-20261121T021500Z-2"
    assert name_for("cloudbackup", "web1", backup_id, "archive", "gzip") == (
        "cloudbackup/web1/www/www-20261121T021500Z.tar.gz"
    )
    assert name_for("", "web1", backup_id, "manifest") == (
        "web1/www/www-20261121T021500Z.manifest.json"
    )
    assert name_for("a/b/", "web1", backup_id.next(), "archive", "none") == (
        "a/b/web1/www/www-20261121T021500Z-2.tar"
    )


def test_new_id_is_utc() -> None:
    from datetime import timedelta, timezone

    moment = datetime(2026, 11, 21, 3, 15, 0, tzinfo=timezone(timedelta(hours=1)))
    assert str(BackupId.new("db", moment)) == "db-20261121T021500Z"


@pytest.mark.parametrize(
    "key",
    [
        "cloudbackup/web1/.host-id",
        "cloudbackup/web1/www/README",
        "cloudbackup/web1/www/.DS_Store",
        "cloudbackup/web1/www/www-2026.tar.zst",
        "cloudbackup/web1/www/www-20261121T021500Z.zip",
        "cloudbackup/web1/www/www-20261121T021500Z",
        "cloudbackup/web1/www/www-20261121T021500Z-1.tar.zst",  # seq 1 is never written
        "cloudbackup/web1/www/www-20261121T021500Z-0.tar.zst",
        "cloudbackup/web1/www/www-20261121T021500Z-02.tar.zst",
        "cloudbackup/web1/www/www-20261341T021500Z.tar.zst",  # no 13th month
        "cloudbackup/web1/www/db-20261121T021500Z.tar.zst",  # source mismatch
        "cloudbackup/web1/www/sub/www-20261121T021500Z.tar.zst",
        "cloudbackup/web1/www-20261121T021500Z.tar.zst",
        "other/web1/www/www-20261121T021500Z.tar.zst",
        "cloudbackup/web 1/www/www-20261121T021500Z.tar.zst",
        "cloudbackup/../www/www-20261121T021500Z.tar.zst",
        "",
        "cloudbackup/",
    ],
)
def test_non_backup_keys_are_none(key: str) -> None:
    assert parse_name(key, "cloudbackup") is None


def test_parse_name_kinds() -> None:
    base = "p/h/www/www-20261121T021500Z"
    assert parse_name(base + ".tar.zst", "p").kind == "archive"  # type: ignore[union-attr]
    assert parse_name(base + ".tar", "p").compression == "none"  # type: ignore[union-attr]
    assert parse_name(base + ".manifest.json", "p").kind == "manifest"  # type: ignore[union-attr]
    assert parse_name(base + ".upload.json", "p").kind == "upload"  # type: ignore[union-attr]
    partial = parse_name(base + ".tar.xz.partial", "p")
    assert partial is not None and (partial.kind, partial.compression) == ("partial", "xz")


def test_listing_ignores_host_claims_and_junk_but_records_hosts() -> None:
    when = datetime(2026, 11, 21, tzinfo=UTC)
    keys = [
        "cloudbackup/web1/.host-id",
        "cloudbackup/web2/.host-id",
        "cloudbackup/web1/www/notes.txt",
        "cloudbackup/web1/www/www-20261121T021500Z.tar.zst",
        "cloudbackup/web1/www/www-20261121T021500Z.manifest.json",
        "cloudbackup/web1/www/www-20261122T021500Z.tar.zst",  # no manifest: orphan
        "cloudbackup/web1/www/www-20261123T021500Z.tar.zst.partial",
    ]
    objects = [SimpleNamespace(key=k, size=10, modified=when) for k in keys]
    listing = build_listing(objects, prefix="cloudbackup", where="remote")
    assert [r.id for r in listing.refs] == ["www-20261121T021500Z"]
    assert [r.id for r in listing.orphans] == ["www-20261122T021500Z"]
    assert listing.partials == ["cloudbackup/web1/www/www-20261123T021500Z.tar.zst.partial"]
    assert listing.hosts == {"web1", "web2"}


# ---------------------------------------------------------------- manifest

# Lone surrogates are what os.fsdecode makes of non-UTF-8 bytes in file names.
surrogate_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=30,
)


def _manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = dict(
        id="www-20261121T021500Z",
        host="web1",
        source="www",
        kind="directory",
        spec="/srv/www",
        created_at="2026-11-21T02:15:00Z",
        archive="www-20261121T021500Z.tar.zst",
        size=1234,
        sha256="ab" * 32,
        compression="zstd",
        compression_level=3,
        file_count=10,
        uncompressed_bytes=98765,
        machine_id="0123456789abcdef",
        tool_version="0.1.0",
    )
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    warnings=st.lists(surrogate_text, max_size=5),
    spec=surrogate_text,
    size=st.integers(0, 2**50),
    upload=st.booleans(),
)
def test_manifest_json_round_trip(warnings: list[str], spec: str, size: int, upload: bool) -> None:
    manifest = _manifest(warnings=warnings, spec=spec, size=size, root_device=2049)
    if upload:
        manifest.upload = UploadRecord(
            key="cloudbackup/web1/www/www-20261121T021500Z.tar.zst",
            part_size=8 * 2**20,
            part_count=3,
            checksum_algorithm="SHA256",
            checksum="abc=-3",
        )
    raw = manifest.to_json()
    raw.decode("ascii")  # ASCII only: surrogates are escaped, never written raw
    assert Manifest.from_json(raw) == manifest
    assert Manifest.from_json(raw.decode()) == manifest


def test_manifest_non_utf8_file_name_warning() -> None:
    name = os.fsdecode(b"/srv/www/caf\xe9.txt")
    manifest = _manifest(warnings=[f"{name}: vanished while reading"])
    back = Manifest.from_json(manifest.to_json())
    assert os.fsencode(back.warnings[0].split(":")[0]) == b"/srv/www/caf\xe9.txt"


def test_manifest_records_spec_fields() -> None:
    data = json.loads(_manifest().to_json())
    for key in (
        "format",
        "id",
        "source",
        "kind",
        "spec",
        "host",
        "created_at",
        "archive",
        "size",
        "sha256",
        "compression",
        "file_count",
        "uncompressed_bytes",
        "machine_id",
        "tool_version",
        "warnings",
    ):
        assert key in data, key
    assert "upload" not in data
    assert _manifest().backup_id == BackupId.parse("www-20261121T021500Z")
    assert _manifest().created == datetime(2026, 11, 21, 2, 15, tzinfo=UTC)


@pytest.mark.parametrize("raw", [b"{}", b"[]", b'{"format": 99, "id": "x"}'])
def test_manifest_rejects_foreign_json(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Manifest.from_json(raw)


def test_manifest_ignores_unknown_keys() -> None:
    data = json.loads(_manifest().to_json())
    data["added_in_v2"] = True
    assert Manifest.from_json(json.dumps(data)) == _manifest()
