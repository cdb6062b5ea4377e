"""Incremental archives (SPEC "Incremental archives"): the index written in the same pass,
change detection against the parent's local index, names that carry the chain, the trust
rule, FULL_EVERY and --full, chain-aware retention and forget."""

from __future__ import annotations

import io
import json
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup.config import parse_full_every
from cloudbackup.core.errors import IntegrityError
from cloudbackup.core.model import (
    BackupId,
    BackupRef,
    archive_name,
    build_listing,
    chain_of,
    index_name,
    parse_name,
)
from cloudbackup.core.retention import parse_policy, plan
from cloudbackup.fs.walk import FileEntry
from cloudbackup.ops.forget import needed_by
from cloudbackup.sources.registry import parse_manifest
from cloudbackup.storage.base import ObjectInfo
from cloudbackup.stream.index import (
    IndexInvalid,
    IndexWriter,
    Parent,
    Record,
    mark_unchanged,
    parse_record,
    read_index,
    unchanged,
)
from tests.conftest import Clock, Env, make_tree

OLD = 1_600_000_000  # an mtime far older than any walk here: not "racy"


def age(root: Path) -> Path:
    """Date every file of ``root`` in the past, as a tree left alone since its last backup."""
    for path in [root, *root.rglob("*")]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)
    return root


@pytest.fixture
def www(env: Env) -> Path:
    tree = make_tree(
        env.tmp / "srv" / "www",
        {"index.html": "<h1>hello</h1>\n", "css/site.css": "body{}\n", "img/a.png": b"\x89PNG" * 5},
    )
    os.symlink("index.html", tree / "home.html")
    os.link(tree / "index.html", tree / "same.html")
    return age(tree)


def backup_json(cli: Any, *args: str | Path) -> dict[str, Any]:
    result = cli("backup", "--json", *args)
    assert result.exit_code == 0, result.stderr
    (one,) = json.loads(result.stdout)["results"]
    return one  # type: ignore[no-any-return]


def manifest(env: Env, ident: str, source: str = "www") -> dict[str, Any]:
    return json.loads((env.source_dir(source) / f"{ident}.manifest.json").read_text())


def index_records(env: Env, ident: str, source: str = "www") -> list[dict[str, Any]]:
    raw = (env.source_dir(source) / f"{ident}.index.zst").read_bytes()
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read().decode()
    return [json.loads(line) for line in text.splitlines()]


def open_tar(path: Path) -> tarfile.TarFile:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read()
    return tarfile.open(fileobj=io.BytesIO(raw))


def members(path: Path) -> list[str]:
    with open_tar(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_an_unchanged_tree_makes_an_incremental_of_its_directories_only(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    first = backup_json(cli, www)
    assert first["level"] == "full" and first["parent"] is None
    clock.advance(days=1)
    second = backup_json(cli, www)
    assert (second["level"], second["parent"]) == ("incr", first["id"])
    assert second["changed_files"] == 0 and second["changed_bytes"] == 0
    assert second["file_count"] == 5  # the whole tree's count, not the archive's
    archive = env.source_dir("www") / f"{second['id']}.incr.tar.zst"
    assert sorted(members(archive)) == ["css", "img"]  # every directory, in every archive
    facts = manifest(env, second["id"])
    assert (facts["level"], facts["parent"], facts["base"]) == (1, first["id"], first["id"])
    assert facts["archive"] == archive.name
    assert (facts["tree_files"], facts["file_count"]) == (5, 0)
    assert facts["index"]["name"] == f"{second['id']}.index.zst"
    records = {r["path"]: r for r in index_records(env, second["id"])}
    assert sorted(records) == [
        "css",
        "css/site.css",
        "home.html",
        "img",
        "img/a.png",
        "index.html",
        "same.html",
    ]
    assert records["index.html"]["in"] == first["id"]
    assert records["css"]["in"] == second["id"]  # directories: in every archive
    assert records["home.html"]["link"] == "index.html"
    assert manifest(env, first["id"])["base"] == first["id"]
    assert manifest(env, first["id"])["level"] == 0


def test_changed_new_and_deleted_paths(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    first = backup_json(cli, www)
    (www / "css" / "site.css").write_text("body{color:red}\n")
    os.utime(www / "css" / "site.css", (OLD + 10, OLD + 10))
    (www / "new.txt").write_text("new\n")
    os.utime(www / "new.txt", (OLD, OLD))
    (www / "img" / "a.png").unlink()
    os.chmod(www / "index.html", 0o600)  # a mode change alone (ctime too): archived again
    clock.advance(days=1)
    second = backup_json(cli, www)
    archive = env.source_dir("www") / f"{second['id']}.incr.tar.zst"
    assert sorted(members(archive)) == sorted(
        ["css", "css/site.css", "img", "index.html", "new.txt", "same.html"]
    )
    records = {r["path"]: r["in"] for r in index_records(env, second["id"])}
    assert "img/a.png" not in records  # deleted: the final index does not list it
    assert records["home.html"] == first["id"]
    assert records["new.txt"] == records["css/site.css"] == second["id"]


def test_racy_clean_a_file_modified_in_the_parents_last_tick_is_archived_again(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    """git's rule: a file whose mtime is not older than the parent's walk start by the
    timestamp granularity may have changed after it was read in the same tick."""
    os.utime(www / "index.html")  # now: as if written while the first backup ran
    backup_json(cli, www)
    clock.advance(days=1)
    second = backup_json(cli, www)
    archive = env.source_dir("www") / f"{second['id']}.incr.tar.zst"
    assert "index.html" in members(archive)
    assert "css/site.css" not in members(archive)


def test_a_hard_link_group_is_archived_together(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backup_json(cli, www)
    with open(www / "same.html", "a") as handle:  # through one name: the inode changes
        handle.write("more\n")
    clock.advance(days=1)
    second = backup_json(cli, www)
    archive = env.source_dir("www") / f"{second['id']}.incr.tar.zst"
    with open_tar(archive) as tar:
        found = {m.name: m for m in tar.getmembers()}
    assert found["index.html"].isfile() and found["same.html"].islnk()
    assert found["same.html"].linkname == "index.html"


def test_full_every_count_and_full_flag(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    os.environ["CLOUDBACKUP_FULL_EVERY"] = "3"
    try:
        levels = []
        for _ in range(5):
            levels.append(backup_json(cli, www)["level"])
            clock.advance(hours=1)
        assert levels == ["full", "incr", "incr", "full", "incr"]
        assert backup_json(cli, "--full", www)["level"] == "full"
        os.environ["CLOUDBACKUP_FULL_EVERY"] = "0"
        clock.advance(hours=1)
        assert backup_json(cli, www)["level"] == "full"
    finally:
        del os.environ["CLOUDBACKUP_FULL_EVERY"]


def test_full_every_duration(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    os.environ["CLOUDBACKUP_FULL_EVERY__WWW"] = "2d"
    try:
        levels = []
        for _ in range(4):
            levels.append(backup_json(cli, www)["level"])
            clock.advance(days=1)
        assert levels == ["full", "incr", "full", "incr"]
    finally:
        del os.environ["CLOUDBACKUP_FULL_EVERY__WWW"]


def test_full_every_parses() -> None:
    assert parse_full_every("7d").age == timedelta(days=7)
    assert parse_full_every("7").count == 7
    assert parse_full_every("0").always and parse_full_every("1").always
    for bad in ("", "-1", "7x", "d"):
        with pytest.raises(ValueError):
            parse_full_every(bad)


def test_a_bad_full_every_is_exit_2(env: Env, cli: Any, www: Path) -> None:
    os.environ["CLOUDBACKUP_FULL_EVERY"] = "weekly"
    try:
        result = cli("backup", www)
    finally:
        del os.environ["CLOUDBACKUP_FULL_EVERY"]
    assert result.exit_code == 2
    assert "CLOUDBACKUP_FULL_EVERY" in result.stderr


@pytest.mark.parametrize("damage", ["missing", "damaged", "planted"])
def test_without_a_good_local_index_the_backup_is_full(
    env: Env, cli: Any, www: Path, clock: Clock, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The trust rule: only an index this host wrote and kept, matching its manifest's
    digest, is a parent; anything else is a full backup, with one line saying why."""
    first = backup_json(cli, www)
    index = env.source_dir("www") / f"{first['id']}.index.zst"
    if damage == "missing":
        index.unlink()
    elif damage == "damaged":
        index.write_bytes(index.read_bytes()[:-3] + b"xyz")
    else:  # a forged index claiming every file is in an older archive
        record = {
            "path": "index.html", "type": "file", "size": 1, "mtime_ns": 0, "ctime_ns": 0,
            "ino": 0, "mode": 0o100644, "uid": 0, "gid": 0, "link": None, "in": first["id"],
        }
        index.write_bytes(zstandard.ZstdCompressor().compress(json.dumps(record).encode()))
    clock.advance(days=1)
    second = backup_json(cli, www)
    assert second["level"] == "full"
    archive = env.source_dir("www") / f"{second['id']}.tar.zst"
    assert "index.html" in members(archive)


def test_an_index_in_the_bucket_is_never_a_parent(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    """A fresh machine (no local dir) whose bucket holds backups: the first backup is full.
    Here: the newest backup exists only where this host keeps no index (forgotten locally)."""
    first = backup_json(cli, www)
    clock.advance(hours=1)
    second = backup_json(cli, www)
    assert second["level"] == "incr"
    assert cli("forget", second["id"]).exit_code == 0
    assert cli("forget", first["id"]).exit_code == 0
    clock.advance(hours=1)
    assert backup_json(cli, www)["level"] == "full"


def test_the_shrink_guard_compares_the_tree_not_the_incremental(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backup_json(cli, www)
    clock.advance(hours=1)
    assert backup_json(cli, www)["level"] == "incr"  # 0 files archived: no shrink
    for name in ("index.html", "same.html", "home.html", "img/a.png"):
        (www / name).unlink()
    clock.advance(hours=1)
    result = cli("backup", "--json", www)
    assert result.exit_code == 1
    assert "shrank from 5 to 1 files" in json.loads(result.stdout)["results"][0]["error"]


def test_list_and_status_show_full_and_incr(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    first = backup_json(cli, www)
    clock.advance(hours=1)
    second = backup_json(cli, www)
    listed = json.loads(cli("list", "--json").stdout)["backups"]
    assert [(b["id"], b["level"], b["parent"]) for b in listed] == [
        (first["id"], 0, None),
        (second["id"], 1, first["id"]),
    ]
    human = cli("list").stdout
    assert " full " in human and " incr " in human
    status = cli("status", "--json")
    (source,) = json.loads(status.stdout)["hosts"][0]["sources"]
    assert source["newest"] == second["id"] and source["newest_level"] == "incr"
    assert f"{second['id']} (incr)" in cli("status").stdout


def test_run_output_says_full_or_incr_and_what_changed(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    assert "full" in cli("backup", www).stdout
    (www / "new.txt").write_text("12345")
    clock.advance(hours=1)
    assert "incr: 1 file changed (5 B)" in cli("backup", www).stdout


# ---------------------------------------------------------------- names and manifests


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("incremental", [False, True])
def test_names_carry_the_chain(incremental: bool, encrypted: bool) -> None:
    ident = BackupId.parse("www-20261121T021500Z-2")
    name = archive_name(ident, "zstd", incremental=incremental, encrypted=encrypted)
    assert name == "www-20261121T021500Z-2" + (".incr" if incremental else "") + ".tar.zst" + (
        ".age" if encrypted else ""
    )
    parsed = parse_name(f"p/h/www/{name}", "p")
    assert parsed is not None
    assert (parsed.kind, parsed.incremental, parsed.encrypted) == ("archive", incremental, encrypted)
    assert parsed.backup_id == ident and parsed.compression == "zstd"
    index = parse_name(f"p/h/www/{index_name(ident, encrypted=encrypted)}", "p")
    assert index is not None and (index.kind, index.encrypted) == ("index", encrypted)
    assert parse_name("p/h/www/www-20261121T021500Z.incr.manifest.json", "p") is None


def _objects(*names: str) -> list[ObjectInfo]:
    moment = datetime(2026, 11, 1, tzinfo=UTC)
    return [ObjectInfo(f"h/www/{name}", 10, moment) for name in names]


def test_listing_groups_indexes_with_their_backups() -> None:
    listing = build_listing(
        _objects(
            "www-20261120T000000Z.tar.zst",
            "www-20261120T000000Z.index.zst",
            "www-20261120T000000Z.manifest.json",
            "www-20261121T000000Z.incr.tar.zst",
            "www-20261121T000000Z.index.zst",
            "www-20261121T000000Z.manifest.json",
            "www-20261122T000000Z.index.zst",  # an index without its backup: an orphan
        ),
        prefix="",
        where="local",
    )
    full, incr = listing.refs
    assert (full.incremental, incr.incremental) == (False, True)
    assert incr.index_key == "h/www/www-20261121T000000Z.index.zst"
    assert listing.parent_of(incr) is full
    (orphan,) = listing.orphans
    assert orphan.id == "www-20261122T000000Z" and orphan.index_key is not None


def _manifest_doc(level: int, archive: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": 1, "id": "www-20261121T000000Z", "host": "h", "source": "www",
        "kind": "directory", "spec": "/srv/www", "created_at": "2026-11-21T00:00:00Z",
        "archive": archive, "size": 1, "sha256": "0" * 64, "compression": "zstd",
        "file_count": 0, "uncompressed_bytes": 0, "machine_id": "m", "tool_version": "t",
        "level": level, **extra,
    }


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (_manifest_doc(1, "www-20261121T000000Z.tar.zst", parent="www-20261120T000000Z",
                       base="www-20261120T000000Z"), "names archive"),
        (_manifest_doc(1, "www-20261121T000000Z.incr.tar.zst", parent="www-20261122T000000Z",
                       base="www-20261120T000000Z"), "not a backup older"),
        (_manifest_doc(1, "www-20261121T000000Z.incr.tar.zst", parent="app-20261120T000000Z",
                       base="www-20261120T000000Z"), "not a backup of source www"),
        (_manifest_doc(1, "www-20261121T000000Z.incr.tar.zst", parent="../../etc",
                       base="www-20261120T000000Z"), "not a backup id"),
        (_manifest_doc(0, "www-20261121T000000Z.tar.zst", parent="www-20261120T000000Z"),
         "with parent"),
        (_manifest_doc(0, "www-20261121T000000Z.tar.zst",
                       index={"name": "../x", "size": 1, "sha256": "0" * 64}), "index.name"),
        (_manifest_doc(True, "www-20261121T000000Z.tar.zst"), "level"),
    ],
)
def test_hostile_chain_fields_are_integrity_failures(doc: dict[str, Any], problem: str) -> None:
    ref = BackupRef("h", "www", BackupId.parse("www-20261121T000000Z"), "remote",
                    manifest_key="h/www/www-20261121T000000Z.manifest.json")
    with pytest.raises(IntegrityError) as caught:
        parse_manifest(json.dumps(doc), ref)
    assert problem in caught.value.message


# ---------------------------------------------------------------- the index itself


def _record(path: str, within: str = "www-20261120T000000Z", **extra: Any) -> Record:
    fields = dict(type="file", size=3, mtime_ns=OLD * 10**9, ctime_ns=OLD * 10**9, ino=7,
                  mode=0o100644, uid=0, gid=0, link=None, within=within, partial=False)
    fields.update(extra)
    return Record(path, **fields)


class _Stat:
    def __init__(self, **fields: int) -> None:
        base = dict(st_mode=0o100644, st_size=3, st_mtime_ns=OLD * 10**9,
                    st_ctime_ns=OLD * 10**9, st_ino=7, st_uid=0, st_gid=0, st_dev=1, st_nlink=1)
        base.update(fields)
        self.__dict__.update(base)


def _parent(records: list[Record], ignore_inode: bool = False) -> Parent:
    return Parent("www-20261120T000000Z", "www-20261120T000000Z", (OLD + 100) * 10**9,
                  iter(records), ignore_inode)


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({}, True),
        ({"st_size": 4}, False),
        ({"st_mtime_ns": OLD * 10**9 + 1}, False),
        ({"st_ctime_ns": OLD * 10**9 + 1}, False),
        ({"st_ino": 8}, False),
        ({"st_mode": 0o100600}, False),
        ({"st_uid": 1}, False),
        ({"st_gid": 1}, False),
        ({"st_mode": 0o120777}, False),  # now a symlink
        ({"st_mtime_ns": (OLD + 99) * 10**9, "st_ctime_ns": (OLD + 99) * 10**9}, False),  # racy
    ],
)
def test_change_detection_rule(change: dict[str, int], same: bool) -> None:
    record = _record("a")
    if "st_mtime_ns" in change and "st_ctime_ns" in change:  # racy: recorded as it is now
        record = _record("a", mtime_ns=change["st_mtime_ns"], ctime_ns=change["st_ctime_ns"])
    stat_ = _Stat(**change)
    kind = "symlink" if change.get("st_mode") == 0o120777 else "file"
    assert unchanged(record, stat_, kind, _parent([])) is same  # type: ignore[arg-type]


def test_a_partial_record_and_ignore_inode() -> None:
    assert not unchanged(_record("a", partial=True), _Stat(), "file", _parent([]))  # type: ignore[arg-type]
    moved = _Stat(st_ino=99)
    assert not unchanged(_record("a"), moved, "file", _parent([]))  # type: ignore[arg-type]
    assert unchanged(_record("a"), moved, "file", _parent([], ignore_inode=True))  # type: ignore[arg-type]


def _entry(path: str, **fields: int) -> FileEntry:
    return FileEntry(f"/x/{path}", path, _Stat(**fields))  # type: ignore[arg-type]


def test_the_merge_join_follows_walk_order_and_trusts_only_the_chain() -> None:
    """Depth-first, sorted names: ``a/b`` comes before ``a.b`` (the parent's index is in
    the same order); a record naming an archive outside the chain is never carried."""
    records = [
        _record("a/b"),
        _record("a.b"),
        _record("c", within="www-20261119T000000Z"),  # before the chain's base
        _record("d"),
    ]
    entries = [_entry("a/b"), _entry("a.b"), _entry("b"), _entry("c"), _entry("d")]
    marked = list(mark_unchanged(entries, _parent(records), lambda problem: None))
    assert [e.carry is not None for e in marked] == [True, True, False, False, True]


def test_a_bad_record_ends_the_join_and_everything_after_is_archived() -> None:
    def records() -> Any:
        yield _record("a")
        raise IndexInvalid("a record is not JSON")

    problems: list[str] = []
    parent = Parent("www-20261120T000000Z", "www-20261120T000000Z", (OLD + 100) * 10**9,
                    records())
    marked = list(mark_unchanged([_entry("a"), _entry("b")], parent, problems.append))
    assert [e.carry is not None for e in marked] == [True, False]
    assert problems == ["a record is not JSON"]


def test_index_round_trip_with_a_name_that_is_not_utf8() -> None:
    out = io.BytesIO()
    writer = IndexWriter(out.write, "www-20261121T000000Z")
    odd = os.fsdecode(b"caf\xe9")
    writer.add(_entry(odd))
    writer.add(_entry("dir", st_mode=0o040755))
    writer.finish()
    records = list(read_index(io.BytesIO(out.getvalue()), "www"))
    assert [r.path for r in records] == [odd, "dir"]
    assert records[0].within == "www-20261121T000000Z"
    assert (writer.tree_files, writer.tree_bytes) == (1, 3)


@pytest.mark.parametrize(
    "line",
    [
        b'{"path":"../x","type":"file","size":1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"www-20261120T000000Z"}',
        b'{"path":"/etc/passwd","type":"file","size":1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"www-20261120T000000Z"}',
        b'{"path":"x","type":"fifo","size":1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"www-20261120T000000Z"}',
        b'{"path":"x","type":"file","size":-1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"www-20261120T000000Z"}',
        b'{"path":"x","type":"file","size":1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"app-20261120T000000Z"}',
        b'{"path":"x","type":"file","size":1,"mtime_ns":1,"ctime_ns":1,"ino":1,"mode":1,"uid":0,"gid":0,"link":null,"in":"../../x"}',
        b"[1,2]",
        b"not json",
    ],
)
def test_hostile_index_records_are_refused(line: bytes) -> None:
    with pytest.raises(IndexInvalid):
        parse_record(line, "www")


# ---------------------------------------------------------------- retention and forget


class Item:
    def __init__(self, day: int, incremental: bool) -> None:
        self.created_at = datetime(2026, 11, day, 2, 15, tzinfo=UTC)
        self.id = f"www-202611{day:02d}T021500Z"
        self.incremental = incremental


def chain(pattern: str, first_day: int = 1) -> list[Item]:
    """``FIIFI``: a full on day 1, incrementals on days 2 and 3..."""
    return [Item(first_day + i, c == "I") for i, c in enumerate(pattern)]


GOLDEN = [
    (
        "FIIIFII",
        "last=1",
        {
            "www-20261107T021500Z": ["last 1/1"],
            "www-20261106T021500Z": ["parent of www-20261107T021500Z"],
            "www-20261105T021500Z": ["base of www-20261107T021500Z"],
        },
    ),
    (
        "FIIIFII",
        "last=5",
        {
            "www-20261107T021500Z": ["last 1/5"],
            "www-20261106T021500Z": ["last 2/5"],
            "www-20261105T021500Z": ["last 3/5"],
            "www-20261104T021500Z": ["last 4/5"],
            "www-20261103T021500Z": ["last 5/5"],
            "www-20261102T021500Z": ["parent of www-20261103T021500Z"],
            "www-20261101T021500Z": ["base of www-20261104T021500Z"],
        },
    ),
    (
        "FIIFIII",
        "last=2",
        {
            "www-20261107T021500Z": ["last 1/2"],
            "www-20261106T021500Z": ["last 2/2"],
            "www-20261105T021500Z": ["parent of www-20261106T021500Z"],
            "www-20261104T021500Z": ["base of www-20261107T021500Z"],
        },
    ),
]


@pytest.mark.parametrize(("pattern", "policy", "kept"), GOLDEN)
def test_retention_keeps_every_ancestor_golden(
    pattern: str, policy: str, kept: dict[str, list[str]]
) -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    result = plan(chain(pattern), parse_policy(policy), now=now)
    assert result.reasons() == kept
    assert set(result.kept_ids) | set(result.removed_ids) == {i.id for i in chain(pattern)}


@settings(max_examples=200, deadline=None)
@given(
    pattern=st.text(alphabet="FI", min_size=1, max_size=25),
    policy=st.sampled_from(["last=1", "last=3", "daily=2", "weekly=1", "within=3d", "last=0"]),
    pins=st.sets(st.integers(min_value=0, max_value=24), max_size=3),
)
def test_no_kept_backup_ever_loses_an_ancestor(
    pattern: str, policy: str, pins: set[int]
) -> None:
    items = chain(pattern)
    pinned = {items[i].id: ["pinned"] for i in pins if i < len(items)}
    now = datetime(2026, 12, 30, tzinfo=UTC)
    result = plan(items, parse_policy(policy), now=now, pinned=pinned)
    kept = set(result.kept_ids)
    for position, item in enumerate(items):
        if item.id not in kept:
            continue
        back = position
        while items[back].incremental and back > 0:
            back -= 1
            assert items[back].id in kept, (pattern, policy, item.id, items[back].id)
    # Planning again over what is kept keeps all of it (a second prune removes nothing).
    again = plan([i for i in items if i.id in kept], parse_policy(policy), now=now, pinned=pinned)
    assert again.removed_ids == []


def _refs(pattern: str) -> Any:
    names = []
    for item in chain(pattern):
        names += [
            f"{item.id}{'.incr' if item.incremental else ''}.tar.zst",
            f"{item.id}.manifest.json",
        ]
    return build_listing(_objects(*names), prefix="", where="local")


def test_forget_refuses_to_orphan_a_kept_incremental() -> None:
    listing = _refs("FIIF")
    assert needed_by(listing, ["www-20261101T021500Z"]) == {
        "www-20261101T021500Z": ["www-20261102T021500Z", "www-20261103T021500Z"]
    }
    assert needed_by(listing, ["www-20261102T021500Z"]) == {
        "www-20261102T021500Z": ["www-20261103T021500Z"]
    }
    # The whole dependent chain named: allowed; the newest of a chain: allowed.
    named = ["www-20261101T021500Z", "www-20261102T021500Z", "www-20261103T021500Z"]
    assert needed_by(listing, named) == {}
    assert needed_by(listing, ["www-20261103T021500Z"]) == {}


def test_forget_through_the_cli_names_what_needs_it(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    first = backup_json(cli, www)
    clock.advance(hours=1)
    second = backup_json(cli, www)
    result = cli("forget", first["id"])
    assert result.exit_code == 2
    assert f"{first['id']} is needed by {second['id']}" in result.stderr
    assert len(env.manifests("www")) == 2
    assert cli("forget", first["id"], second["id"]).exit_code == 0
    assert env.files("www") == []  # manifests, archives and indexes all gone


def test_prune_keeps_the_chain_locally(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    ids = []
    for _ in range(4):
        ids.append(backup_json(cli, www)["id"])
        clock.advance(hours=1)
    result = cli("prune", "--json", "--policy", "last=1")
    assert result.exit_code == 0, result.stderr
    (group,) = json.loads(result.stdout)["results"]
    assert group["delete"] == []
    reasons = {k["id"]: k["reasons"] for k in group["keep"]}
    assert reasons[ids[0]] == [f"base of {ids[3]}"]
    assert reasons[ids[2]] == [f"parent of {ids[3]}"]
    assert len(env.manifests("www")) == 4


def test_a_dry_run_names_the_incremental_the_real_run_writes(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backup_json(cli, www)
    clock.advance(hours=1)
    dry = cli("backup", "--dry-run", "--json", www)
    assert dry.exit_code == 0, dry.stderr
    (planned,) = json.loads(dry.stdout)["results"]
    real = backup_json(cli, www)
    assert planned["plan"]["archive"].endswith(f"{real['id']}.incr.tar.zst")
    assert (env.source_dir("www") / f"{real['id']}.incr.tar.zst").exists()


def test_an_index_without_its_manifest_is_an_orphan_swept_after_7_days(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    first = backup_json(cli, www)
    stray = env.source_dir("www") / "www-20261001T000000Z.index.zst"
    stray.write_bytes(b"left by a crash")
    young = env.source_dir("www") / "www-20261120T000000Z.index.zst"
    young.write_bytes(b"its manifest may be on its way")
    old = (clock.now - timedelta(days=30)).timestamp()
    os.utime(stray, (old, old))
    os.utime(young, (clock.now.timestamp(), clock.now.timestamp()))
    result = cli("prune", "--json", "--policy", "last=1")
    assert result.exit_code == 0, result.stderr
    (group,) = json.loads(result.stdout)["results"]
    assert group["orphans_deleted"] == ["www-20261001T000000Z"]
    assert not stray.exists() and young.exists()
    assert (env.source_dir("www") / f"{first['id']}.index.zst").exists()  # the newest's stays


@settings(max_examples=15, deadline=None)
@given(pattern=st.text(alphabet="FI", min_size=2, max_size=6), keep=st.integers(1, 3))
def test_prune_dry_run_is_the_real_run_on_chains(pattern: str, keep: int) -> None:
    """The plan a dry run prints is the one the real run executes, chains included:
    the deletions, in order, with the keys each removes."""
    from cloudbackup.ops.deletion import PruneResult, local_keys, plan_deletions

    listing = _refs("F" + pattern[1:])
    now = datetime(2026, 12, 30, tzinfo=UTC)
    refs = listing.for_source("h", "www")
    plans = []
    for dry_run in (True, False):
        chosen = plan(refs, parse_policy(f"last={keep}"), now=now)
        result = PruneResult("local", "h", "www", f"last={keep}", dry_run=dry_run)
        result.delete = chosen.removed_ids
        plan_deletions(result, refs, [], local_keys(listing))
        plans.append([(step.ref.id, step.keys) for step in result.plan])
        kept = set(chosen.kept_ids)
        for ref in refs:  # what is kept keeps its whole chain
            if ref.id in kept:
                assert all(link.id in kept for link in (chain_of(refs, ref) or []))
    assert plans[0] == plans[1]
    # Newest first: an incremental is deleted before anything it is built on.
    order = [ident for ident, _keys in plans[1]]
    assert order == sorted(order, reverse=True)


@given(st.text(alphabet="/.\0a", max_size=12))
def test_an_index_path_is_a_relative_member_name(path: str) -> None:
    """Accepted exactly when not empty, without NUL, and no component empty, ``.`` or
    ``..`` (the definition, against the reader's three substring searches)."""
    from cloudbackup.stream.index import _checked

    member_name = bool(path) and "\0" not in path
    member_name = member_name and all(part not in ("", ".", "..") for part in path.split("/"))
    if member_name:
        assert _checked(path) == path
    else:
        with pytest.raises(IndexInvalid):
            _checked(path)


@pytest.mark.parametrize(
    "path", ["a/b.txt", 'say "hi"', "tab\there", "caf\u00e9", os.fsdecode(b"x\xff"), "back\\slash"]
)
def test_the_fast_path_reader_agrees_with_json(path: str) -> None:
    from cloudbackup.stream.index import parse_path

    out = io.BytesIO()
    writer = IndexWriter(out.write, "www-20261121T000000Z")
    writer.add(_entry(path))
    writer.finish()
    (line,) = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())).read().splitlines()
    assert parse_path(line) == path == parse_record(line, "www").path
    with pytest.raises(IndexInvalid):
        parse_path(b'{"path":"../etc/passwd","in":"www-20261121T000000Z"}')
