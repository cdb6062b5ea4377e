"""Prune: the planner applied to real local backups through the CLI, and the executor over an
in-memory remote store (delete order, AccessDenied, Object Lock, orphans, hosts, dry run)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.cli import output
from cloudbackup.config import ObjectLock, Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import PermanentStorageError, UsageError
from cloudbackup.core.model import UploadRecord
from cloudbackup.core.retention import parse_policy
from cloudbackup.lock import DirLock
from cloudbackup.ops import forget as forgetting
from cloudbackup.ops import prune as pruning
from cloudbackup.storage.base import ObjectHead, ObjectInfo
from cloudbackup.storage.local import LocalStore
from tests.conftest import CliResult, Clock, Env, make_tree

RESULT_KEYS = {"where", "host", "source", "policy", "keep", "delete", "deleted", "errors"}


# ---------------------------------------------------------------- local, through the CLI


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hello</h1>\n"})


def backups(cli: Any, clock: Clock, *specs: Path, days: int = 4) -> None:
    """One full backup of every spec per day for ``days`` days, ending at the clock's time
    (independent backups: chains are planned in tests/test_chain.py)."""
    clock.advance(days=-(days - 1))
    for day in range(days):
        if day:
            clock.advance(days=1)
        result = cli("backup", "--no-upload", "--full", *specs)
        assert result.exit_code == 0, result.stderr


def ids(env: Env, source: str) -> list[str]:
    return sorted(p.name.removesuffix(".manifest.json") for p in env.manifests(source))


def prune_json(cli: Any, *args: str, code: int = 0) -> dict[str, Any]:
    result: CliResult = cli("prune", "--json", *args)
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_dry_run_prints_exactly_what_the_real_run_deletes(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backups(cli, clock, www)
    before = ids(env, "www")
    assert len(before) == 4
    dry = prune_json(cli, "--policy", "last=2", "--dry-run")
    assert dry["dry_run"] is True
    assert ids(env, "www") == before  # nothing deleted
    real = prune_json(cli, "--policy", "last=2")
    assert real["dry_run"] is False
    (dry_result,) = dry["results"]
    (real_result,) = real["results"]
    assert RESULT_KEYS <= set(real_result)
    assert dry_result["deleted"] == []
    assert sorted(real_result["deleted"]) == sorted(dry_result["delete"]) == before[:2]
    assert {**real_result, "deleted": []} == dry_result
    assert ids(env, "www") == before[2:]
    assert [k["reasons"] for k in real_result["keep"]] == [["last 1/2"], ["last 2/2"]]
    assert (real_result["where"], real_result["host"], real_result["source"]) == (
        "local",
        env.host,
        "www",
    )
    assert real_result["policy"] == "last=2"
    # Archives went with their manifests; a second prune deletes nothing.
    assert len(env.archives("www")) == 2
    again = prune_json(cli, "--policy", "last=2")
    assert again["results"][0]["delete"] == []


def test_human_output_lists_kept_with_reasons_and_deleted(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backups(cli, clock, www, days=3)
    oldest = ids(env, "www")[0]
    dry = cli("prune", "--policy", "daily=2", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert f"would delete  {oldest}" in dry.stdout
    assert "daily 2026-11-21" in dry.stdout and "daily 2026-11-20" in dry.stdout
    assert "nothing deleted" in dry.stdout.splitlines()[-1]
    real = cli("prune", "--policy", "daily=2")
    assert real.exit_code == 0, real.stderr
    assert f"deleted       {oldest}" in real.stdout
    assert real.stdout.splitlines()[-1].startswith("deleted 1 backup(s)")


def test_default_local_policy_from_the_environment(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backups(cli, clock, www, days=5)
    assert len(prune_json(cli)["results"][0]["keep"]) == 3  # default last=3
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "last=1")
    document = prune_json(cli)
    assert document["results"][0]["policy"] == "last=1"
    assert len(ids(env, "www")) == 1


def test_empty_policy_deletes_nothing_and_says_so(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backups(cli, clock, www, days=3)
    for policy in ("", "min=2"):
        result = cli("prune", "--policy", policy)
        assert result.exit_code == 0, result.stderr
        assert "policy has no rules: nothing deleted" in result.stdout
        assert len(ids(env, "www")) == 3


def test_each_source_is_its_own_group_and_source_filter(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    other = make_tree(env.tmp / "srv" / "api", {"main.py": "print()\n"})
    backups(cli, clock, www, other, days=3)
    document = prune_json(cli, "--policy", "last=1", "--source", "api")
    assert [(r["source"], len(r["deleted"])) for r in document["results"]] == [("api", 2)]
    assert len(ids(env, "www")) == 3 and len(ids(env, "api")) == 1
    document = prune_json(cli, "--policy", "last=2")
    assert [(r["source"], len(r["deleted"])) for r in document["results"]] == [
        ("api", 0),
        ("www", 1),
    ]


def test_not_yet_offsite_is_pinned_while_a_bucket_is_configured(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backups(cli, clock, www, days=4)
    all_ids = ids(env, "www")
    # The two oldest reached S3 and were verified; the third is mid-upload (not verified).
    for ident, verified in ((all_ids[0], True), (all_ids[1], True), (all_ids[2], False)):
        record = UploadRecord(
            key=f"cloudbackup/testhost/www/{ident}.tar.zst",
            part_size=1,
            part_count=1,
            checksum_algorithm=None,
            checksum=None,
            verified_at="2026-11-21T02:15:00Z" if verified else None,
        )
        (env.source_dir("www") / f"{ident}.upload.json").write_text(json.dumps(record.to_dict()))
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", "not-contacted-by-local-prune")
    document = prune_json(cli, "--policy", "last=1")
    (result,) = document["results"]
    reasons = {k["id"]: k["reasons"] for k in result["keep"]}
    assert reasons[all_ids[3]] == ["not yet offsite", "last 1/1"]
    assert reasons[all_ids[2]] == ["not yet offsite"]
    assert [p["id"] for p in result["pinned"]] == [all_ids[3], all_ids[2]]
    assert sorted(result["deleted"]) == all_ids[:2]
    # The upload records went with their backups.
    assert sorted(p.name for p in env.files("www", "*.upload.json")) == [
        f"{all_ids[2]}.upload.json"
    ]
    human = cli("prune", "--policy", "last=1", "--dry-run")
    assert f"pinned        {all_ids[2]}  (not yet offsite)" in human.stdout


def test_without_a_bucket_nothing_is_pinned(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    backups(cli, clock, www, days=2)
    (result,) = prune_json(cli, "--policy", "last=1")["results"]
    assert result["pinned"] == [] and len(result["deleted"]) == 1


@pytest.mark.parametrize(
    ("policy", "culprit"),
    [
        ("dayly=7", "dayly"),
        ("last=-1", "-1"),
        ("within=5x", "5x"),
        ("last=3,last=4", "last"),
        ("last", "last"),
        ("daily=seven", "seven"),
    ],
)
def test_bad_policy_exits_2_naming_the_value(
    env: Env, cli: Any, www: Path, clock: Clock, policy: str, culprit: str
) -> None:
    backups(cli, clock, www, days=2)
    result = cli("prune", "--policy", policy)
    assert result.exit_code == 2
    result.assert_one_error("--policy", culprit)
    assert result.stdout == ""
    assert len(ids(env, "www")) == 2


def test_bad_configured_policy_exits_2_naming_the_variable(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backups(cli, clock, www, days=2)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "weekly=x")
    result = cli("prune")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_LOCAL_RETENTION", "weekly=x")
    assert len(ids(env, "www")) == 2


@pytest.mark.parametrize(
    ("args", "bucket", "culprits"),
    [
        (("--host", "h2", "--all-hosts"), None, ("--host", "--all-hosts")),
        (("--where", "remote"), None, ("CLOUDBACKUP_S3_BUCKET",)),
        (("--where", "remote"), "bkt", ("CLOUDBACKUP_REMOTE_RETENTION", "--policy")),
        (("--where", "all"), "bkt", ("CLOUDBACKUP_REMOTE_RETENTION", "--policy")),
        (("--where", "nowhere"), None, ("nowhere",)),
    ],
)
def test_usage_errors_exit_2_before_anything_runs(
    env: Env,
    cli: Any,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    bucket: str | None,
    culprits: tuple[str, ...],
) -> None:
    if bucket:
        monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", bucket)
    result = cli("prune", *args)
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    text = result.stderr
    for culprit in culprits:
        assert culprit in text, text


def test_prune_takes_the_lock(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    backups(cli, clock, www, days=2)
    with DirLock(env.local_dir):
        result = cli("prune", "--policy", "last=1")
    assert result.exit_code == 4
    result.assert_one_error("lock")
    assert len(ids(env, "www")) == 2


def test_local_orphans_older_than_7_days_are_removed(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    backups(cli, clock, www, days=2)
    directory = env.source_dir("www")
    now = clock.now.timestamp()
    old = directory / "www-20261101T000000Z.tar.zst"
    young = directory / "www-20261119T000000Z.tar.zst"
    for path, age_days in ((old, 8), (young, 2)):
        path.write_bytes(b"crash between archive and manifest")
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    (directory / "www-20261101T000000Z.upload.json").write_text("{}")
    dry = prune_json(cli, "--policy", "last=5", "--dry-run")["results"][0]
    assert dry["orphans"] == ["www-20261101T000000Z"] and dry["orphans_deleted"] == []
    assert old.exists()
    (result,) = prune_json(cli, "--policy", "last=5")["results"]
    assert result["orphans"] == result["orphans_deleted"] == ["www-20261101T000000Z"]
    assert [o["id"] for o in result["orphans_kept"]] == ["www-20261119T000000Z"]
    assert "7 days" in result["orphans_kept"][0]["reason"]
    assert not old.exists() and young.exists()
    assert not (directory / "www-20261101T000000Z.upload.json").exists()
    assert result["deleted"] == [] and len(ids(env, "www")) == 2


def test_local_prune_touches_only_this_hosts_dir(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    backups(cli, clock, www, days=3)
    monkeypatch.setenv("CLOUDBACKUP_HOST", "otherhost")
    backups(cli, clock, www, days=3)
    monkeypatch.setenv("CLOUDBACKUP_HOST", env.host)
    document = prune_json(cli, "--policy", "last=1", "--all-hosts")
    assert [(r["host"], len(r["deleted"])) for r in document["results"]] == [(env.host, 2)]
    other_dir = env.local_dir / "otherhost" / "www"
    assert len(list(other_dir.glob("*.manifest.json"))) == 3
    document = prune_json(cli, "--policy", "last=2", "--host", "otherhost")
    assert [(r["host"], len(r["deleted"])) for r in document["results"]] == [("otherhost", 1)]


def test_a_failing_source_does_not_stop_the_others(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_tree(env.tmp / "srv" / "api", {"main.py": "print()\n"})
    backups(cli, clock, www, other, days=3)
    real_delete = LocalStore.delete

    def delete(self: LocalStore, key: str) -> None:
        if "/api/" in key:
            raise PermissionError(13, "Permission denied", str(self.path(key)))
        real_delete(self, key)

    monkeypatch.setattr(LocalStore, "delete", delete)
    result = cli("prune", "--json", "--policy", "last=1")
    assert result.exit_code == 1
    api, www_result = json.loads(result.stdout)["results"]
    assert api["deleted"] == [] and len(api["errors"]) == 1
    assert "Permission denied" in api["errors"][0]
    assert "nothing more deleted" in api["errors"][0]
    assert len(www_result["deleted"]) == 2 and www_result["errors"] == []
    result.assert_one_error("api", "Permission denied")
    assert len(ids(env, "api")) == 3 and len(ids(env, "www")) == 1


# ---------------------------------------------------------------- remote, over a fake store

NOW = datetime(2026, 11, 21, 2, 15, tzinfo=UTC)


class FakeRemote:
    """An in-memory bucket that records every call and refuses what ``refuse`` says."""

    where = "remote"
    bucket = "bkt"
    keeps_metadata = True

    def __init__(self) -> None:
        self.objects: dict[str, tuple[datetime, dict[str, str]]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: Callable[[str], Exception | None] = lambda key: None
        self.locks: dict[str, datetime] = {}  # key -> Object Lock retain-until date

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def add(self, key: str, modified: datetime = NOW, **metadata: str) -> None:
        self.objects[key] = (modified, metadata)

    def add_backup(self, host: str, source: str, stamp: str, *, manifest: bool = True) -> str:
        ident = f"{source}-{stamp}"
        self.add(f"cloudbackup/{host}/{source}/{ident}.tar.zst")
        if manifest:
            self.add(f"cloudbackup/{host}/{source}/{ident}.manifest.json")
        return ident

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls.append(("list", prefix))
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield ObjectInfo(key, 10, self.objects[key][0])

    def head(self, key: str) -> ObjectHead | None:
        self.calls.append(("head", key))
        if key not in self.objects:
            return None
        return ObjectHead(
            key=key, size=10, metadata=self.objects[key][1], lock_until=self.locks.get(key)
        )

    def get_bytes(self, key: str) -> bytes:
        raise AssertionError(f"prune downloaded {key}")

    def open(self, key: str) -> Any:
        raise AssertionError(f"prune downloaded {key}")

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        problem = self.refuse(key)
        if problem is not None:
            raise problem
        self.objects.pop(key, None)

    @property
    def deletes(self) -> list[str]:
        return [key for op, key in self.calls if op == "delete"]

    def ids(self, host: str = "h1", source: str = "www") -> list[str]:
        suffix = ".manifest.json"
        prefix = f"cloudbackup/{host}/{source}/"
        return sorted(
            k[len(prefix) : -len(suffix)]
            for k in self.objects
            if k.startswith(prefix) and k.endswith(suffix)
        )


def make_ctx(tmp_path: Path, remote: FakeRemote | None, **settings: Any) -> Context:
    values: dict[str, Any] = {
        "local_dir": tmp_path / "local",
        "host": "h1",
        "s3_bucket": "bkt" if remote is not None else None,
        "remote_retention": parse_policy("last=2"),
    }
    values.update(settings)
    return Context(
        settings=Settings(**values),
        local=LocalStore(tmp_path / "local"),
        now=lambda: NOW,
        machine_id="machine-1",
        remote=remote,
    )


@pytest.fixture
def bucket() -> FakeRemote:
    remote = FakeRemote()
    for day in range(16, 21):
        remote.add_backup("h1", "www", f"202611{day}T021500Z")
    return remote


def test_remote_deletes_manifest_before_archive_newest_first(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    """Newest first: an interrupted prune never leaves a listed incremental whose ancestor
    is gone (tests/test_chain.py)."""
    ctx = make_ctx(tmp_path, bucket)
    (result,) = pruning.prune(ctx, where="remote")
    assert result.delete == ["www-20261118T021500Z", "www-20261117T021500Z", "www-20261116T021500Z"]
    assert result.deleted == result.delete
    prefix = "cloudbackup/h1/www/"
    expected = []
    for ident in result.delete:
        expected += [f"{prefix}{ident}.manifest.json", f"{prefix}{ident}.tar.zst"]
    assert bucket.deletes == expected == result.deleted_keys
    assert bucket.ids() == ["www-20261119T021500Z", "www-20261120T021500Z"]
    assert [op for op, _ in bucket.calls if op not in ("delete",)] == ["list", "head"]


def test_remote_dry_run_records_the_same_deletes_and_deletes_nothing(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    ctx = make_ctx(tmp_path, bucket)
    (dry,) = pruning.prune(ctx, where="remote", dry_run=True)
    assert bucket.deletes == [] and len(bucket.ids()) == 5
    assert dry.deleted == []
    (real,) = pruning.prune(ctx, where="remote")
    assert dry.deleted_keys == real.deleted_keys == bucket.deletes
    assert {**real.to_dict(), "deleted": []} == dry.to_dict()


def test_access_denied_fails_the_source_naming_the_permission(
    tmp_path: Path, bucket: FakeRemote, caplog: pytest.LogCaptureFixture
) -> None:
    bucket.add_backup("h1", "api", "20261110T000000Z")
    bucket.add_backup("h1", "api", "20261111T000000Z")
    bucket.add_backup("h1", "api", "20261112T000000Z")
    bucket.refuse = lambda key: (
        PermanentStorageError("s3://bkt: delete: AccessDenied Access Denied", code="AccessDenied")
        if "/www/" in key
        else None
    )
    ctx = make_ctx(tmp_path, bucket)
    api, www = pruning.prune(ctx, where="remote")
    assert www.deleted == [] and len(www.errors) == 1
    error = www.errors[0]
    assert "s3:DeleteObject" in error and "iam render --role pruner" in error
    assert "s3://bkt/cloudbackup/h1/www/www-20261118T021500Z.manifest.json" in error
    # Stopped at the first refusal: one delete attempted for www, nothing else.
    assert [k for k in bucket.deletes if "/www/" in k] == [
        "cloudbackup/h1/www/www-20261118T021500Z.manifest.json"
    ]
    assert len(bucket.ids()) == 5
    # The other source went on.
    assert api.deleted == ["api-20261110T000000Z"] and api.errors == []
    assert pruning.exit_code([api, www]) == 1
    assert "s3:DeleteObject" in caplog.text


def test_object_lock_pins_without_any_extra_request(tmp_path: Path, bucket: FakeRemote) -> None:
    bucket.add_backup("h1", "www", "20261001T000000Z")  # lock expired 2026-10-31
    ctx = make_ctx(tmp_path, bucket, s3_object_lock=ObjectLock("GOVERNANCE", 3))
    (result,) = pruning.prune(ctx, where="remote", policy=parse_policy("last=1"))
    reasons = dict(result.keep)
    # created + 3 days is after NOW for the 19th and 20th only.
    assert reasons["www-20261120T021500Z"] == [
        "object lock until 2026-11-23T02:15:00Z",
        "last 1/1",
    ]
    assert reasons["www-20261119T021500Z"] == ["object lock until 2026-11-22T02:15:00Z"]
    assert "www-20261118T021500Z" in result.delete  # its lock ended exactly at NOW
    assert "www-20261001T000000Z" in result.delete
    assert [op for op, _ in bucket.calls if op != "delete"] == ["list", "head"]
    assert bucket.ids() == ["www-20261119T021500Z", "www-20261120T021500Z"]


def test_delete_refused_by_object_lock_is_retained_not_failed(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    def refuse(key: str) -> Exception | None:
        if "20261117" in key:
            return PermanentStorageError(
                "s3://bkt: delete: AccessDenied Access Denied because object protected by "
                "object lock",
                code="AccessDenied",
            )
        if "20261116" in key:
            return PermanentStorageError("s3://bkt: delete: InvalidRequest", code="InvalidRequest")
        return None

    bucket.refuse = refuse
    ctx = make_ctx(tmp_path, bucket, s3_object_lock=ObjectLock("COMPLIANCE", 1))
    (result,) = pruning.prune(ctx, where="remote")
    assert result.errors == []
    assert result.deleted == ["www-20261118T021500Z"]
    assert dict(result.retained) == {
        "www-20261116T021500Z": "retained by object lock until 2026-11-17T02:15:00Z",
        "www-20261117T021500Z": "retained by object lock until 2026-11-18T02:15:00Z",
    }
    assert "www-20261117T021500Z" in bucket.ids()
    lines = output.prune_lines([result], dry_run=False)
    assert any("retained" in line and "20261117" in line for line in lines)


def test_remote_orphans_older_than_7_days_are_swept(tmp_path: Path, bucket: FakeRemote) -> None:
    old_key = "cloudbackup/h1/www/www-20261101T000000Z.tar.zst"
    young_key = "cloudbackup/h1/www/www-20261118T000000Z.tar.zst"
    bucket.add(old_key, NOW - timedelta(days=7, seconds=1))
    bucket.add(young_key, NOW - timedelta(days=6))
    bucket.add("cloudbackup/h1/.host-id", NOW - timedelta(days=30), **{"machine-id": "machine-1"})
    bucket.add("cloudbackup/h1/www/README.txt", NOW - timedelta(days=30))
    ctx = make_ctx(tmp_path, bucket)
    (dry,) = pruning.prune(ctx, where="remote", policy=parse_policy("last=5"), dry_run=True)
    assert dry.orphans == ["www-20261101T000000Z"] and dry.orphans_deleted == []
    (result,) = pruning.prune(ctx, where="remote", policy=parse_policy("last=5"))
    assert result.orphans_deleted == ["www-20261101T000000Z"]
    assert [ident for ident, _ in result.orphans_kept] == ["www-20261118T000000Z"]
    assert old_key not in bucket.objects and young_key in bucket.objects
    assert bucket.deletes == [old_key]  # .host-id and foreign keys untouched


def test_orphans_under_object_lock_are_kept(tmp_path: Path, bucket: FakeRemote) -> None:
    key = "cloudbackup/h1/www/www-20261101T000000Z.tar.zst"
    bucket.add(key, NOW - timedelta(days=20))
    ctx = make_ctx(tmp_path, bucket, s3_object_lock=ObjectLock("GOVERNANCE", 30))
    (result,) = pruning.prune(ctx, where="remote", policy=parse_policy("last=5"))
    assert result.orphans == []
    assert result.orphans_kept == [
        ("www-20261101T000000Z", "object lock until 2026-12-01T00:00:00Z")
    ]
    assert key in bucket.objects


def test_all_hosts_plans_each_host_separately(tmp_path: Path, bucket: FakeRemote) -> None:
    for day in range(10, 14):
        bucket.add_backup("h2", "www", f"202611{day}T000000Z")
    bucket.add("cloudbackup/h3/.host-id", machine="x")  # a host with no backups
    ctx = make_ctx(tmp_path, bucket)
    only_mine = pruning.prune(ctx, where="remote", dry_run=True)
    assert [(r.host, len(r.delete)) for r in only_mine] == [("h1", 3)]
    results = pruning.prune(ctx, where="remote", all_hosts=True)
    assert [(r.host, r.source, len(r.deleted)) for r in results] == [
        ("h1", "www", 3),
        ("h2", "www", 2),
    ]
    assert bucket.ids("h2") == ["www-20261112T000000Z", "www-20261113T000000Z"]
    one = pruning.prune(ctx, where="remote", host="h2", policy=parse_policy("last=1"))
    assert [(r.host, r.deleted) for r in one] == [("h2", ["www-20261112T000000Z"])]


def test_a_prefix_claimed_by_another_machine_is_refused(tmp_path: Path, bucket: FakeRemote) -> None:
    bucket.add("cloudbackup/h1/.host-id", **{"machine-id": "someone-else"})
    ctx = make_ctx(tmp_path, bucket)
    (result,) = pruning.prune(ctx, where="remote")
    assert result.deleted == [] and bucket.deletes == []
    assert "claimed by another machine" in result.errors[0]
    assert len(result.delete) == 3  # the plan is still shown
    (explicit,) = pruning.prune(ctx, where="remote", host="h1")  # a DR machine or pruner
    assert len(explicit.deleted) == 3 and explicit.errors == []


def test_prune_for_run(tmp_path: Path, bucket: FakeRemote) -> None:
    ctx = make_ctx(tmp_path, bucket, remote_retention=None)
    assert pruning.prune_for_run(ctx) == []  # no local backups; S3 not pruned
    assert bucket.calls == []
    ctx = make_ctx(tmp_path, bucket)
    results = pruning.prune_for_run(ctx)
    assert [(r.where, len(r.deleted)) for r in results] == [("remote", 3)]


def test_validate_raises_usage_errors(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, None)
    with pytest.raises(UsageError, match="needs a bucket"):
        pruning.prune(ctx, where="remote")
    ctx = make_ctx(tmp_path, FakeRemote(), remote_retention=None)
    with pytest.raises(UsageError, match="CLOUDBACKUP_REMOTE_RETENTION or pass --policy"):
        pruning.prune(ctx, where="all")
    assert pruning.prune(ctx, where="remote", policy=parse_policy("last=1")) == []


# ---------------------------------------------------------------- the plan is a value


def test_a_dry_run_prints_the_plan_the_real_run_executes(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    """No store wrapper: a dry run calls no write at all, and its plan (the deletions, in
    order, with their keys) is exactly what the real run then deletes."""
    ctx = make_ctx(tmp_path, bucket)
    (dry,) = pruning.prune(ctx, where="remote", dry_run=True)
    assert {op for op, _ in bucket.calls} == {"list", "head"}
    assert [step.ref.id for step in dry.plan] == dry.delete
    (real,) = pruning.prune(ctx, where="remote")
    assert [(s.ref.id, s.keys) for s in dry.plan] == [(s.ref.id, s.keys) for s in real.plan]
    assert [key for step in real.plan for key in step.keys] == bucket.deletes


# ---------------------------------------------------------------- forget (prune's executor)


def local_backup(tmp_path: Path, ident: str, *, uploaded: bool = True) -> list[Path]:
    """A local backup of ``www`` for host h1: archive, manifest and (uploaded) its record."""
    directory = tmp_path / "local" / "h1" / "www"
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{ident}.tar.zst", directory / f"{ident}.manifest.json"]
    if uploaded:
        files.append(directory / f"{ident}.upload.json")
    for path in files:
        path.write_text("{}")
    return files


def test_forget_deletes_manifest_first_newest_first(tmp_path: Path, bucket: FakeRemote) -> None:
    ctx = make_ctx(tmp_path, bucket)
    named = ["www-20261117T021500Z", "www-20261116T021500Z", "www-20261117T021500Z"]
    (result,) = forgetting.forget(ctx, named, where="remote")
    prefix = "cloudbackup/h1/www/"
    assert bucket.deletes == [
        f"{prefix}www-20261117T021500Z.manifest.json",
        f"{prefix}www-20261117T021500Z.tar.zst",
        f"{prefix}www-20261116T021500Z.manifest.json",
        f"{prefix}www-20261116T021500Z.tar.zst",
    ]
    assert result.deleted == ["www-20261117T021500Z", "www-20261116T021500Z"]
    assert result.policy == "forget" and forgetting.exit_code([result]) == 0
    assert set(result.to_dict()) >= RESULT_KEYS


def test_forget_dry_run_records_the_same_deletes(tmp_path: Path, bucket: FakeRemote) -> None:
    ctx = make_ctx(tmp_path, bucket)
    (dry,) = forgetting.forget(ctx, ["www-20261118T021500Z"], where="remote", dry_run=True)
    assert bucket.deletes == [] and dry.deleted == [] and dry.delete == ["www-20261118T021500Z"]
    lines = output.forget_lines([dry], dry_run=True)
    assert "remote www-20261118T021500Z  would delete" in lines
    assert any(line.strip().endswith("www-20261118T021500Z.tar.zst") for line in lines)
    (real,) = forgetting.forget(ctx, ["www-20261118T021500Z"], where="remote")
    assert dry.deleted_keys == real.deleted_keys == bucket.deletes


@pytest.mark.parametrize(
    "ids",
    [["www-20261101T000000Z"], ["www-20261116T021500Z", "www-20261101T000000Z"], ["www"]],
)
def test_forget_refuses_unknown_ids_before_deleting_anything(
    tmp_path: Path, bucket: FakeRemote, ids: list[str]
) -> None:
    ctx = make_ctx(tmp_path, bucket)
    with pytest.raises(UsageError, match="nothing deleted") as info:
        forgetting.forget(ctx, ids, where="all")
    assert info.value.exit_code == 2 and bucket.deletes == []


def test_forget_refuses_a_locked_backup_configured_or_reported(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    ctx = make_ctx(tmp_path, bucket, s3_object_lock=ObjectLock("GOVERNANCE", 3))
    # 11-20 + 3 days is after NOW: refused, and the unlocked one named with it stays too.
    with pytest.raises(UsageError, match="object lock until 2026-11-23T02:15:00Z"):
        forgetting.forget(ctx, ["www-20261116T021500Z", "www-20261120T021500Z"], where="remote")
    assert bucket.deletes == []
    # Locked by another writer's setting: S3's HEAD says so.
    bucket.locks["cloudbackup/h1/www/www-20261119T021500Z.tar.zst"] = NOW + timedelta(days=9)
    ctx = make_ctx(tmp_path, bucket)
    with pytest.raises(UsageError, match="object lock until 2026-11-30T02:15:00Z"):
        forgetting.forget(ctx, ["www-20261119T021500Z"], where="remote")
    assert bucket.deletes == []
    (result,) = forgetting.forget(ctx, ["www-20261116T021500Z"], where="remote")  # expired
    assert result.deleted == ["www-20261116T021500Z"]


def test_forget_where_all_leaves_local_copies_when_the_bucket_refuses(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    files = local_backup(tmp_path, "www-20261116T021500Z")
    bucket.refuse = lambda key: PermanentStorageError(
        "s3://bkt: delete: AccessDenied Access Denied", code="AccessDenied"
    )
    ctx = make_ctx(tmp_path, bucket)
    remote, local = forgetting.forget(ctx, ["www-20261116T021500Z"], where="all")
    assert (remote.where, local.where) == ("remote", "local")
    assert "s3:DeleteObject" in remote.errors[0] and local.deleted == []
    assert local.errors == ["not deleted: an earlier deletion failed"]
    assert all(path.exists() for path in files)
    assert forgetting.exit_code([remote, local]) == 1
    assert "not all deleted" in output.forget_lines([remote, local], dry_run=False)[-1]


def test_forget_where_all_deletes_every_copy_and_the_upload_record(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    files = local_backup(tmp_path, "www-20261116T021500Z")
    kept = local_backup(tmp_path, "www-20261117T021500Z")
    ctx = make_ctx(tmp_path, bucket)
    remote, local = forgetting.forget(ctx, ["www-20261116T021500Z"], where="all")
    assert remote.deleted == local.deleted == ["www-20261116T021500Z"]
    assert local.deleted_keys == [
        "h1/www/www-20261116T021500Z.manifest.json",
        "h1/www/www-20261116T021500Z.tar.zst",
        "h1/www/www-20261116T021500Z.upload.json",
    ]
    assert not any(path.exists() for path in files) and all(path.exists() for path in kept)
    assert "www-20261116T021500Z" not in bucket.ids()


def test_forget_remote_only_makes_the_local_copy_not_offsite(
    tmp_path: Path, bucket: FakeRemote
) -> None:
    archive, manifest, record = local_backup(tmp_path, "www-20261116T021500Z")
    ctx = make_ctx(tmp_path, bucket)
    (result,) = forgetting.forget(ctx, ["www-20261116T021500Z"], where="remote")
    assert result.deleted == ["www-20261116T021500Z"]
    assert archive.exists() and manifest.exists()
    assert not record.exists(), "the local copy is pinned and uploaded again"


def test_remote_prune_of_every_host_keeps_each_chain(tmp_path: Path) -> None:
    """--all-hosts: each host's chains planned on their own; every kept incremental keeps
    its ancestors, with the reason."""
    remote = FakeRemote()
    for host, pattern in (("h1", "FIIFI"), ("h2", "FIII")):
        for day, kind in enumerate(pattern, start=10):
            ident = f"www-202611{day}T021500Z"
            name = f"{ident}.incr.tar.zst" if kind == "I" else f"{ident}.tar.zst"
            remote.add(f"cloudbackup/{host}/www/{name}")
            remote.add(f"cloudbackup/{host}/www/{ident}.manifest.json")
            remote.add(f"cloudbackup/{host}/www/{ident}.index.zst")
    ctx = make_ctx(tmp_path, remote, remote_retention=parse_policy("last=1"))
    results = pruning.prune(ctx, where="remote", all_hosts=True)
    by_host = {r.host: r for r in results}
    assert dict(by_host["h1"].keep) == {
        "www-20261114T021500Z": ["last 1/1"],
        "www-20261113T021500Z": ["base of www-20261114T021500Z"],
    }
    assert by_host["h1"].deleted == [
        "www-20261112T021500Z",
        "www-20261111T021500Z",
        "www-20261110T021500Z",
    ]
    assert by_host["h2"].deleted == []  # one chain: all of it needed by its newest
    assert dict(by_host["h2"].keep)["www-20261110T021500Z"] == ["base of www-20261113T021500Z"]
    assert "cloudbackup/h1/www/www-20261110T021500Z.index.zst" in remote.deletes
