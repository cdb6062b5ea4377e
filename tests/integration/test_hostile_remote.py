"""Objects read from the bucket or the local dir are untrusted: forged backups through the CLI.

Every forged backup here has checksums that match (the archive's SHA-256 and size are in its
manifest), so only the parser and the restore's own checks stand between it and the disk:

* a manifest whose ``id``, ``host``, ``source``, ``archive`` (or any other field) disagrees
  with its key, or that does not parse, is an integrity failure (exit 3) that writes nothing;
* no field of a manifest decides a path: a ``source`` of ``/some/dir/victim`` or
  ``../../victim`` never makes a restore move or copy ``victim.out`` / ``victim.sqlite3``;
* single-file members (``NAME.out``, ``NAME.sqlite3``, ``DB.dump``) are restored only when they
  are regular files: a symlink, hard link or directory in their place is exit 3;
* list and prune work from LIST alone, whatever a manifest holds; status, upload, run and
  verify meet a hostile manifest with one line and the right exit code, never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cloudbackup.core.model import BackupId, archive_name, manifest_name
from tests.conftest import HOST, CliResult, Env, S3Env, make_tree

pytestmark = pytest.mark.slow

Cli = Callable[..., CliResult]
WHEN = "20261121T021500Z"
MTIME = 1_700_000_000


# ---------------------------------------------------------------- forging


def tar_of(*members: tuple[str, dict[str, Any]]) -> bytes:
    """A PAX tar of ``(name, attributes)``; ``data`` becomes a regular file's content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, attrs in members:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.mode = attrs.pop("mode", 0o644)
            data = attrs.pop("data", None)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def regular(data: bytes) -> dict[str, Any]:
    return {"data": data}


def symlink(target: str) -> dict[str, Any]:
    return {"type": tarfile.SYMTYPE, "linkname": target}


def hardlink(target: str) -> dict[str, Any]:
    return {"type": tarfile.LNKTYPE, "linkname": target}


def directory() -> dict[str, Any]:
    return {"type": tarfile.DIRTYPE, "mode": 0o755}


def manifest_for(
    key_source: str,
    kind: str,
    archive: bytes,
    *,
    when: str = WHEN,
    file_count: Any = 1,
    uncompressed_bytes: int = 0,
    override: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A manifest as cloudbackup writes it for ``archive`` (zstd) under the key of
    ``key_source``, with the fields in ``override`` replaced."""
    source = key_source
    backup_id = BackupId.parse(f"{source}-{when}")
    fields: dict[str, Any] = {
        "format": 1,
        "id": str(backup_id),
        "host": HOST,
        "source": source,
        "kind": kind,
        "spec": "forged",
        "created_at": f"{backup_id.created_at:%Y-%m-%dT%H:%M:%SZ}",
        "archive": archive_name(backup_id, "zstd"),
        "size": len(archive),
        "sha256": hashlib.sha256(archive).hexdigest(),
        "compression": "zstd",
        "compression_level": 3,
        "file_count": file_count,
        "uncompressed_bytes": uncompressed_bytes,
        "machine_id": "forged",
        "tool_version": "forged",
        "warnings": [],
        "members": {"dirs": 0, "symlinks": 0, "hardlinks": 0},
    }
    fields.update(override or {})
    return fields


def forge_remote(
    s3_env: S3Env,
    source: str,
    tar_bytes: bytes,
    *,
    kind: str = "command",
    when: str = WHEN,
    body: bytes | None = None,
    metadata: dict[str, str] | None = None,
    file_count: Any = 1,
    uncompressed_bytes: int = 0,
    override: dict[str, Any] | None = None,
) -> str:
    """Upload a forged backup (archive, then manifest) under ``source``'s key, whose
    checksums all match; returns its id."""
    host = HOST
    backup_id = BackupId.parse(f"{source}-{when}")
    archive = zstandard.ZstdCompressor().compress(tar_bytes)
    digest = hashlib.sha256(archive).hexdigest()
    fields = manifest_for(
        source,
        kind,
        archive,
        when=when,
        file_count=file_count,
        uncompressed_bytes=uncompressed_bytes,
        override=override,
    )
    s3_env.client.put_object(
        Bucket=s3_env.bucket,
        Key=s3_env.key(host, source, archive_name(backup_id, "zstd")),
        Body=archive,
        Metadata={"sha256": digest, "source": source, "host": host},
    )
    s3_env.client.put_object(
        Bucket=s3_env.bucket,
        Key=s3_env.key(host, source, manifest_name(backup_id)),
        Body=body if body is not None else json.dumps(fields).encode(),
        Metadata=metadata or {},
    )
    return str(backup_id)


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Type, mode and content of everything under ``root`` (links not followed)."""
    found: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def sqlite_bytes(path: Path, secret: str) -> bytes:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE secrets (s TEXT)")
        conn.execute("INSERT INTO secrets VALUES (?)", (secret,))
    conn.close()
    return path.read_bytes()


# ---------------------------------------------------------------- item 1: no path from a manifest


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_a_manifest_source_never_moves_a_victim_file_into_the_target(
    env: Env, s3_env: S3Env, cli: Cli, form: str
) -> None:
    victim_dir = make_tree(env.tmp / "some" / "dir", {"victim.out": "the victim's data\n"})
    if form == "absolute":
        forged_source = str(victim_dir / "victim")
        victim = victim_dir / "victim.out"
    else:
        # Relative to the staging directory, which sits beside the target in env.work.
        forged_source = "../some/dir/victim"
        victim = env.work / ".." / "some" / "dir" / "victim.out"
    payload = b"the archive's own data\n"
    forge_remote(
        s3_env,
        "shop",
        tar_of(("shop.out", regular(payload))),
        override={"source": forged_source},
        uncompressed_bytes=len(payload),
    )
    before = tree_state(env.tmp / "some")
    target = env.work / "restored.sql"

    result = cli("restore", "shop", "--to", target)
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("manifest", "source")
    assert victim.read_text() == "the victim's data\n"
    assert tree_state(env.tmp / "some") == before
    assert not target.exists() and not target.is_symlink()
    assert sorted(p.name for p in env.work.iterdir()) == []  # no staging left behind

    piped = cli("restore", "shop", "--to", "-")
    assert piped.exit_code == 3 and piped.stdout == ""
    piped.assert_one_error("manifest", "source")


def test_a_manifest_source_never_copies_a_private_sqlite_file_into_the_target(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    victim_dir = env.tmp / "private"
    victim_dir.mkdir()
    victim = victim_dir / "victim.sqlite3"
    sqlite_bytes(victim, "the victim's secret")
    victim.chmod(0o600)
    archived = sqlite_bytes(env.tmp / "scratch.db", "archived row")
    forge_remote(
        s3_env,
        "app",
        tar_of(("app.sqlite3", regular(archived))),
        kind="sqlite",
        override={"source": str(victim_dir / "victim")},
        uncompressed_bytes=len(archived),
    )
    target = env.work / "app.db"

    result = cli("restore", "app", "--to", target)
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("manifest", "source")
    assert not target.exists()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert sorted(p.name for p in env.work.iterdir()) == []


def test_a_local_manifest_is_untrusted_too(env: Env, s3_env: S3Env, cli: Cli) -> None:
    """The same forgery planted in the local dir (no bucket involved)."""
    victim = make_tree(env.tmp / "victims", {"victim.out": "the victim's data\n"}) / "victim.out"
    payload = b"data\n"
    archive = zstandard.ZstdCompressor().compress(tar_of(("shop.out", regular(payload))))
    backup_id = BackupId.parse(f"shop-{WHEN}")
    directory = env.source_dir("shop")
    directory.mkdir(parents=True)
    (directory / archive_name(backup_id, "zstd")).write_bytes(archive)
    fields = manifest_for(
        "shop",
        "command",
        archive,
        uncompressed_bytes=5,
        override={"source": str(victim)[: -len(".out")]},
    )
    (directory / manifest_name(backup_id)).write_text(json.dumps(fields))

    target = env.work / "out.sql"
    result = cli("restore", "shop", "--to", target, "--from", "local")
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("manifest", "source")
    assert victim.read_text() == "the victim's data\n" and not target.exists()


def test_a_hostile_local_manifest_falls_back_to_the_good_remote_copy(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "the real data\n"})
    assert cli("backup", src).exit_code == 0
    (path,) = env.manifests("www")
    data = json.loads(path.read_bytes())
    data["source"] = "../../victim"
    path.write_text(json.dumps(data))

    target = env.work / "t"
    result = cli("restore", "www", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["where_from"] == "remote"
    assert (
        "names source '../../victim'" in result.stderr and "restoring from remote" in result.stderr
    )
    assert (target / "a.txt").read_text() == "the real data\n"
    insisted = cli("restore", "www", "--to", env.work / "u", "--from", "local")
    assert insisted.exit_code == 3
    insisted.assert_one_error("local manifest", "source")
    assert not (env.work / "u").exists()


# ---------------------------------------------------------------- the manifest against its key


def _directory_backup(s3_env: S3Env, override: dict[str, Any]) -> None:
    forge_remote(
        s3_env,
        "www",
        tar_of(("index.html", regular(b"hello\n"))),
        kind="directory",
        uncompressed_bytes=6,
        override=override,
    )


DISAGREEING = {
    "host": {"host": "otherhost"},
    "source": {"source": "other"},
    "source-path": {"source": "/etc/www"},
    "id": {"id": f"other-{WHEN}"},
    "archive-other-id": {"archive": "www-20250101T000000Z.tar.zst"},
    "archive-path": {"archive": "../../../www.tar.zst"},
    "archive-compression": {"archive": f"www-{WHEN}.tar.gz", "compression": "gzip"},
    "created_at": {"created_at": "2026-11-20T02:15:00Z"},
    "kind": {"kind": "tarball"},
    "compression": {"compression": "lz4"},
    "sha256-case": {"sha256": "A" * 64},
    "size-type": {"size": "6"},
    "count-negative": {"file_count": -1},
    "count-bool": {"file_count": True},
    "warnings-type": {"warnings": "none"},
    "members-type": {"members": ["index.html"]},
    "upload-type": {
        "upload": {
            "key": f"cloudbackup/{HOST}/www/www-{WHEN}.tar.zst",
            "part_size": "8",
            "part_count": 1,
            "checksum_algorithm": None,
            "checksum": None,
        }
    },
    "format": {"format": 2},
}


@pytest.mark.parametrize("case", sorted(DISAGREEING))
def test_a_manifest_that_disagrees_with_its_key_or_types_is_exit_3_and_writes_nothing(
    env: Env, s3_env: S3Env, cli: Cli, case: str
) -> None:
    _directory_backup(s3_env, DISAGREEING[case])
    target = env.work / "t"
    result = cli("restore", "www", "--to", target)
    assert result.exit_code == 3, (case, result.stderr)
    result.assert_one_error("manifest", f"www-{WHEN}.manifest.json")
    assert not target.exists()
    assert list(env.work.iterdir()) == []


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"\xff\xfe garbage", b"[]", b"null", b"[" * 100_000, b'{"format": 1}'],
    ids=["empty", "truncated", "not-utf8", "list", "null", "deep", "only-format"],
)
def test_an_unparsable_manifest_is_exit_3_for_restore_and_verify(
    env: Env, s3_env: S3Env, cli: Cli, body: bytes
) -> None:
    forge_remote(s3_env, "www", tar_of(("a.txt", regular(b"a"))), kind="directory", body=body)
    target = env.work / "t"
    restored = cli("restore", "www", "--to", target)
    assert restored.exit_code == 3, restored.stderr
    restored.assert_one_error("manifest", f"www-{WHEN}.manifest.json")
    assert not target.exists()

    # No metadata on the manifest object: verify must read (and parse) its body.
    verified = cli("verify", "--where", "remote", "--json")
    assert verified.exit_code == 3, verified.stderr
    assert "Traceback" not in verified.stderr and "unexpected" not in verified.stderr
    (entry,) = json.loads(verified.stdout)["results"]
    assert entry["ok"] is False and "manifest" in entry["detail"]


def test_hostile_manifest_metadata_is_exit_3_for_verify(env: Env, s3_env: S3Env, cli: Cli) -> None:
    forge_remote(
        s3_env,
        "www",
        tar_of(("a.txt", regular(b"a"))),
        kind="directory",
        metadata={"sha256": "0" * 64, "size": "lots"},
    )
    result = cli("verify", "--where", "remote", "--json")
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["ok"] is False and "size" in entry["detail"]


def test_list_status_and_prune_work_from_list_alone_whatever_a_manifest_holds(
    env: Env, s3_env: S3Env, cli: Cli, clock: Any
) -> None:
    good = make_tree(env.tmp / "www", {"a.txt": "a"})
    assert cli("backup", good).exit_code == 0
    forge_remote(s3_env, "www", b"", kind="directory", when="20261120T021500Z", body=b"\x00junk")
    forge_remote(s3_env, "evil", b"", kind="directory", body=b"[]")

    listed = cli("list", "--where", "remote", "--json")
    assert listed.exit_code == 0, listed.stderr
    ids = sorted(b["id"] for b in json.loads(listed.stdout)["backups"])
    assert ids == [f"evil-{WHEN}", "www-20261120T021500Z", f"www-{WHEN}"]

    status = cli("status", "--json")
    assert "Traceback" not in status.stderr and "unexpected" not in status.stderr
    assert status.exit_code in (0, 1), status.stderr  # ok, or WARNING; never a crash

    pruned = cli("prune", "--where", "remote", "--policy", "last=1", "--json")
    assert pruned.exit_code == 0, pruned.stderr
    deleted = sorted(i for r in json.loads(pruned.stdout)["results"] for i in r["deleted"])
    assert deleted == ["www-20261120T021500Z"]


# ---------------------------------------------------------------- item 2: regular files only


BAD_OUT = {
    # shop.out is a symlink to a file standing in for /etc/passwd.
    "symlink": lambda victim: [("shop.out", symlink(str(victim)))],
    # shop.out is a second name of another member.
    "hardlink": lambda victim: [("data", regular(b"x\n")), ("shop.out", hardlink("data"))],
    # shop.out is a directory; another *.out file is no substitute.
    "directory": lambda victim: [
        ("shop.out", directory()),
        ("shop.out/inner", regular(b"x\n")),
        ("other.out", regular(b"other\n")),
    ],
    # shop.out is a device (the extractor refuses it); another *.out is no substitute.
    "device": lambda victim: [
        ("shop.out", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
        ("other.out", regular(b"other\n")),
    ],
}


@pytest.mark.parametrize("shape", sorted(BAD_OUT))
def test_a_command_output_member_must_be_a_regular_file(
    env: Env, s3_env: S3Env, cli: Cli, shape: str
) -> None:
    victim = make_tree(env.tmp / "etc", {"passwd": "root:x:0:0::/root:/bin/sh\n"}) / "passwd"
    members = BAD_OUT[shape](victim)
    files = sum(1 for _, attrs in members if attrs.get("type") != tarfile.DIRTYPE)
    forge_remote(s3_env, "shop", tar_of(*members), file_count=files, uncompressed_bytes=0)
    target = env.work / "dump.sql"

    result = cli("restore", "shop", "--to", target)
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("shop.out", "regular file")
    assert not target.exists() and not target.is_symlink()
    assert victim.read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert list(env.work.iterdir()) == []

    piped = cli("restore", "shop", "--to", "-")
    assert piped.exit_code == 3 and piped.stdout == ""
    piped.assert_one_error("shop.out")


@pytest.mark.parametrize("shape", ["symlink", "hardlink"])
def test_a_sqlite_member_must_be_a_regular_file(
    env: Env, s3_env: S3Env, cli: Cli, shape: str
) -> None:
    victim = env.tmp / "victim.db"
    sqlite_bytes(victim, "secret")
    victim.chmod(0o600)
    archived = sqlite_bytes(env.tmp / "scratch.db", "archived")
    if shape == "symlink":
        members = [("app.sqlite3", symlink(str(victim)))]
    else:
        members = [("copy.db", regular(archived)), ("app.sqlite3", hardlink("copy.db"))]
    forge_remote(
        s3_env,
        "app",
        tar_of(*members),
        kind="sqlite",
        file_count=len(members),
        uncompressed_bytes=len(archived) if shape == "hardlink" else 0,
    )
    target = env.work / "app.db"
    result = cli("restore", "app", "--to", target)
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("app.sqlite3", "regular file")
    assert not target.exists() and not target.is_symlink()
    assert list(env.work.iterdir()) == []


@pytest.mark.parametrize("shape", ["symlink", "hardlink", "directory", "globals-symlink"])
def test_a_postgres_dump_member_must_be_a_regular_file(
    env: Env, s3_env: S3Env, cli: Cli, shape: str
) -> None:
    """Refused before any connection: the target URL points at a closed port."""
    victim = make_tree(env.tmp / "etc", {"shadow": "root:*:1::::::\n"}) / "shadow"
    members = {
        "symlink": [("shop.dump", symlink(str(victim))), ("globals.sql", regular(b"--\n"))],
        "hardlink": [("globals.sql", regular(b"--\n")), ("shop.dump", hardlink("globals.sql"))],
        "directory": [("shop.dump", directory()), ("globals.sql", regular(b"--\n"))],
        # The roles script psql would run: a symlink to a file it must never read.
        "globals-symlink": [
            ("shop.dump", regular(b"PGDMP")),
            ("globals.sql", symlink(str(victim))),
        ],
    }[shape]
    culprit = "globals.sql" if shape.startswith("globals") else "shop.dump"
    postgres_members = {
        "dirs": 0,
        "symlinks": 0,
        "hardlinks": 0,
        "database": "shop",
        "dump": "shop.dump",
        "dump_format": "custom",
        "dump_bytes": 3,
        "globals": "globals.sql",
        "pg_dump_version": "15.0",
        "server_version": "15.0",
    }
    forge_remote(
        s3_env,
        "shopdb",
        tar_of(*members),
        kind="postgresql",
        override={"members": postgres_members},
        file_count=2,
        uncompressed_bytes=3,
    )
    result = cli("restore", "shopdb", "--to", "postgresql://nobody@127.0.0.1:1/shop")
    assert result.exit_code == 3, result.stderr
    result.assert_one_error(culprit, "regular file")
    assert victim.read_text() == "root:*:1::::::\n"


def test_a_postgres_dump_name_must_be_a_plain_member_name(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    members = [("globals.sql", regular(b"--\n")), ("shop.dump", regular(b"PGDMP"))]
    forge_remote(
        s3_env,
        "shopdb",
        tar_of(*members),
        kind="postgresql",
        override={
            "members": {"database": "shop", "dump": "../../etc/shop.dump", "globals": "globals.sql"}
        },
        file_count=2,
        uncompressed_bytes=8,
    )
    result = cli("restore", "shopdb", "--to", "postgresql://nobody@127.0.0.1:1/shop")
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("manifest", "dump")


# ---------------------------------------------------------------- upload and run


def test_upload_refuses_a_hostile_local_manifest_before_writing_anything(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a" * 100})
    assert cli("backup", src, "--no-upload").exit_code == 0
    (path,) = env.manifests("www")
    data = json.loads(path.read_bytes())
    data["archive"] = "../../../escape.tar.zst"  # a key outside this backup's prefix
    path.write_text(json.dumps(data))

    result = cli("upload")
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert "manifest" in result.stderr and "archive" in result.stderr
    assert s3_env.keys() == []  # nothing uploaded, not even the host claim


@pytest.mark.parametrize("body", [b"[]", b"{", None], ids=["list", "truncated", "types"])
def test_local_upload_records_that_do_not_parse_are_treated_as_absent(
    env: Env, s3_env: S3Env, cli: Cli, body: bytes | None
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    assert cli("backup", src, "--no-upload").exit_code == 0
    (manifest,) = env.manifests("www")
    record = manifest.with_name(manifest.name.replace(".manifest.json", ".upload.json"))
    # "types": the shape of a record, with a number where a time belongs.
    typed = {"key": 1, "part_size": 1, "part_count": 1, "checksum_algorithm": None}
    record.write_bytes(
        body
        if body is not None
        else json.dumps(typed | {"checksum": None, "verified_at": 2}).encode()
    )
    listed = cli("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    (backup,) = json.loads(listed.stdout)["backups"]
    assert backup["verified"] is False  # a record that does not parse proves nothing
    status = cli("status")
    assert "Traceback" not in status.stderr and "unexpected" not in status.stderr
    uploaded = cli("upload")
    assert uploaded.exit_code == 0, uploaded.stderr
    assert any(k.endswith(".manifest.json") for k in s3_env.keys())


def test_run_with_a_hostile_previous_manifest_backs_up_and_says_so(
    env: Env, s3_env: S3Env, cli: Cli, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest backup's manifest (the shrink guard's reference) holds a string count: the
    run still backs the source up (against the newest readable one), names the bad key in
    one line and exits 3 so monitoring sees it."""
    src = make_tree(env.tmp / "www", {f"{i}.txt": "x" * 100 for i in range(10)})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(src))
    assert cli("backup").exit_code == 0
    clock.advance(days=1)
    forged = forge_remote(
        s3_env,
        "www",
        tar_of(("a.txt", regular(b"a"))),
        kind="directory",
        when="20261121T120000Z",
        file_count="lots",
    )
    result = cli("run", "--json")
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    report = json.loads(result.stdout)
    (source,) = report["results"]
    assert source["ok"] is True and source["uploaded"] is True
    assert any(forged in w and "manifest" in w for w in source["warnings"])
    bad_lines = [line for line in result.stderr.splitlines() if f"{forged}.manifest.json" in line]
    assert len(bad_lines) == 1, result.stderr


# ---------------------------------------------------------------- the local dir: planted links


def test_a_symlink_planted_in_the_local_dir_is_never_listed_uploaded_or_restored(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    """Someone who can write the local dir links a backup's archive name to a file only root
    may read: it is not a backup (never listed), never uploaded, and never read by a restore."""
    secret = env.tmp / "shadow"
    secret.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    tree = make_tree(env.tmp / "www", {"a.txt": "a"})
    assert cli("backup", "--no-upload", tree).exit_code == 0
    (archive,) = env.archives("www")
    (manifest,) = env.manifests("www")
    # The genuine archive is replaced by a link to the secret, with a manifest to match it.
    real = json.loads(manifest.read_bytes())
    real["sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    real["size"] = secret.stat().st_size
    manifest.write_text(json.dumps(real))
    archive.unlink()
    archive.symlink_to(secret)

    listed = cli("list", "--where", "local", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert json.loads(listed.stdout)["backups"] == []

    uploaded = cli("upload")
    assert "Traceback" not in uploaded.stderr
    assert not [k for k in s3_env.keys() if k.endswith(archive.name)]
    everything = b"".join(
        s3_env.client.get_object(Bucket=s3_env.bucket, Key=k)["Body"].read() for k in s3_env.keys()
    )
    assert b"secret-hash" not in everything

    restored = cli("restore", "www", "--from", "local", "--to", env.tmp / "out")
    assert restored.exit_code == 2, restored.stderr  # not found: the link is no backup
    assert not (env.tmp / "out").exists()


# ---------------------------------------------------------------- hostile numbers in headers


HOSTILE_NUMBERS = {
    "mtime-1e300": {"mtime": "1e300"},
    "mtime-nan": {"mtime": "nan"},
    "mtime--inf": {"mtime": "-inf"},
    "uid--5": {"uid": "-5"},
    "uid-2**40": {"uid": str(2**40)},
    "gid-1e20": {"gid": "1e20"},
    "size--1000": {"size": "-1000"},
}


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
@pytest.mark.parametrize("case", sorted(HOSTILE_NUMBERS))
def test_hostile_numbers_refuse_the_member_restore_the_rest_and_fail_verify_deep(
    env: Env, s3_env: S3Env, cli: Cli, case: str, kind: str
) -> None:
    """The same rule for restore (the member refused, the rest restored: exit 1), a dry run
    with --include (exit 1, nothing written) and verify --deep (damaged: exit 3)."""
    attrs: dict[str, Any] = {
        "file": regular(b""),
        "dir": directory(),
        "symlink": symlink("a.txt"),
    }[kind]
    attrs["pax_headers"] = HOSTILE_NUMBERS[case]
    members = tar_of(("a.txt", regular(b"a")), ("victim", attrs), ("z.txt", regular(b"z")))
    forge_remote(
        s3_env, "www", members, kind="directory", file_count=3, uncompressed_bytes=2
    )
    target = env.work / "t"

    restored = cli("restore", "www", "--to", target)
    assert restored.exit_code == 1, restored.stderr
    assert "Traceback" not in restored.stderr and "unexpected" not in restored.stderr
    (refusal,) = [line for line in restored.stdout.splitlines() if "refused 'victim'" in line]
    assert next(iter(HOSTILE_NUMBERS[case])) in refusal
    assert sorted(os.listdir(target)) == ["a.txt", "z.txt"]
    assert (target / "z.txt").read_bytes() == b"z"

    dry = cli("restore", "www", "--dry-run", "--include", "**", "--to", env.work / "d")
    assert dry.exit_code == 1, dry.stderr
    assert "Traceback" not in dry.stderr and "unexpected" not in dry.stderr
    assert "refused 'victim'" in dry.stdout
    assert not (env.work / "d").exists()

    verified = cli("verify", "--where", "remote", "--deep", "--json")
    assert verified.exit_code == 3, verified.stderr
    assert "Traceback" not in verified.stderr and "unexpected" not in verified.stderr
    (entry,) = json.loads(verified.stdout)["results"]
    assert entry["ok"] is False and "victim" in entry["detail"]


# ---------------------------------------------------------------- host claim and upload records


def test_a_hostile_host_claim_is_read_bounded_and_shown_printable(
    env: Env, s3_env: S3Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.host-id`` without metadata whose body is 4 MiB of terminal escapes: the claim is
    refused as another machine's, in one line of printable characters, and only its first
    bytes are ever read."""
    from botocore.response import StreamingBody

    body = b"\x1b[31m\x1b]0;owned\x07EVIL" + b"\x1b[2J" * (1 << 20)
    s3_env.client.put_object(
        Bucket=s3_env.bucket, Key=f"{s3_env.prefix}/{HOST}/.host-id", Body=body
    )
    read: list[int] = []
    real_read = StreamingBody.read

    def counting_read(self: Any, amt: int | None = None) -> bytes:
        data = real_read(self, amt)
        read.append(len(data))
        return data

    monkeypatch.setattr(StreamingBody, "read", counting_read)
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    result = cli("backup", src)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "\x1b" not in result.stderr + result.stdout and "\x07" not in result.stderr
    assert "claimed by another machine" in result.stderr
    assert "[31m]0;ownedEVIL"[:12] in result.stderr
    assert sum(read) <= 4096, sum(read)


def test_a_local_upload_record_naming_another_prefix_never_aborts_that_upload(
    env: Env, s3_env: S3Env, cli: Cli
) -> None:
    """The record of a backup that never completed names an upload under another prefix
    (only its last components look right): the tool never aborts that upload."""
    when = "20261120T021500Z"
    backup_id = BackupId.parse(f"www-{when}")
    elsewhere = f"other-team/{HOST}/www/{archive_name(backup_id, 'zstd')}"
    upload = s3_env.client.create_multipart_upload(Bucket=s3_env.bucket, Key=elsewhere)
    source_dir = env.source_dir("www")
    source_dir.mkdir(parents=True)
    (source_dir / f"www-{when}.upload.json").write_text(
        json.dumps(
            {
                "key": elsewhere,
                "part_size": 8 << 20,
                "part_count": 1,
                "checksum_algorithm": "SHA256",
                "upload_id": upload["UploadId"],
            }
        )
    )
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    result = cli("backup", src)
    assert result.exit_code == 0, result.stderr
    uploads = s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(elsewhere, upload["UploadId"])]
