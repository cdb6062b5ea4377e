"""`cloudbackup restore` end to end: real files, both destinations (a moto S3 server over HTTP,
a directory), the real CLI.

A fresh machine (empty local dir) restores from the offsite copy by LIST alone; a tampered remote
archive is an integrity failure that writes nothing; malicious archives put nothing outside
the target; a non-empty target needs --force; a restore killed with SIGKILL never leaves a
half-restored tree under the target's name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cloudbackup.core.model import Manifest, archive_name, manifest_name
from tests.conftest import (
    HOST,
    CliResult,
    Clock,
    Env,
    RemoteEnv,
    S3Env,
    kill_when,
    make_tree,
)
from tests.integration.pgserver import SUPERUSER_PASSWORD

pytestmark = pytest.mark.slow

MTIME = 1_700_000_000
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def moto_endpoint(moto_server: str) -> str:
    """The session's moto server (tests/conftest.py), over HTTP."""
    return moto_server


@pytest.fixture
def bucket(s3_env: S3Env) -> str:
    """A fresh bucket, configured for the CLI (CLOUDBACKUP_S3_BUCKET, ..._ENDPOINT_URL)."""
    return s3_env.bucket


@pytest.fixture(params=["child", "thread", "inline"])
def decompression(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every place a restore decompresses: in a child process fed by pipes, on a thread of
    its own, or on the extracting thread (see ``apply.placement``)."""
    from cloudbackup.restore import apply

    place: str = request.param
    monkeypatch.setattr(apply, "placement", lambda manifest: place)
    return place


# ---------------------------------------------------------------- trees


def build_source(root: Path) -> Path:
    """Files with modes and mtimes, symlinks (relative, absolute, dangling), an empty
    directory, unicode names, a read-only directory and a hard link."""
    make_tree(
        root,
        {
            "index.html": "<h1>hello</h1>\n",
            "bin/run.sh": "#!/bin/sh\necho run\n",
            "conf/app.yaml": "a: 1\n",
            "café/naïve résumé.txt": "unicode\n",
            "日本/データ.bin": os.urandom(70_000),
            "deep/a/b/c/d.txt": "deep\n",
            "ro/inside.txt": "read-only dir\n",
            "big.bin": os.urandom(300_000),
        },
    )
    (root / "empty").mkdir()
    (root / "empty-nested" / "inner").mkdir(parents=True)
    os.chmod(root / "bin/run.sh", 0o755)
    os.chmod(root / "conf/app.yaml", 0o640)
    os.chmod(root / "conf", 0o750)
    os.symlink("../index.html", root / "conf/link-rel")
    os.symlink("/etc/hostname", root / "link-abs")
    os.symlink("does-not-exist", root / "dangling")
    os.link(root / "index.html", root / "hard.html")
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, (MTIME, MTIME + len(path.name)), follow_symlinks=False)
    os.chmod(root / "ro", 0o555)
    os.utime(root / "ro", (MTIME, MTIME), follow_symlinks=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must reproduce: type, mode, mtime, content or link target."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path), int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), int(st.st_mtime))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), digest)
    return found


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def restore_json(result: CliResult) -> dict[str, Any]:
    assert "Traceback" not in result.stderr, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# ---------------------------------------------------------------- fresh machine


def test_fresh_machine_round_trip(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult], decompression: str
) -> None:
    src = build_source(env.tmp / "www")
    expected = snapshot(src)
    backed = cli("backup", src, "--json")
    assert backed.exit_code == 0, backed.stderr
    assert json.loads(backed.stdout)["results"][0]["uploaded"] is True

    # The old machine is gone: nothing local, only the offsite copy.
    os.chmod(src / "ro", 0o755)
    shutil.rmtree(env.local_dir)
    target = env.work / "restored"
    result = cli("restore", "www", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    data = restore_json(result)
    assert data["ok"] is True and data["where_from"] == "remote"
    assert data["files"] == data["expected_files"] and data["bytes"] == data["expected_bytes"]
    assert data["id"].startswith("www-") and data["host"] == HOST
    # Every stage of the one pass reports its busy seconds.
    assert {"read", "hash", "decompress", "extract", "count", "install"} <= set(data["stages"])
    assert all(isinstance(v, float) and v >= 0 for v in data["stages"].values())
    assert snapshot(target) == expected
    assert (target / "hard.html").stat().st_ino == (target / "index.html").stat().st_ino
    assert hidden_leftovers(env.work) == []  # no staging directory left
    assert not env.local_dir.exists()  # a remote restore keeps no local backup

    # The human summary: one line on stdout saying it matched the manifest.
    again = cli("restore", "www", "--to", env.work / "again")
    assert again.exit_code == 0, again.stderr
    (line,) = again.stdout.splitlines()
    assert line.startswith("restored www-") and "as the manifest says" in line
    assert snapshot(env.work / "again") == expected


def test_default_target_is_the_backup_id_and_local_copy_is_preferred(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult]
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a", "b/c.txt": "c"})
    assert cli("backup", src).exit_code == 0
    result = cli("restore", "www", "--json")
    data = restore_json(result)
    assert result.exit_code == 0 and data["where_from"] == "local"
    assert Path(data["target"]) == env.work / data["id"]
    assert (env.work / data["id"] / "b/c.txt").read_text() == "c"


def test_tampered_local_copy_falls_back_to_remote(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult], decompression: str
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a" * 1000})
    assert cli("backup", src).exit_code == 0
    (archive,) = env.archives("www")
    data = bytearray(archive.read_bytes())
    data[-5] ^= 0xFF
    archive.write_bytes(bytes(data))
    result = cli("restore", "www", "--to", env.work / "t", "--json")
    assert result.exit_code == 0, result.stderr
    assert restore_json(result)["where_from"] == "remote"
    assert "fails its checksum" in result.stderr
    assert (env.work / "t/a.txt").read_text() == "a" * 1000
    # Insisting on the damaged local copy is an integrity failure that writes nothing.
    local = cli("restore", "www", "--to", env.work / "u", "--from", "local")
    assert local.exit_code == 3
    local.assert_one_error("fails its checksum")
    assert not (env.work / "u").exists() and hidden_leftovers(env.work) == []


# ---------------------------------------------------------------- choosing the backup


def _three_backups(env: Env, cli: Callable[..., CliResult], clock: Clock) -> list[str]:
    src = env.tmp / "www"
    ids = []
    for version in (1, 2, 3):
        make_tree(src, {"version.txt": f"v{version}\n", "other.txt": "x"})
        result = cli("backup", src, "--json")
        assert result.exit_code == 0, result.stderr
        ids.append(json.loads(result.stdout)["results"][0]["id"])
        clock.advance(days=1)
    return ids


def test_at_picks_the_newest_backup_at_or_before(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult], clock: Clock
) -> None:
    ids = _three_backups(env, cli, clock)
    assert ids == [
        "www-20261121T021500Z",
        "www-20261122T021500Z",
        "www-20261123T021500Z",
    ]
    cases = {
        "2026-11-22T12:00:00Z": ids[1],
        "2026-11-22T02:15:00Z": ids[1],  # "at or before": the same second counts
        "2026-11-22T02:14:59Z": ids[0],
        "2026-11-22T03:14:59+01:00": ids[0],  # an offset: 02:14:59Z
        "2026-11-21": ids[0],  # a bare date: the end of that day, UTC
        "2026-11-22": ids[1],
        "2030-01-01T00:00:00Z": ids[2],
    }
    for n, (at, expected) in enumerate(cases.items()):
        target = env.work / f"t{n}"
        result = cli("restore", "www", "--at", at, "--to", target, "--from", "remote", "--json")
        assert result.exit_code == 0, (at, result.stderr)
        assert restore_json(result)["id"] == expected, at
        assert (target / "version.txt").read_text() == f"v{ids.index(expected) + 1}\n"
    newest = cli("restore", "www", "--to", env.work / "newest", "--json")
    assert restore_json(newest)["id"] == ids[2]
    by_id = cli("restore", ids[0], "--to", env.work / "by-id", "--json")
    assert restore_json(by_id)["id"] == ids[0]

    too_early = cli("restore", "www", "--at", "2026-11-20T00:00:00Z")
    assert too_early.exit_code == 2
    too_early.assert_one_error("at or before", ids[0])
    for bad in ("yesterday", "2026-11-22T12:00:00", "2026-13-01"):
        result = cli("restore", "www", "--at", bad)
        assert result.exit_code == 2, bad
        result.assert_one_error("--at", bad)


def test_host_not_found_lists_the_hosts_that_have_it(
    env: Env,
    remote: RemoteEnv,
    cli: Callable[..., CliResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    for host in ("web1", "web2"):
        monkeypatch.setenv("CLOUDBACKUP_HOST", host)
        assert cli("backup", src).exit_code == 0
    shutil.rmtree(env.local_dir)  # a fresh DR machine
    monkeypatch.setenv("CLOUDBACKUP_HOST", "drbox")
    result = cli("restore", "www", "--to", env.work / "t")
    assert result.exit_code == 2
    result.assert_one_error("www", "drbox", "web1, web2", "--host")
    assert not (env.work / "t").exists()
    unknown = cli("restore", "nosuch")
    assert unknown.exit_code == 2
    unknown.assert_one_error("nosuch")
    ok = cli("restore", "www", "--host", "web2", "--to", env.work / "t", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert restore_json(ok)["host"] == "web2"


# ---------------------------------------------------------------- integrity


def test_tampered_remote_archive_is_exit_3_and_writes_nothing(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult], decompression: str
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": os.urandom(50_000), "b.txt": "b"})
    assert cli("backup", src).exit_code == 0
    (key,) = [k for k in remote.keys() if ".tar.zst" in k]
    body = bytearray(remote.get(key))
    body[len(body) // 2] ^= 0x01  # one bit, same size
    remote.delete(key)
    remote.put(key, bytes(body))

    target = env.work / "t"
    result = cli("restore", "www", "--to", target, "--from", "remote")
    assert result.exit_code == 3
    result.assert_one_error("sha256")
    assert not target.exists()
    assert hidden_leftovers(env.work) == []  # the staging directory is gone

    # An existing target is left exactly as it was, even with --force.
    make_tree(target, {"old.txt": "old"})
    before = snapshot(target)
    forced = cli("restore", "www", "--to", target, "--from", "remote", "--force")
    assert forced.exit_code == 3
    assert snapshot(target) == before
    assert sorted(p.name for p in env.work.iterdir()) == ["t"]


# ---------------------------------------------------------------- malicious archives


def _member(tar: tarfile.TarFile, name: str, **kw: Any) -> None:
    info = tarfile.TarInfo(name)
    data = kw.pop("data", None)
    for key, value in kw.items():
        setattr(info, key, value)
    info.mtime = MTIME
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def plant_backup(
    env: Env, source: str, tar_bytes: bytes, *, when: str = "20261121T021500Z", **manifest: Any
) -> str:
    """A handcrafted archive with a correct manifest (sha256 and size) in the local dir."""
    from cloudbackup.core.model import BackupId

    backup_id = BackupId.parse(f"{source}-{when}")
    data = zstandard.ZstdCompressor().compress(tar_bytes)
    directory = env.source_dir(source)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / archive_name(backup_id, "zstd")).write_bytes(data)
    fields: dict[str, Any] = {
        "id": str(backup_id),
        "host": HOST,
        "source": source,
        "kind": "directory",
        "spec": f"/srv/{source}",
        "created_at": f"{backup_id.created_at:%Y-%m-%dT%H:%M:%SZ}",
        "archive": archive_name(backup_id, "zstd"),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "compression": "zstd",
        "compression_level": None,
        "file_count": 1,
        "uncompressed_bytes": 0,
        "machine_id": "test",
        "tool_version": "test",
    }
    fields.update(manifest)
    (directory / manifest_name(backup_id)).write_bytes(Manifest(**fields).to_json())
    return str(backup_id)


def test_malicious_archive_writes_nothing_outside_the_target(
    env: Env, cli: Callable[..., CliResult]
) -> None:
    outside = env.tmp / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "good.txt", data=b"good\n", mode=0o644)
        _member(tar, "../escape.txt", data=b"evil\n")
        _member(tar, "sub/../../escape2.txt", data=b"evil\n")
        _member(tar, str(outside / "abs.txt"), data=b"evil\n")
        _member(tar, "link", type=tarfile.SYMTYPE, linkname=str(outside))
        _member(tar, "link/through.txt", data=b"evil\n")
        _member(tar, "hard", type=tarfile.LNKTYPE, linkname="../../etc/passwd")
        _member(tar, "dev-null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _member(tar, "fifo", type=tarfile.FIFOTYPE)
        _member(tar, "later/ok.txt", data=b"fine\n", mode=0o600)
    backup_id = plant_backup(env, "evil", buf.getvalue(), file_count=10, uncompressed_bytes=35)

    target = env.work / "t"
    result = cli("restore", "evil", "--to", target)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert list(outside.iterdir()) == []
    assert not (env.tmp / "escape.txt").exists() and not (env.work / "escape.txt").exists()
    assert (target / "good.txt").read_text() == "good\n"
    assert (target / "later/ok.txt").read_text() == "fine\n"
    # Symlinks are created last and never followed: "link/through.txt" went into a real
    # directory "link" inside the target, and the symlink then collided with it.
    assert (target / "link").is_dir() and not (target / "link").is_symlink()
    assert (target / "link/through.txt").read_text() == "evil\n"
    assert not (target / "dev-null").exists() and not (target / "hard").exists()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"PARTLY restored {backup_id}") and "refused" in lines[0]
    refused = "\n".join(lines[1:])
    for name in ("../escape.txt", "escape2.txt", "abs.txt", "'link'", "hard", "dev-null", "fifo"):
        assert name in refused, name
    assert sorted(p.name for p in env.work.iterdir()) == ["t"]


# ---------------------------------------------------------------- targets


def test_non_empty_target_needs_force_which_moves_it_aside(
    env: Env, cli: Callable[..., CliResult], clock: Clock
) -> None:
    src = make_tree(env.tmp / "www", {"new.txt": "new"})
    assert cli("backup", src).exit_code == 0
    target = make_tree(env.work / "site", {"old.txt": "old", "keep/me.txt": "me"})
    before = snapshot(target)

    refused = cli("restore", "www", "--to", target)
    assert refused.exit_code == 2
    refused.assert_one_error(str(target), "--force")
    assert snapshot(target) == before
    assert sorted(p.name for p in env.work.iterdir()) == ["site"]

    dry = cli("restore", "www", "--to", target, "--force", "--dry-run")
    assert dry.exit_code == 0 and "moved aside" in dry.stdout
    assert snapshot(target) == before

    forced = cli("restore", "www", "--to", target, "--force", "--json")
    assert forced.exit_code == 0, forced.stderr
    aside = env.work / "site.before-restore-20261121T021500Z"
    assert restore_json(forced)["moved_aside"] == str(aside)
    assert snapshot(aside) == before
    assert (target / "new.txt").read_text() == "new" and not (target / "old.txt").exists()

    # The same second again: the next aside name gets a suffix, nothing is overwritten.
    again = cli("restore", "www", "--to", target, "--force", "--json")
    assert restore_json(again)["moved_aside"] == str(aside) + "-2"

    # An existing *empty* directory needs no --force and is simply replaced.
    empty = env.work / "empty"
    empty.mkdir()
    assert cli("restore", "www", "--to", empty).exit_code == 0
    assert (empty / "new.txt").read_text() == "new"


def test_include_and_dry_run(env: Env, remote: RemoteEnv, cli: Callable[..., CliResult]) -> None:
    src = make_tree(
        env.tmp / "www",
        {"a.txt": "aaaa", "conf/x.yaml": "x: 1\n", "conf/sub/y.yaml": "y: 2\n", "z/z.log": "z"},
    )
    assert cli("backup", src).exit_code == 0
    shutil.rmtree(env.local_dir)
    target = env.work / "t"

    dry = cli("restore", "www", "--to", target, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    data = restore_json(dry)
    assert data["dry_run"] is True and (data["files"], data["bytes"]) == (4, 15)
    dry_include = cli("restore", "www", "--to", target, "--dry-run", "--include", "conf")
    assert dry_include.exit_code == 0, dry_include.stderr
    assert "would restore 2 files, 10 bytes" in dry_include.stdout
    assert not target.exists() and hidden_leftovers(env.work) == []
    assert not env.local_dir.exists()

    result = cli("restore", "www", "--to", target, "--include", "*.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    data = restore_json(result)
    assert (data["files"], data["bytes"]) == (2, 10)
    assert (data["expected_files"], data["expected_bytes"]) == (2, 10)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "conf",
        "conf/sub",
        "conf/sub/y.yaml",
        "conf/x.yaml",
    ]
    none = cli("restore", "www", "--to", env.work / "n", "--include", "nothing-matches")
    assert none.exit_code == 1
    assert "matched no member" in none.stdout and not (env.work / "n").exists()
    assert hidden_leftovers(env.work) == []


def test_dry_run_prints_the_plan_and_verbose_logs_the_stages(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult]
) -> None:
    """--dry-run is the plan (which backup, which copy, the target, what it holds), with no
    byte of the archive read and nothing written; -v logs the stages of the real run."""
    src = make_tree(env.tmp / "www", {"a.txt": "aaaa", "b/c.txt": "cc"})
    assert cli("backup", src).exit_code == 0
    target = env.work / "t"
    make_tree(target, {"old.txt": "old"})
    dry = cli("restore", "www", "--to", target, "--force", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    (line,) = dry.stdout.splitlines()
    assert "would restore 2 files, 6 bytes of www-" in line and "from local into" in line
    assert "the existing t would be moved aside" in line and "nothing written" in line
    assert sorted(p.name for p in env.work.iterdir()) == ["t"]
    assert (target / "old.txt").read_text() == "old"
    data = restore_json(cli("restore", "www", "--to", target, "--force", "--dry-run", "--json"))
    assert data["stages"] == {}  # nothing read, nothing run

    real = cli("-v", "restore", "www", "--to", env.work / "r")
    assert real.exit_code == 0, real.stderr
    (stages,) = [x for x in real.stderr.splitlines() if "restore stages (busy" in x]
    for name in ("read", "hash", "decompress", "extract", "count", "install"):
        assert f"{name} " in stages


def test_command_source_to_stdout_and_file(
    env: Env, cli: Callable[..., CliResult], decompression: str
) -> None:
    payload = "".join(f"INSERT INTO t VALUES ({i});\n" for i in range(2000))
    script = env.tmp / "dump.sh"
    script.write_text(f"#!/bin/sh\ncat {env.tmp / 'dump.sql'}\n")
    (env.tmp / "dump.sql").write_text(payload)
    script.chmod(0o755)
    assert cli("backup", f"shop=cmd:{script}").exit_code == 0

    piped = cli("restore", "shop", "--to", "-")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == payload  # the data alone
    assert "restored shop-" in piped.stderr

    out = env.work / "shop.sql"
    out.write_text("old dump")
    to_file = cli("restore", "shop", "--to", out, "--json")
    assert to_file.exit_code == 0, to_file.stderr
    data = restore_json(to_file)
    assert out.read_text() == payload and data["bytes"] == len(payload)
    assert Path(data["moved_aside"]).read_text() == "old dump"

    missing = cli("restore", "shop")
    assert missing.exit_code == 2
    missing.assert_one_error("--to")
    assert cli("restore", "shop", "--to", "-", "--json").exit_code == 2


# ---------------------------------------------------------------- kill -9


def test_kill_9_mid_restore_leaves_no_partial_tree(env: Env, cli: Callable[..., CliResult]) -> None:
    buf = io.BytesIO()
    count = 12_000
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            _member(tar, f"d{i // 100:03}/f{i:05}.txt", data=b"%d\n" % i, mode=0o644)
    total = sum(len(b"%d\n" % i) for i in range(count))
    plant_backup(env, "many", buf.getvalue(), file_count=count, uncompressed_bytes=total)

    target = env.work / "t"
    child_env = {k: v for k, v in os.environ.items()}
    child_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", "restore", "many", "--to", str(target)],
        cwd=env.work,
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(
        proc,
        lambda: any(any(p.iterdir()) for p in env.work.glob(".t.restore-*")),
        timeout=30,
    )
    assert not target.exists(), "a half-restored tree is under the target's name"

    # The next restore removes the dead one's staging directory and succeeds.
    result = cli("restore", "many", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    assert restore_json(result)["files"] == count
    assert hidden_leftovers(env.work) == []


# ---------------------------------------------------------------- ranged GETs


def test_ranged_download_of_a_multipart_object(
    env: Env, bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3Store.open with CLOUDBACKUP_S3_DOWNLOAD=ranged: ranges of any size, in parallel,
    served in order; the download checks the bytes as for one GET."""
    from cloudbackup.core.errors import IntegrityError
    from cloudbackup.storage.base import UploadSpec
    from cloudbackup.storage.retry import RetryPolicy
    from cloudbackup.storage.s3 import S3Store, make_client
    from tests.test_restore_unit import fetch_archive

    client = make_client(endpoint_url=moto_endpoint, compat=False)
    policy = RetryPolicy(sleep=lambda s: None)
    store = S3Store(client, bucket, policy=policy, part_size=5 << 20, download="ranged")
    data = os.urandom(5 << 20) * 2 + os.urandom(1_234_567)  # 3 parts of 5 MiB, last short
    src = env.tmp / "obj"
    src.write_bytes(data)
    with src.open("rb") as file:
        outcome = store.upload_file("k/obj", file, UploadSpec())
    assert outcome.part_count == 3
    digest = hashlib.sha256(data).hexdigest()
    seen: list[int] = []
    monkeypatch.setattr("cloudbackup.storage.s3.RANGED_MIN_SIZE", 0)
    for workers, part_size in ((3, 1 << 20), (2, 3 << 20), (4, 7 << 20), (1, 1 << 20)):
        monkeypatch.setattr("cloudbackup.storage.s3.RANGED_PART_SIZE", part_size)
        store.concurrency = workers
        dest = env.tmp / f"dl-{workers}-{part_size}"
        fetch_archive(store, "k/obj", dest, size=len(data), sha256=digest, progress=seen.append)
        assert dest.read_bytes() == data
    assert sum(seen) == 4 * len(data)

    bad = env.tmp / "bad"
    store.concurrency = 3
    with pytest.raises(IntegrityError):
        fetch_archive(store, "k/obj", bad, size=len(data), sha256="0" * 64)
    assert not bad.exists()


def test_cli_ranged_download_setting(
    env: Env, bucket: str, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLOUDBACKUP_S3_DOWNLOAD=ranged: parallel ranged GETs (thresholds shrunk for the test)."""
    from cloudbackup.storage import s3 as s3store

    src = make_tree(env.tmp / "www", {"big.bin": os.urandom(3 << 20), "small.txt": "s"})
    assert cli("backup", src).exit_code == 0
    shutil.rmtree(env.local_dir)
    monkeypatch.setattr(s3store, "RANGED_MIN_SIZE", 0)
    monkeypatch.setattr(s3store, "RANGED_PART_SIZE", 256 << 10)
    ranges: list[str] = []
    real = s3store.S3Store._get_range

    def spy(self: Any, key: str, start: int, end: int) -> bytes:
        ranges.append(key)
        return real(self, key, start, end)

    monkeypatch.setattr(s3store.S3Store, "_get_range", spy)
    monkeypatch.setenv("CLOUDBACKUP_S3_DOWNLOAD", "ranged")
    result = cli("restore", "www", "--to", env.work / "t")
    assert result.exit_code == 0, result.stderr
    (archive,) = {key for key in ranges}
    assert archive.endswith(".tar.zst") and len(ranges) >= 12  # ≥ 3 MiB in 256 KiB ranges
    assert snapshot(env.work / "t") == snapshot(src)


# ---------------------------------------------------------------- databases


def test_sqlite_restore_keeps_the_old_file_aside(
    env: Env, remote: RemoteEnv, cli: Callable[..., CliResult], clock: Clock
) -> None:
    import sqlite3

    db = env.tmp / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, s TEXT)")
        conn.executemany("INSERT INTO t (s) VALUES (?)", [(f"row {i}",) for i in range(500)])
    conn.close()
    assert cli("backup", f"sqlite://{db}").exit_code == 0
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM t WHERE i > 10")
    conn.close()

    missing = cli("restore", "app")
    assert missing.exit_code == 2
    missing.assert_one_error("--to FILE")

    shutil.rmtree(env.local_dir)  # from the bucket, as on a fresh machine
    result = cli("restore", "app", "--to", db, "--json")
    assert result.exit_code == 0, result.stderr
    data = restore_json(result)
    assert data["where_from"] == "remote" and data["kind"] == "sqlite" and data["files"] == 1
    assert data["moved_aside"] == str(env.tmp / "app.db.before-restore-20261121T021500Z")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (500,)
    conn.close()
    with sqlite3.connect(data["moved_aside"]) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (10,)
    conn.close()
    assert hidden_leftovers(env.tmp) == []


def test_postgres_restore_into_a_new_database_then_force(
    env: Env, cli: Callable[..., CliResult], pg_server: Any
) -> None:
    suffix = os.urandom(4).hex()
    source_db, target_db = f"rsrc_{suffix}", f"rdst_{suffix}"
    pg_server.psql(f"CREATE DATABASE {source_db}")
    pg_server.psql(
        "CREATE TABLE items (id serial PRIMARY KEY, name text);"
        "INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 1000) g;",
        db=source_db,
    )
    backed = cli("backup", f"shopdb={pg_server.url(source_db)}")
    assert backed.exit_code == 0, backed.stderr

    target = pg_server.url(target_db)
    result = cli("restore", "shopdb", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    data = restore_json(result)
    assert data["kind"] == "postgresql" and data["ok"] is True and data["files"] == 2
    assert SUPERUSER_PASSWORD not in result.stdout + result.stderr  # redacted: "***"
    assert "***" in data["target"]
    assert pg_server.psql("SELECT count(*) FROM items", db=target_db) == "1000"

    pg_server.psql("DELETE FROM items WHERE id > 5", db=target_db)
    refused = cli("restore", "shopdb", "--to", target)
    assert refused.exit_code == 2  # like a non-empty directory
    refused.assert_one_error("not empty", "--force")
    assert pg_server.psql("SELECT count(*) FROM items", db=target_db) == "5"
    forced = cli("restore", "shopdb", "--to", target, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert pg_server.psql("SELECT count(*) FROM items", db=target_db) == "1000"
    assert SUPERUSER_PASSWORD not in forced.stdout + forced.stderr
    leftovers = [p.name for p in env.local_dir.rglob("*") if ".restore-" in p.name]
    assert leftovers == [], "the restore's work files stay behind"
