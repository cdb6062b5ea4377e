"""model: ids, object names (name_for / parse_name are exact inverses) and manifests."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup.core.errors import IntegrityError
from cloudbackup.core.model import (
    COMPRESSION_EXT,
    MAX_MANIFEST_BYTES,
    BackupId,
    BackupRef,
    Manifest,
    ParsedName,
    UploadRecord,
    archive_name,
    build_listing,
    check_manifest_size,
    name_for,
    parse_manifest_metadata,
    parse_name,
    parse_upload_record,
    valid_name,
)
from cloudbackup.sources.registry import KINDS, parse_manifest

SOURCE_KINDS = tuple(KINDS)

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
        # A key another writer made, ending its id with a newline: not the id of a backup.
        "cloudbackup/web1/www/www-20261121T021500Z\n.tar.zst",
        "cloudbackup/web1/www/www-20261121T021500Z\n.manifest.json",
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
ID = "www-20261121T021500Z"
KEY = f"cloudbackup/web1/www/{ID}.manifest.json"


def _ref(compression: str | None = "zstd", where: str = "remote", **kw: object) -> BackupRef:
    """The backup as a listing names it: the key every manifest is checked against."""
    fields: dict[str, object] = dict(
        host="web1",
        source="www",
        backup_id=BackupId.parse(ID),
        where=where,
        manifest_key=KEY,
        archive_key=f"cloudbackup/web1/www/{archive_name(BackupId.parse(ID), compression)}"
        if compression
        else None,
        compression=compression,
    )
    fields.update(kw)
    return BackupRef(**fields)  # type: ignore[arg-type]


MEMBERS = {
    "directory": {"dirs": 3, "symlinks": 1, "hardlinks": 0},
    "glob": {"dirs": 1, "symlinks": 0, "hardlinks": 0},
    "command": {"dirs": 0, "symlinks": 0, "hardlinks": 0, "output": "www.out"},
    "sqlite": {"dirs": 0, "symlinks": 0, "hardlinks": 0, "database_file": "www.sqlite3"},
    "postgresql": {
        "dirs": 0,
        "symlinks": 0,
        "hardlinks": 0,
        "database": "shop db",
        "dump": "shop db.dump",
        "dump_format": "custom",
        "dump_bytes": 1234,
        "globals": "globals.sql",
        "pg_dump_version": "16.2",
        "server_version": "16.2",
    },
}


def _manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = dict(
        id=ID,
        host="web1",
        source="www",
        kind="directory",
        spec="/srv/www",
        created_at="2026-11-21T02:15:00Z",
        archive=f"{ID}.tar.zst",
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


def _upload(compression: str = "zstd") -> UploadRecord:
    return UploadRecord(
        key=f"cloudbackup/web1/www/{archive_name(BackupId.parse(ID), compression)}",
        part_size=8 * 2**20,
        part_count=3,
        checksum_algorithm="SHA256",
        checksum="abc=-3",
        etag='"etag-3"',
        uploaded_at="2026-11-21T02:16:00Z",
        verified_at="2026-11-21T02:16:01Z",
    )


@settings(max_examples=100, deadline=None)
@given(
    warnings=st.lists(surrogate_text, max_size=5),
    spec=surrogate_text,
    size=st.integers(0, 2**50),
    upload=st.booleans(),
)
def test_manifest_json_round_trip(warnings: list[str], spec: str, size: int, upload: bool) -> None:
    manifest = _manifest(
        warnings=warnings,
        spec=spec,
        size=size,
        root_device=2049,
        upload=_upload() if upload else None,
    )
    raw = manifest.to_json()
    raw.decode("ascii")  # ASCII only: surrogates are escaped, never written raw
    assert parse_manifest(raw, _ref()) == manifest
    assert parse_manifest(raw.decode(), _ref()) == manifest


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("compression", sorted(COMPRESSION_EXT))
def test_every_kind_and_compression_round_trips(kind: str, compression: str) -> None:
    manifest = _manifest(
        kind=kind,
        compression=compression,
        archive=archive_name(BackupId.parse(ID), compression),
        members=MEMBERS[kind],
        upload=_upload(compression),
    )
    assert parse_manifest(manifest.to_json(), _ref(compression)) == manifest
    # A manifest without its archive in the listing (a stray) is checked by its own name.
    assert parse_manifest(manifest.to_json(), _ref(None)) == manifest


def test_manifest_non_utf8_file_name_warning() -> None:
    name = os.fsdecode(b"/srv/www/caf\xe9.txt")
    manifest = _manifest(warnings=[f"{name}: vanished while reading"])
    back = parse_manifest(manifest.to_json(), _ref())
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
    assert _manifest().backup_id == BackupId.parse(ID)
    assert _manifest().created == datetime(2026, 11, 21, 2, 15, tzinfo=UTC)


def test_a_manifest_is_a_value() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        _manifest().source = "../victim"  # type: ignore[misc]


def _data(**changes: object) -> dict[str, object]:
    data: dict[str, object] = json.loads(_manifest(upload=_upload()).to_json())
    for name, value in changes.items():
        target = data
        *parents, last = name.split(".")
        for parent in parents:
            target = target[parent]  # type: ignore[assignment]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return data


_DROP = object()

REJECTED = {
    "not an object": [],
    "format missing": {"id": ID},
    "format as text": _data(format="1"),
    "format true": _data(format=True),
    "format 2": _data(format=2),
    "id of another backup": _data(id="www-20261121T021501Z"),
    "id missing": _data(id=_DROP),
    "id not text": _data(id=5),
    "host": _data(host="web2"),
    "host path": _data(host="../web1"),
    "source": _data(source="db"),
    "source absolute": _data(source="/srv/www"),
    "source relative": _data(source="../../victim"),
    "source empty": _data(source=""),
    "archive of another compression": _data(archive=f"{ID}.tar.gz"),
    "archive path": _data(archive=f"../{ID}.tar.zst"),
    "archive absolute": _data(archive=f"/tmp/{ID}.tar.zst"),
    "compression disagrees with the listed archive": _data(
        compression="gzip", archive=f"{ID}.tar.gz", **{"upload.key": f"p/web1/www/{ID}.tar.gz"}
    ),
    "compression unknown": _data(compression="zip"),
    "kind unknown": _data(kind="tarball"),
    "created_at other": _data(created_at="2026-11-21T02:15:01Z"),
    "created_at no zone": _data(created_at="2026-11-21T02:15:00"),
    "created_at not a date": _data(created_at="2026-02-30T02:15:00Z"),
    "created_at fraction": _data(created_at="2026-11-21T02:15:00.5Z"),
    "created_at overflow": _data(created_at="9999-12-31T23:59:59-23:59"),
    "size text": _data(size="1234"),
    "size negative": _data(size=-1),
    "size float": _data(size=1234.0),
    "size bool": _data(size=True),
    "size huge": _data(size=2**64),
    "file_count null": _data(file_count=None),
    "uncompressed_bytes missing": _data(uncompressed_bytes=_DROP),
    "compression_level text": _data(compression_level="3"),
    "root_device negative": _data(root_device=-5),
    "sha256 upper": _data(sha256="AB" * 32),
    "sha256 short": _data(sha256="ab" * 31),
    "sha256 newline": _data(sha256="ab" * 32 + "\n"),
    "created_at newline": _data(created_at="2026-11-21T02:15:00Z\n"),
    "sha256 not text": _data(sha256=None),
    "spec not text": _data(spec=["/srv/www"]),
    "warnings text": _data(warnings="none"),
    "warnings of numbers": _data(warnings=[1, 2]),
    "members list": _data(members=["a"]),
    "members count text": _data(**{"members.dirs": "3"}),
    "upload list": _data(upload=[]),
    "upload key of another archive": _data(**{"upload.key": "cloudbackup/web1/www/x.tar.zst"}),
    "upload key of another host": _data(**{"upload.key": f"cloudbackup/web2/www/{ID}.tar.zst"}),
    "upload key with ..": _data(**{"upload.key": f"../web1/www/{ID}.tar.zst"}),
    "upload part_size text": _data(**{"upload.part_size": "8"}),
    "upload part_count missing": _data(**{"upload.part_count": _DROP}),
    "upload checksum number": _data(**{"upload.checksum": 5}),
    "upload algorithm unknown": _data(**{"upload.checksum_algorithm": "MD5"}),
    "upload verified_at garbage": _data(**{"upload.verified_at": "yesterday"}),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_manifest_that_disagrees_with_its_key_or_types_is_an_integrity_error(case: str) -> None:
    with pytest.raises(IntegrityError) as caught:
        parse_manifest(json.dumps(REJECTED[case]), _ref())
    assert caught.value.exit_code == 3
    assert str(caught.value).startswith(f"the remote manifest {KEY} ")


@pytest.mark.parametrize(
    ("kind", "members"),
    [
        ("command", {"output": "other.out"}),
        ("command", {"output": "/etc/passwd"}),
        ("sqlite", {"database_file": "../www.sqlite3"}),
        ("postgresql", {"dump": "../../etc/shop.dump"}),
        ("postgresql", {"dump": "/etc/shop.dump"}),
        ("postgresql", {"dump": ".."}),
        ("postgresql", {"dump": "shop.sql"}),
        ("postgresql", {"dump": "a\x00.dump"}),
        ("postgresql", {"dump": "x" * 300 + ".dump"}),
        ("postgresql", {"globals": "/etc/shadow"}),
        ("postgresql", {"dump_format": "plain"}),
        ("postgresql", {"dump_bytes": -1}),
        ("postgresql", {"database": 5}),
    ],
)
def test_member_names_are_the_ones_the_kind_writes(kind: str, members: dict[str, object]) -> None:
    raw = _manifest(kind=kind).to_json()
    data = json.loads(raw)
    data["members"] = members
    with pytest.raises(IntegrityError, match="members"):
        parse_manifest(json.dumps(data), _ref())


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"\xff\xfe\x00", b"[" * 50_000, b"null", b"1e999", b'"x"', "\udc80"],
    ids=["empty", "truncated", "bytes", "deep", "null", "number", "string", "surrogate"],
)
def test_bytes_that_are_not_json_are_an_integrity_error(raw: bytes | str) -> None:
    with pytest.raises(IntegrityError, match=KEY):
        parse_manifest(raw, _ref())


def test_a_manifest_larger_than_any_manifest_is_refused_before_and_after_reading() -> None:
    with pytest.raises(IntegrityError, match="more than any manifest"):
        check_manifest_size(_ref(manifest_size=MAX_MANIFEST_BYTES + 1))
    check_manifest_size(_ref(manifest_size=4096))
    check_manifest_size(_ref())  # size unknown: read, then checked by the parser
    with pytest.raises(IntegrityError, match="more than any manifest"):
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), _ref())


def test_unknown_fields_are_dropped_and_times_are_canonical() -> None:
    data = _data()
    data["added_in_v2"] = {"anything": [1, 2]}
    data["members"]["added"] = "x"  # type: ignore[index]
    data["upload"]["added"] = 5  # type: ignore[index]
    data["created_at"] = "2026-11-21t03:15:00+01:00"
    data["upload"]["uploaded_at"] = "2026-11-21T02:16:00.000Z"  # type: ignore[index]
    assert parse_manifest(json.dumps(data), _ref()) == _manifest(upload=_upload())


def test_optional_fields_may_be_missing() -> None:
    data = json.loads(_manifest().to_json())
    for name in ("warnings", "root_device", "root", "members", "compression_level"):
        del data[name]
    assert parse_manifest(json.dumps(data), _ref()) == _manifest(compression_level=None)


def test_local_and_remote_keys_are_named_in_the_error() -> None:
    local = _ref(where="local", manifest_key=f"web1/www/{ID}.manifest.json")
    with pytest.raises(IntegrityError, match=f"the local manifest web1/www/{ID}.manifest.json"):
        parse_manifest(json.dumps(_data(source="x")), local)


# Property: any mutation of a manifest either parses to a value that agrees with its key
# (the same value, when the mutation was neutral or touched nothing the key decides) or is
# rejected with the integrity error; never any other exception.

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["www", "web1", ID, f"{ID}.tar.zst", "zstd", "../www", "/srv/www"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    kind = draw(st.sampled_from(SOURCE_KINDS))
    compression = draw(st.sampled_from(sorted(COMPRESSION_EXT)))
    return _manifest(
        kind=kind,
        compression=compression,
        archive=archive_name(BackupId.parse(ID), compression),
        members=MEMBERS[kind],
        warnings=draw(st.lists(surrogate_text, max_size=2)),
        upload=_upload(compression) if draw(st.booleans()) else None,
    )


def _paths(data: dict[str, object]) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [(k,) for k in data]
    for nested in ("members", "upload"):
        value = data.get(nested)
        if isinstance(value, dict):
            paths += [(nested, k) for k in value]
    return paths


def _mutate_json(draw: st.DrawFn, data: dict[str, object]) -> None:
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        op = draw(st.sampled_from(["replace", "drop", "add"]))
        path = draw(st.sampled_from(paths)) if paths else ("x",)
        target: dict[str, object] = data
        for parent in path[:-1]:
            nested = target.get(parent)
            if not isinstance(nested, dict):
                break
            target = nested
        else:
            if op == "replace":
                target[path[-1]] = draw(json_values)
            elif op == "drop":
                target.pop(path[-1], None)
            else:
                target[draw(st.text(max_size=8))] = draw(json_values)


def _accepted_agrees_with_its_key(parsed: Manifest, ref: BackupRef) -> None:
    assert (parsed.id, parsed.host, parsed.source) == (ID, "web1", "www")
    assert parsed.archive == archive_name(BackupId.parse(ID), parsed.compression)
    assert parsed.created == BackupId.parse(ID).created_at
    assert parsed.kind in SOURCE_KINDS
    for value in (parsed.size, parsed.file_count, parsed.uncompressed_bytes):
        assert type(value) is int and value >= 0
    assert all(isinstance(w, str) for w in parsed.warnings)
    assert parse_manifest(parsed.to_json(), ref) == parsed  # a fixed point


@settings(max_examples=400, deadline=None)
@given(original=manifests(), data=st.data())
def test_mutated_manifests_parse_to_a_valid_value_or_are_rejected(
    original: Manifest, data: st.DataObject
) -> None:
    ref = _ref(original.compression)
    doc = json.loads(original.to_json())
    _mutate_json(data.draw, doc)
    try:
        parsed = parse_manifest(json.dumps(doc), ref)
    except IntegrityError as exc:
        assert exc.exit_code == 3 and KEY in str(exc)
        return
    _accepted_agrees_with_its_key(parsed, ref)


@settings(max_examples=400, deadline=None)
@given(original=manifests(), data=st.data())
def test_mutated_manifest_bytes_parse_to_a_valid_value_or_are_rejected(
    original: Manifest, data: st.DataObject
) -> None:
    ref = _ref(original.compression)
    raw = bytearray(original.to_json())
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        parsed = parse_manifest(bytes(raw), ref)
    except IntegrityError as exc:
        assert exc.exit_code == 3 and KEY in str(exc)
        return
    _accepted_agrees_with_its_key(parsed, ref)


KEY_BOUND = ("format", "id", "host", "source", "archive", "created_at", "kind", "compression")


@settings(max_examples=400, deadline=None)
@given(original=manifests(), field_name=st.sampled_from(KEY_BOUND), value=json_values)
def test_fields_the_key_decides_parse_to_the_same_value_or_are_rejected(
    original: Manifest, field_name: str, value: object
) -> None:
    ref = _ref(original.compression)
    doc = json.loads(original.to_json())
    doc[field_name] = value
    try:
        parsed = parse_manifest(json.dumps(doc), ref)
    except IntegrityError:
        return
    assert parsed == original


@settings(max_examples=200, deadline=None)
@given(
    original=manifests(),
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in Manifest.__dataclass_fields__),
        json_values,
        max_size=3,
    ),
    indent=st.sampled_from([None, 0, 4]),
)
def test_neutral_changes_parse_to_the_same_value(
    original: Manifest, extra: dict[str, object], indent: int | None
) -> None:
    doc = json.loads(original.to_json())
    doc.update(extra)
    assert parse_manifest(json.dumps(doc, indent=indent), _ref(original.compression)) == original


# ---------------------------------------------------------------- upload records and metadata


def test_upload_record_round_trip_and_rejections() -> None:
    backup_id = BackupId.parse(ID)
    record = _upload()
    raw = json.dumps(record.to_dict())
    assert parse_upload_record(raw, backup_id, "web1", prefix="cloudbackup") == record
    in_progress = UploadRecord(record.key, 8 << 20, 0, "SHA256", None, upload_id="u-1")
    assert parse_upload_record(
        json.dumps(in_progress.to_dict()), backup_id, "web1", prefix="cloudbackup"
    ) == in_progress
    for bad in (
        b"[]",
        b"{",
        json.dumps({**record.to_dict(), "key": 1}),
        json.dumps({**record.to_dict(), "verified_at": 2}),
        json.dumps({**record.to_dict(), "part_size": -1}),
        json.dumps({**record.to_dict(), "key": "cloudbackup/web1/db/db-20261121T021500Z.tar"}),
        # The right last components under another prefix, or none: never the key we build.
        json.dumps({**record.to_dict(), "key": "other/" + record.key}),
        json.dumps({**record.to_dict(), "key": record.key.removeprefix("cloudbackup/")}),
        json.dumps({**record.to_dict(), "key": "x/../" + record.key}),
    ):
        with pytest.raises(IntegrityError, match=f"upload record of {ID}"):
            parse_upload_record(bad, backup_id, "web1", prefix="cloudbackup")
    with pytest.raises(IntegrityError):
        parse_upload_record(raw, backup_id, "web2", prefix="cloudbackup")  # another host's


def test_manifest_metadata_is_parsed_too() -> None:
    ref = _ref()
    good = {"sha256": "ab" * 32, "size": "1234", "s3-checksum": "abc=-3", "source": "www"}
    facts = parse_manifest_metadata(good, ref)
    assert facts is not None and (facts.sha256, facts.size, facts.checksum) == (
        "ab" * 32,
        1234,
        "abc=-3",
    )
    assert parse_manifest_metadata({"source": "www"}, ref) is None  # none: read the body
    for bad in (
        {"sha256": "xyz", "size": "1"},
        {"sha256": "ab" * 32, "size": "lots"},
        {"sha256": "ab" * 32, "size": "-1"},
        {"sha256": "ab" * 32, "size": "1" * 5000},
        {"sha256": "ab" * 32, "size": "١٢"},
        {"sha256": "ab" * 32, "size": "1", "host": "web2"},
        {"sha256": "ab" * 32, "size": "1", "source": "../www"},
    ):
        with pytest.raises(IntegrityError, match=f"manifest {KEY} has metadata"):
            parse_manifest_metadata(bad, ref)


def test_listing_records_the_manifest_size() -> None:
    when = datetime(2026, 11, 21, tzinfo=UTC)
    objects = [
        SimpleNamespace(key=f"cloudbackup/web1/www/{ID}.tar.zst", size=10, modified=when),
        SimpleNamespace(key=KEY, size=777, modified=when),
    ]
    (ref,) = build_listing(objects, prefix="cloudbackup", where="remote").refs
    assert (ref.manifest_size, ref.archive_size) == (777, 10)
