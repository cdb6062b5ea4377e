"""`cloudbackup run` end to end over both destinations (moto, a directory): retention across
nights, partial failures, pings (green, failed, server down or hanging), the bucket
requirement, the lock, kill -9 and recovery; plus `status` against the offsite copy (offsite
state, other hosts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.lock import DirLock
from tests.conftest import Clock, Env, RemoteEnv, S3Env, kill_when, make_tree
from tests.s3_helpers import Fault, fault_proxy
from tests.test_monitor import PingServer, closed_port_url, hanging_server

pytestmark = pytest.mark.slow

RESULT_KEYS = {"source", "id", "ok", "size", "seconds", "uploaded", "warnings", "error"}


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    with PingServer() as server:
        yield server


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(
        env.tmp / "srv" / "www",
        {"index.html": "<h1>hello</h1>\n", "css/site.css": "body{}\n", "img/logo.svg": "<svg/>"},
    )


@pytest.fixture
def etc(env: Env) -> Path:
    return make_tree(env.tmp / "srv" / "etc", {"app.conf": "a=1\n", "db.conf": "b=2\n"})


def set_sources(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", "\n".join(str(p) for p in paths))


def listed(cli: Any, *args: str) -> list[dict[str, Any]]:
    result = cli("list", "--json", *args)
    assert result.exit_code == 0, result.stderr
    backups: list[dict[str, Any]] = json.loads(result.stdout)["backups"]
    return backups


def ids(backups: list[dict[str, Any]], source: str | None = None) -> list[str]:
    return [b["id"] for b in backups if source is None or b["source"] == source]


# ---------------------------------------------------------------- retention across nights


def test_four_nights_keep_two_local_and_three_remote(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "last=2")
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION", "last=3")
    # Independent fulls (chains across nights: tests/integration/test_chain_remote.py).
    monkeypatch.setenv("CLOUDBACKUP_FULL_EVERY", "0")
    made = []
    for night in range(4):
        if night:
            clock.advance(days=1)
        (www / f"night{night}.txt").write_text(f"night {night}\n")
        result = cli("run", "--json")
        assert result.exit_code == 0, result.stderr
        (row,) = json.loads(result.stdout)["results"]
        assert RESULT_KEYS <= set(row)
        assert row["ok"] and row["uploaded"] and row["error"] is None
        made.append(row["id"])
    assert made == [f"www-202611{day}T021500Z" for day in (21, 22, 23, 24)]

    assert ids(listed(cli, "--where", "local")) == made[-2:]
    assert ids(listed(cli, "--where", "remote")) == made[-3:]
    everything = listed(cli, "--where", "all")
    assert [(b["id"], b["local"], b["remote"]) for b in everything] == [
        (made[1], False, True),
        (made[2], True, True),
        (made[3], True, True),
    ]
    assert all(b["verified"] for b in everything if b["local"])
    # Nothing else left behind: two local archives + manifests + upload records, three remote.
    assert len(env.archives("www")) == 2 and len(env.manifests("www")) == 2
    offsite = remote.keys(f"{remote.prefix}/testhost/www/")
    assert len(offsite) == 9 and not any(made[0] in key for key in offsite)


def test_run_without_remote_retention_does_not_prune_s3(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "last=1")
    monkeypatch.setenv("CLOUDBACKUP_FULL_EVERY", "0")  # independent backups
    for _ in range(3):
        assert cli("run").exit_code == 0
        clock.advance(days=1)
    assert len(listed(cli, "--where", "local")) == 1
    assert len(listed(cli, "--where", "remote")) == 3


# ---------------------------------------------------------------- partial failure and pings


def test_broken_source_fails_the_run_but_not_the_others(
    env: Env,
    remote: RemoteEnv,
    cli: Any,
    clock: Clock,
    www: Path,
    etc: Path,
    ping_server: PingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", ping_server.url)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "last=1")
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION", "last=1")
    monkeypatch.setenv("CLOUDBACKUP_FULL_EVERY", "0")  # independent backups
    set_sources(monkeypatch, www, etc)
    green = cli("run")
    assert green.exit_code == 0, green.stderr
    assert "run succeeded" in green.stdout
    assert ping_server.calls == [("GET", "/start"), ("GET", "/")]
    first = ids(listed(cli))

    missing = env.tmp / "srv" / "gone"
    set_sources(monkeypatch, www, missing, etc)
    clock.advance(days=1)
    result = cli("run")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "gone" in result.stdout and "FAILED" in result.stdout
    assert "exit 1" in result.stdout

    # The healthy sources were backed up, uploaded, and both sides pruned to one copy.
    after = listed(cli)
    assert ids(after) == ["etc-20261122T021500Z", "www-20261122T021500Z"]
    assert all(b["local"] and b["remote"] and b["verified"] for b in after)
    assert not set(first) & set(ids(after))
    assert env.files("gone") == []

    assert ping_server.calls[2:] == [("GET", "/start"), ("POST", "/fail")]
    body = ping_server.pings[-1].body
    assert "gone" in body and "www-20261122T021500Z" in body and "exit 1" in body


def test_run_json_reports_each_source(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www, env.tmp / "nope")
    result = cli("run", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # stdout holds the JSON document alone
    rows = {r["source"]: r for r in doc["results"]}
    assert set(rows) == {"www", "nope"}
    assert all(RESULT_KEYS <= set(r) for r in rows.values())
    assert rows["www"]["ok"] and rows["www"]["uploaded"]
    assert not rows["nope"]["ok"] and "nope" in rows["nope"]["error"]
    assert doc["exit_code"] == 1


@pytest.mark.parametrize("where", ["down", "hanging"])
def test_unreachable_ping_server_does_not_fail_the_run(
    env: Env,
    s3_env: S3Env,
    cli: Any,
    clock: Clock,
    www: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    request: pytest.FixtureRequest,
) -> None:
    url = closed_port_url() if where == "down" else request.getfixturevalue("hanging_url")
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", url)
    set_sources(monkeypatch, www)
    started = time.monotonic()
    result = cli("run")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.stderr
    assert elapsed < 30, elapsed
    assert "ping" in result.stderr and "not affected" in result.stderr
    assert "Traceback" not in result.stderr
    assert ids(listed(cli, "--where", "remote")) == ["www-20261121T021500Z"]


@pytest.fixture
def hanging_url() -> Iterator[str]:
    with hanging_server() as url:
        yield url


# ---------------------------------------------------------------- the bucket requirement


def test_run_without_a_bucket_refuses_and_pings_fail(
    env: Env,
    cli: Any,
    clock: Clock,
    www: Path,
    ping_server: PingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", ping_server.url)
    result = cli("run")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_S3_BUCKET", "CLOUDBACKUP_LOCAL_ONLY")
    assert env.archives("www") == []
    assert ping_server.calls == [("POST", "/fail")]
    assert "CLOUDBACKUP_S3_BUCKET" in ping_server.pings[0].body

    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    result = cli("run")
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in env.archives("www")] == ["www-20261121T021500Z.tar.zst"]
    assert "local-only" in result.stdout
    assert ping_server.calls[1:] == [("GET", "/start"), ("GET", "/")]


def test_invalid_configuration_still_pings_fail(
    env: Env, cli: Any, www: Path, ping_server: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_COMPRESSION", "rar")
    env_file = env.tmp / "cloudbackup.env"
    env_file.write_text(f"CLOUDBACKUP_PING_URL={ping_server.url}\n")
    env_file.chmod(0o600)
    result = cli("--env-file", env_file, "run")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_COMPRESSION", "rar")
    assert ping_server.calls == [("POST", "/fail")]
    assert "CLOUDBACKUP_COMPRESSION" in ping_server.pings[0].body


def test_second_concurrent_run_exits_4_at_once(
    env: Env,
    s3_env: S3Env,
    cli: Any,
    clock: Clock,
    www: Path,
    ping_server: PingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", ping_server.url)
    started = time.monotonic()
    with DirLock(env.local_dir):
        result = cli("run")
    assert time.monotonic() - started < 10
    assert result.exit_code == 4
    result.assert_one_error("lock")
    assert env.archives("www") == [] and s3_env.keys() == []
    assert ping_server.calls == [("POST", "/fail")]
    assert cli("run").exit_code == 0  # released: the next one runs


# ---------------------------------------------------------------- kill -9 and recovery


def start_run(env: Env, **extra: str) -> subprocess.Popen[bytes]:
    """``python -m cloudbackup run`` in a subprocess with the test's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", "run"],
        cwd=env.work,
        env={**os.environ, **extra},  # the env / s3_env fixtures' settings
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def assert_each_backup_once_and_complete(
    env: Env, remote: RemoteEnv, backups: list[dict[str, Any]]
) -> None:
    listed_ids = ids(backups)
    assert len(listed_ids) == len(set(listed_ids)), f"a backup is listed twice: {listed_ids}"
    assert all(b["local"] and b["remote"] and b["verified"] for b in backups), backups
    assert list(env.local_dir.rglob("*.partial")) == []
    assert remote.uploads() == []
    # Every remote archive has its manifest: nothing half-uploaded is left behind.
    keys = remote.keys()
    assert len([k for k in keys if ".tar" in k]) == len(listed_ids)
    assert len([k for k in keys if k.endswith(".manifest.json")]) == len(listed_ids)


def test_kill_9_during_run_then_run_again(
    env: Env, remote: RemoteEnv, cli: Any, www: Path, etc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = make_tree(env.tmp / "srv" / "big", {"small.txt": "small\n"})
    set_sources(monkeypatch, www, big, etc)
    assert cli("run").exit_code == 0
    before = listed(cli, "--where", "all")
    assert len(before) == 3 and all(b["local"] and b["remote"] for b in before)

    # ~40 MB of random data through xz runs at a few MB/s: slow enough to be killed.
    (big / "random.bin").write_bytes(os.urandom(40 * 1024 * 1024))
    proc = start_run(env, CLOUDBACKUP_COMPRESSION="xz")
    kill_when(proc, lambda: any(env.source_dir("big").glob("*.partial")))

    # The earlier complete backups are still there; the killed archive is not listed.
    killed = listed(cli, "--where", "all")
    assert set(ids(before)) <= set(ids(killed))
    assert ids(killed, "big") == ids(before, "big")
    assert list(env.source_dir("big").glob("*.partial"))

    again = cli("run", "--json")  # zstd: fast
    assert again.exit_code == 0, again.stderr
    results = json.loads(again.stdout)["results"]
    assert [r["source"] for r in results] == ["www", "big", "etc"]
    assert all(r["ok"] and r["uploaded"] for r in results)

    after = listed(cli, "--where", "all")
    assert set(ids(before)) <= set(ids(after)), "an earlier backup was lost"
    assert {r["id"] for r in results} <= set(ids(after))
    assert_each_backup_once_and_complete(env, remote, after)
    newest_big = next(r for r in results if r["source"] == "big")
    assert newest_big["size"] > 40 * 1024 * 1024


def test_kill_9_during_upload_then_run_resumes_it(
    env: Env, s3_env: S3Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = make_tree(env.tmp / "srv" / "big", {"random.bin": os.urandom(12 * 1024 * 1024)})
    set_sources(monkeypatch, www, big)
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")  # three parts
    with fault_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", proxy.endpoint)
        # Part 1 lands; the others hang in flight until the process is killed.
        proxy.inject(
            Fault(
                "hold",
                operation="UploadPart",
                when=lambda r: r.query.get("partNumber") != ["1"],
                times=None,
            )
        )

        def part_one_landed() -> bool:
            # ... and the archive published locally (the streamed upload follows the
            # archive as it is written: under load, part 1 can land before it is complete).
            return bool(env.manifests("big")) and any(
                r.query.get("partNumber") == ["1"] and r.status == 200
                for r in proxy.requests("UploadPart")
            )

        try:
            kill_when(start_run(env), part_one_landed)
        finally:
            proxy.release()
        (interrupted,) = ids(listed(cli, "--where", "local"), "big")
        assert s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
        proxy.clear()

        again = cli("run", "--json")
        assert again.exit_code == 0, again.stderr
        report = json.loads(again.stdout)
        (resumed,) = [u for u in report["uploads"] if u["id"] == interrupted]
        assert resumed["ok"] and (resumed["parts_reused"], resumed["parts_sent"]) == (1, 2)
        resent = [
            r.query["partNumber"][0]
            for r in proxy.requests("UploadPart", forwarded=True)
            if r.key.endswith(f"/{interrupted}.tar.zst")
        ]
        assert sorted(resent) == ["2", "3"]  # part 1 was reused, not sent again
        after = listed(cli, "--where", "all")

    assert interrupted in ids(after) and len(ids(after, "big")) == 2
    assert_each_backup_once_and_complete(env, RemoteEnv("s3", s3=s3_env), after)


def test_kill_9_during_upload_to_a_directory_then_run_resumes_it(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory destination resumes too: the parts written before the kill (files in
    the upload's hidden directory) are reused when they hash to the local bytes."""
    dest = RemoteEnv("dir", root=env.tmp / "dest")
    assert dest.root is not None
    dest.root.mkdir()
    monkeypatch.setenv("CLOUDBACKUP_DEST", dest.root.as_uri())
    big = make_tree(env.tmp / "srv" / "big", {"random.bin": os.urandom(12 * 1024 * 1024)})
    set_sources(monkeypatch, www, big)
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")  # three parts
    # Part 1 lands; the others hang until the process is killed.
    script = (
        "import time, cloudbackup.storage.directory as d\n"
        "real = d.DirectoryStore._put_part\n"
        "def put(self, key, upload_id, number, *a, **k):\n"
        "    if number != 1:\n"
        "        time.sleep(60)\n"
        "    return real(self, key, upload_id, number, *a, **k)\n"
        "d.DirectoryStore._put_part = put\n"
        "from cloudbackup.cli import main\n"
        "main(['run'])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=env.work,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(
        proc,
        lambda: bool(env.manifests("big")) and any(dest.root.rglob(".~upload-*/part-00001")),
    )
    (interrupted,) = ids(listed(cli, "--where", "local"), "big")
    assert dest.uploads() == [f"cloudbackup/testhost/big/{interrupted}.tar.zst"]

    again = cli("run", "--json")
    assert again.exit_code == 0, again.stderr
    report = json.loads(again.stdout)
    (resumed,) = [u for u in report["uploads"] if u["id"] == interrupted]
    assert resumed["ok"] and (resumed["parts_reused"], resumed["parts_sent"]) == (1, 2)
    after = listed(cli, "--where", "all")
    assert interrupted in ids(after) and len(ids(after, "big")) == 2
    assert_each_backup_once_and_complete(env, dest, after)


# ---------------------------------------------------------------- status against a bucket


def status_json(cli: Any, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("status", "--json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, json.loads(result.stdout)


def test_status_warns_until_the_newest_backup_is_offsite(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    assert cli("backup", "--no-upload").exit_code == 0
    code, doc = status_json(cli)
    assert code == 1 and doc["state"] == "WARNING"
    ((row,),) = [h["sources"] for h in doc["hosts"]]
    assert (row["local_count"], row["remote_count"]) == (1, 0)
    assert "not offsite" in cli("status").stdout

    assert cli("upload").exit_code == 0
    code, doc = status_json(cli)
    assert code == 0, doc
    ((row,),) = [h["sources"] for h in doc["hosts"]]
    assert (row["local_count"], row["remote_count"], row["state"]) == (1, 1, "OK")
    assert row["bytes"] > 0


def test_status_warns_when_many_local_copies_are_not_offsite(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    assert cli("run").exit_code == 0
    for _ in range(4):
        clock.advance(hours=1)
        assert cli("backup", "--no-upload").exit_code == 0
    code, doc = status_json(cli)
    assert code == 1
    assert "4 local copies are not offsite" in cli("status").stdout


def test_status_all_hosts_flags_stale_hosts_from_the_bucket(
    env: Env, remote: RemoteEnv, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    # Another machine sharing the bucket (its own local dir) stopped backing up 3 days ago.
    monkeypatch.setenv("CLOUDBACKUP_HOST", "oldbox")
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(env.tmp / "oldbox-local"))
    assert cli("run").exit_code == 0
    monkeypatch.setenv("CLOUDBACKUP_HOST", env.host)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(env.local_dir))
    clock.advance(days=3)
    assert cli("run").exit_code == 0

    code, doc = status_json(cli)
    assert code == 0 and [h["host"] for h in doc["hosts"]] == ["testhost"]

    code, doc = status_json(cli, "--all-hosts")
    assert code == 2 and doc["state"] == "CRITICAL"
    hosts = {h["host"]: {s["source"]: s for s in h["sources"]} for h in doc["hosts"]}
    assert set(hosts) == {"testhost", "oldbox"}
    assert hosts["testhost"]["www"]["state"] == "OK"
    old = hosts["oldbox"]["www"]
    assert old["state"] == "CRITICAL" and old["newest"] == "www-20261121T021500Z"
    assert (old["local_count"], old["remote_count"]) == (0, 1)
    assert old["age_seconds"] == 3 * 86400
    text = cli("status", "--all-hosts").stdout
    assert "oldbox" in text and "older than 26h" in text


# ---------------------------------------------------------------- failures around the run


def test_run_with_a_missing_bucket_keeps_local_archives(
    env: Env,
    remote: RemoteEnv,
    cli: Any,
    clock: Clock,
    www: Path,
    ping_server: PingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_sources(monkeypatch, www)
    if remote.s3 is not None:
        monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", remote.s3.bucket + "-nope")
    else:  # a disk that is not mounted: the destination is never created
        assert remote.root is not None
        monkeypatch.setenv("CLOUDBACKUP_DEST", (remote.root / "not-mounted").as_uri())
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", ping_server.url)
    started = time.monotonic()
    result = cli("run")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert "NoSuchBucket" in result.stdout or "does not exist" in result.stdout
    assert [p.name for p in env.archives("www")] == ["www-20261121T021500Z.tar.zst"]
    assert ping_server.calls == [("GET", "/start"), ("POST", "/fail")]
    assert cli("status").exit_code == 3  # the bucket cannot be listed


def test_unexpected_error_during_run_still_pings_fail(
    env: Env,
    cli: Any,
    clock: Clock,
    www: Path,
    ping_server: PingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_sources(monkeypatch, www)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", ping_server.url)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cloudbackup.ops.run.run", broken)
    result = cli("run")
    assert result.exit_code == 1
    assert "No space left" in result.stderr and "Traceback" not in result.stderr
    assert ping_server.calls == [("GET", "/start"), ("POST", "/fail")]
    assert "No space left" in ping_server.pings[-1].body


def test_status_lists_only_this_hosts_prefix_and_downloads_nothing(
    env: Env, s3_env: S3Env, cli: Any, clock: Clock, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sources(monkeypatch, www)
    assert cli("run").exit_code == 0
    with fault_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", proxy.endpoint)
        # A host-scoped writer role may list <prefix>/<host>/ only (its s3:prefix condition,
        # which moto does not enforce): deny anything wider, as AWS would.
        proxy.inject(
            Fault(
                "deny",
                operation="ListObjectsV2",
                when=lambda r: (
                    not r.query.get("prefix", [""])[0].startswith("cloudbackup/testhost/")
                ),
                times=None,
            )
        )
        code, doc = status_json(cli)
        assert code == 0, doc
        ((row,),) = [h["sources"] for h in doc["hosts"]]
        assert (row["local_count"], row["remote_count"]) == (1, 1)
        assert proxy.count("ListObjectsV2") >= 1
        assert proxy.count("GetObject") == 0
