"""Prune against moto (ThreadedMotoServer behind a recording proxy): real uploads, then the
plan executed over S3 — zero GETs, manifest before archive, Object Lock pins, orphans,
AccessDenied; other machines' claims, --all-hosts, --host and remote policies over both
destinations (S3 and a directory)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Clock, Env, RemoteEnv, S3Env, make_tree
from tests.s3_helpers import Fault, FaultProxy

pytestmark = pytest.mark.slow

BODY = b"not a real archive: prune never reads it"


@pytest.fixture
def proxy(s3_env: S3Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Every request of the CLI goes through a recording proxy in front of moto."""
    with FaultProxy(s3_env.endpoint) as recorder:
        monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", recorder.endpoint)
        yield recorder


def put_backup(
    remote: S3Env | RemoteEnv, host: str, source: str, stamp: str, *, manifest: bool = True
) -> str:
    """A backup as LIST sees it (prune reads nothing else)."""
    where = remote if isinstance(remote, RemoteEnv) else RemoteEnv("s3", s3=remote)
    ident = f"{source}-{stamp}"
    where.put(where.key(host, source, f"{ident}.tar.zst"), BODY)
    if manifest:
        where.put(where.key(host, source, f"{ident}.manifest.json"), b"{}")
    return ident


def remote_ids(remote: S3Env | RemoteEnv, host: str = "testhost", source: str = "www") -> list[str]:
    suffix = ".manifest.json"
    return sorted(
        k.rsplit("/", 1)[-1].removesuffix(suffix)
        for k in remote.keys(f"{remote.prefix}/{host}/{source}/")
        if k.endswith(suffix)
    )


def prune(cli: Any, *args: str, code: int = 0) -> dict[str, Any]:
    result = cli("prune", "--json", *args)
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_uploaded_backups_pruned_remotely_with_zero_gets(
    env: Env, cli: Any, clock: Clock, s3_env: S3Env, proxy: FaultProxy
) -> None:
    www = make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hello</h1>\n"})
    clock.advance(days=-3)
    for day in range(4):
        if day:
            clock.advance(days=1)
        # Independent fulls: prune of chains is tests/integration/test_chain_remote.py's.
        result = cli("backup", "--full", str(www))
        assert result.exit_code == 0, result.stderr
    uploaded = remote_ids(s3_env)
    assert len(uploaded) == 4
    proxy.clear()

    dry = prune(cli, "--where", "remote", "--policy", "last=2", "--dry-run")
    assert proxy.count("DeleteObject") == 0
    assert remote_ids(s3_env) == uploaded
    real = prune(cli, "--where", "remote", "--policy", "last=2")
    (dry_result,) = dry["results"]
    (real_result,) = real["results"]
    assert dry["dry_run"] is True and real["dry_run"] is False
    assert dry_result["deleted"] == []
    assert {**real_result, "deleted": []} == dry_result
    assert sorted(real_result["deleted"]) == sorted(dry_result["delete"]) == uploaded[:2]
    assert remote_ids(s3_env) == uploaded[2:]  # last=2 leaves 2
    # LIST results only: no GetObject at all (one HEAD reads the host claim's metadata).
    assert proxy.count("GetObject") == 0
    assert proxy.count("ListObjectsV2") == 2
    # Manifest first, then archive and index, newest backup first.
    deletes = [r.key.rsplit("/", 1)[-1] for r in proxy.requests("DeleteObject")]
    assert deletes == [
        f"{uploaded[1]}.manifest.json",
        f"{uploaded[1]}.tar.zst",
        f"{uploaded[1]}.index.zst",
        f"{uploaded[0]}.manifest.json",
        f"{uploaded[0]}.tar.zst",
        f"{uploaded[0]}.index.zst",
    ]
    # The local copies follow the local policy, untouched by a remote prune.
    assert len(env.manifests("www")) == 4
    # --where all: local with last=2 too; remote has nothing more to delete.
    both = prune(cli, "--where", "all", "--policy", "last=2")
    assert [(r["where"], len(r["deleted"])) for r in both["results"]] == [
        ("local", 2),
        ("remote", 0),
    ]
    assert proxy.count("GetObject") == 0


def test_remote_policy_from_the_environment(
    env: Env,
    cli: Any,
    clock: Clock,
    remote: RemoteEnv,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for day in range(14, 21):
        put_backup(remote, "testhost", "www", f"202611{day}T021500Z")
    assert cli("prune", "--where", "remote").exit_code == 2  # no remote policy: usage error
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION", "daily=3")
    (result,) = prune(cli, "--where", "remote")["results"]
    assert result["policy"] == "daily=3"
    assert [k["reasons"] for k in result["keep"]] == [
        ["daily 2026-11-20"],
        ["daily 2026-11-19"],
        ["daily 2026-11-18"],
    ]
    assert len(remote_ids(remote)) == 3


def test_object_lock_pins_remote_backups(
    env: Env,
    cli: Any,
    clock: Clock,
    s3_env: S3Env,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:5d")
    for day in range(10, 21, 2):
        put_backup(s3_env, "testhost", "www", f"202611{day}T021500Z")
    (result,) = prune(cli, "--where", "remote", "--policy", "last=1")["results"]
    reasons = {k["id"]: k["reasons"] for k in result["keep"]}
    # now = 2026-11-21T02:15Z: created after 2026-11-16T02:15Z is still locked.
    assert reasons == {
        "www-20261120T021500Z": ["object lock until 2026-11-25T02:15:00Z", "last 1/1"],
        "www-20261118T021500Z": ["object lock until 2026-11-23T02:15:00Z"],
    }
    assert [p["id"] for p in result["pinned"]] == list(reasons)
    assert sorted(result["deleted"]) == [
        "www-20261110T021500Z",
        "www-20261112T021500Z",
        "www-20261114T021500Z",
        "www-20261116T021500Z",  # its lock ended exactly now
    ]
    assert remote_ids(s3_env) == sorted(reasons)
    assert proxy.count("GetObject") == 0 and proxy.count("GetObjectRetention") == 0
    human = cli("prune", "--where", "remote", "--policy", "last=1", "--dry-run")
    assert "pinned        www-20261118T021500Z  (object lock until 2026-11-23T02:15:00Z)" in (
        human.stdout
    )


def test_orphans_older_than_7_days_swept_younger_kept(
    env: Env, cli: Any, clock: Clock, s3_env: S3Env, proxy: FaultProxy
) -> None:
    # moto stamps LastModified with the real time: move the planner's clock around it.
    orphan = put_backup(s3_env, "testhost", "www", "20261101T000000Z", manifest=False)
    kept = put_backup(s3_env, "testhost", "www", "20261102T000000Z")
    claim = f"{s3_env.prefix}/testhost/.host-id"
    s3_env.client.put_object(Bucket=s3_env.bucket, Key=claim, Body=b"machine\n")
    orphan_key = s3_env.key("testhost", "www", f"{orphan}.tar.zst")
    real_now = datetime.now(UTC)

    clock.now = real_now + timedelta(days=6)
    (young,) = prune(cli, "--where", "remote", "--policy", "last=1")["results"]
    assert young["orphans"] == [] and [o["id"] for o in young["orphans_kept"]] == [orphan]
    assert orphan_key in s3_env.keys()

    clock.now = real_now + timedelta(days=8)
    (dry,) = prune(cli, "--where", "remote", "--policy", "last=1", "--dry-run")["results"]
    assert dry["orphans"] == [orphan] and dry["orphans_deleted"] == []
    assert orphan_key in s3_env.keys()
    (old,) = prune(cli, "--where", "remote", "--policy", "last=1")["results"]
    assert old["orphans"] == old["orphans_deleted"] == [orphan]
    assert orphan_key not in s3_env.keys()
    assert claim in s3_env.keys()  # not a backup: ignored
    assert remote_ids(s3_env) == [kept] and old["deleted"] == []
    assert proxy.count("GetObject") == 0


def test_access_denied_on_delete_fails_the_source_and_names_the_permission(
    env: Env, cli: Any, clock: Clock, s3_env: S3Env, proxy: FaultProxy
) -> None:
    for day in range(15, 21):
        put_backup(s3_env, "testhost", "www", f"202611{day}T021500Z")
        put_backup(s3_env, "testhost", "api", f"202611{day}T021500Z")
    before = sorted(s3_env.keys())
    proxy.inject(Fault("deny", operation="DeleteObject", times=None))
    result = cli("prune", "--json", "--where", "remote", "--policy", "last=2")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    for group in json.loads(result.stdout)["results"]:
        assert group["deleted"] == [] and len(group["delete"]) == 4
        (error,) = group["errors"]
        assert "s3:DeleteObject" in error and "iam render --role pruner" in error
    # One refused DeleteObject per source (not retried, nothing more tried), nothing deleted.
    assert proxy.count("DeleteObject") == 2
    assert sorted(s3_env.keys()) == before
    assert "s3:DeleteObject" in result.stderr
    human = cli("prune", "--where", "remote", "--policy", "last=2")
    assert human.exit_code == 1
    assert "failed: remote testhost/api, remote testhost/www" in human.stdout


def test_all_hosts_and_other_machines_claims(
    env: Env, cli: Any, clock: Clock, remote: RemoteEnv
) -> None:
    for host in ("testhost", "db1", "web2"):
        for day in range(17, 21):
            put_backup(remote, host, "www", f"202611{day}T021500Z")
    # Another machine claimed "testhost" (two machines with one hostname): S3 keeps its id
    # in the claim's metadata (one HEAD), a directory in its body.
    claim = f"{remote.prefix}/testhost/.host-id"
    if remote.s3 is not None:
        remote.s3.client.put_object(
            Bucket=remote.s3.bucket,
            Key=claim,
            Body=b"other\n",
            Metadata={"machine-id": "another-machine-id"},
        )
    else:
        remote.put(claim, b"another-machine-id\n")
    refused = prune(cli, "--where", "remote", "--policy", "last=1", code=1)["results"]
    assert [(r["host"], r["deleted"]) for r in refused] == [("testhost", [])]
    assert "claimed by another machine" in refused[0]["errors"][0]
    assert "another-ma" in refused[0]["errors"][0]
    assert len(remote_ids(remote)) == 4

    results = prune(cli, "--where", "remote", "--policy", "last=1", "--all-hosts")["results"]
    assert [(r["host"], len(r["deleted"])) for r in results] == [
        ("db1", 3),
        ("testhost", 3),
        ("web2", 3),
    ]
    for host in ("testhost", "db1", "web2"):
        assert remote_ids(remote, host) == ["www-20261120T021500Z"]


def test_explicit_host_prunes_that_host_only(
    env: Env, cli: Any, clock: Clock, remote: RemoteEnv
) -> None:
    for host in ("testhost", "db1"):
        for day in range(18, 21):
            put_backup(remote, host, "www", f"202611{day}T021500Z")
    results = prune(cli, "--where", "remote", "--policy", "last=1", "--host", "db1")["results"]
    assert [(r["host"], len(r["deleted"])) for r in results] == [("db1", 2)]
    assert len(remote_ids(remote, "testhost")) == 3


def test_local_copy_not_yet_offsite_is_pinned(
    env: Env, cli: Any, clock: Clock, remote: RemoteEnv
) -> None:
    www = make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hello</h1>\n"})
    clock.advance(days=-2)
    # Fulls: an incremental's upload would send its parent first.
    assert cli("backup", "--no-upload", "--full", str(www)).exit_code == 0  # never reached S3
    for _ in range(2):
        clock.advance(days=1)
        result = cli("backup", "--full", str(www))
        assert result.exit_code == 0, result.stderr
    local = sorted(p.name.removesuffix(".manifest.json") for p in env.manifests("www"))
    assert remote_ids(remote) == local[1:]
    (result,) = prune(cli, "--policy", "last=1")["results"]
    assert {k["id"]: k["reasons"] for k in result["keep"]} == {
        local[2]: ["last 1/1"],
        local[0]: ["not yet offsite"],
    }
    assert result["deleted"] == [local[1]]
    assert sorted(p.name.removesuffix(".manifest.json") for p in env.manifests("www")) == [
        local[0],
        local[2],
    ]
    assert not list(env.source_dir("www").glob(f"{local[1]}*"))  # upload record too
