"""The rendered IAM policies, enforced by moto, under the real CLI.

Each role is an IAM user holding the policy printed by ``cloudbackup iam render``; its access
keys are the only credentials in the environment while ``cloudbackup`` runs in-process (the
``cli`` fixture) against moto's in-process ``mock_aws`` with IAM enforcement switched on
(``enforce_iam`` = ``moto.core.set_initial_no_auth_action_count(0)``: the fixture's setup calls
run unauthenticated, every request the test itself makes is checked). What the bucket holds is
read back with an ``admin`` IAM user (``s3:*`` on the bucket), itself subject to enforcement.
The session's shared ``moto_server`` is not used, so its auth setting is never touched.

What moto cannot check here, covered elsewhere (tests/test_iam.py, the parliament lint):

* ``Condition`` blocks are ignored for identity policies. So the ``s3:prefix`` condition on
  ``s3:ListBucket`` is not enforced: in moto a writer scoped to host ``a`` or prefix ``p1`` may
  LIST ``<prefix>/b/`` or ``p2/`` (AWS refuses); these tests only prove that object reads,
  writes and deletes stay inside the rendered key base. ``s3:if-none-match`` (the bucket
  policy's optional "conditional writes only" rule) is not evaluated either, and the bucket
  policy is never loaded into moto (its ``Principal: "*"`` Deny would hit every request).
* ``DeleteObjects`` is authorized against the bucket ARN in moto (AWS checks each key);
  cloudbackup issues one ``DeleteObject`` per key, which moto checks like AWS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tests.conftest import HOST, CliResult, Clock, Env, make_tree
from tests.iam_helpers import (
    REGION,
    Credentials,
    create_user_with_policy,
    enforce_iam,
    fake_admin_env,
    s3_client,
)

BUCKET = "cloudbackup-iam-cli"
PREFIX = "cloudbackup"
FILES: dict[str, bytes | str] = {"index.html": b"<h1>hello</h1>\n", "css/site.css": b"body {}\n"}

Cli = Callable[..., CliResult]

ADMIN_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
)


@dataclass
class World:
    """IAM users (created before enforcement starts) and the source directory ``www``."""

    admin: Credentials
    writer: Credentials  # --host testhost
    pruner: Credentials  # whole prefix (a central pruner job)
    restorer: Credentials  # whole prefix (a DR machine)
    writer_a: Credentials  # --host a
    writer_p1: Credentials  # --prefix p1
    writer_p2: Credentials  # --prefix p2
    www: Path
    monkeypatch: pytest.MonkeyPatch

    def use(self, credentials: Credentials, **settings: str) -> None:
        """Run the next CLI commands with ``credentials`` and these CLOUDBACKUP_* settings."""
        for name, value in credentials.env().items():
            self.monkeypatch.setenv(name, value)
        for name, value in settings.items():
            self.monkeypatch.setenv(f"CLOUDBACKUP_{name}", value)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket, read with the admin user."""
        s3 = s3_client(self.admin)
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def rendered(cli: Cli, role: str, *options: str) -> str:
    """The policy document ``cloudbackup iam render`` prints."""
    result = cli("iam", "render", "--role", role, "--bucket", BUCKET, *options)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["Statement"], document
    return result.stdout


@pytest.fixture
def world(env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fake_admin_env(monkeypatch)
    www = make_tree(env.tmp / "srv" / "www", FILES)
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", BUCKET)
    monkeypatch.setenv("CLOUDBACKUP_S3_PREFIX", PREFIX)
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(www))
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
        iam_client = boto3.client("iam", region_name=REGION)

        def user(name: str, role: str, *options: str) -> Credentials:
            return create_user_with_policy(iam_client, name, rendered(cli, role, *options))

        yield World(
            admin=create_user_with_policy(iam_client, "admin", ADMIN_POLICY),
            writer=user("writer", "writer", "--prefix", PREFIX, "--host", HOST),
            pruner=user("pruner", "pruner", "--prefix", PREFIX),
            restorer=user("restorer", "restorer", "--prefix", PREFIX),
            writer_a=user("writer-a", "writer", "--prefix", PREFIX, "--host", "a"),
            writer_p1=user("writer-p1", "writer", "--prefix", "p1"),
            writer_p2=user("writer-p2", "writer", "--prefix", "p2"),
            www=www,
            monkeypatch=monkeypatch,
        )


# ---------------------------------------------------------------- helpers


def ok(result: CliResult) -> CliResult:
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def remote_backups(cli: Cli, *options: str) -> list[dict[str, Any]]:
    result = ok(cli("list", "--where", "remote", "--json", *options))
    backups: list[dict[str, Any]] = json.loads(result.stdout)["backups"]
    return backups


def two_backups(world: World, cli: Cli, clock: Clock) -> list[str]:
    """Two full backups of ``www`` uploaded by the writer (enforced); their keys, sorted."""
    world.use(world.writer)
    ok(cli("backup"))
    clock.advance(hours=1)
    (world.www / "news.html").write_text("news\n")
    ok(cli("backup", "--full"))  # independent: the older one can be pruned
    keys = world.keys(f"{PREFIX}/{HOST}/www/")
    assert len(keys) == 6, keys  # two archives, two indexes, two manifests
    return keys


def assert_denied(result: CliResult, *words: str) -> None:
    """Exit 1 with one clear error line (no traceback) naming AccessDenied and ``words``."""
    assert result.exit_code == 1, result.stdout + result.stderr
    result.assert_one_error("AccessDenied", *words)


# ---------------------------------------------------------------- control


@enforce_iam
def test_enforcement_is_on(world: World, env: Env, cli: Cli) -> None:
    """The setup credentials are no IAM user: refused once the test runs (no vacuous pass)."""
    result = cli("list", "--where", "remote")  # AWS_ACCESS_KEY_ID=testing (fake_admin_env)
    assert result.exit_code != 0, result.stdout
    result.assert_one_error("InvalidAccessKeyId", BUCKET)


# ---------------------------------------------------------------- writer


@enforce_iam
def test_writer_backs_up_uploads_and_verifies(
    world: World, env: Env, cli: Cli, clock: Clock
) -> None:
    world.use(world.writer)
    ok(cli("backup"))
    [first] = remote_backups(cli)
    assert first["remote"] and first["verified"], first

    clock.advance(hours=1)
    (world.www / "news.html").write_text("news\n")
    ok(cli("backup", "--no-upload"))
    result = ok(cli("upload"))
    assert result.stdout.startswith("ok"), result.stdout
    backups = remote_backups(cli)
    assert len(backups) == 2
    assert all(b["remote"] and b["verified"] for b in backups), backups
    verified = json.loads(ok(cli("verify", "--where", "remote", "--json")).stdout)["results"]
    assert [r["ok"] for r in verified] == [True, True], verified
    assert f"{PREFIX}/{HOST}/.host-id" in world.keys()


@enforce_iam
def test_writer_cannot_prune_remote(world: World, env: Env, cli: Cli, clock: Clock) -> None:
    keys = two_backups(world, cli, clock)
    result = cli("prune", "--where", "remote", "--policy", "last=1")
    assert result.exit_code == 1, result.stdout + result.stderr
    result.assert_one_error("www", "s3:DeleteObject", "pruner role")
    assert "FAILED" in result.stdout, result.stdout
    # Nothing was deleted: both backups are still there, as the admin sees them.
    assert world.keys(f"{PREFIX}/{HOST}/www/") == keys
    assert len(remote_backups(cli)) == 2


@enforce_iam
def test_writer_check_passes_and_names_the_pruner_role(world: World, env: Env, cli: Cli) -> None:
    world.use(world.writer, REMOTE_RETENTION="daily=7")
    result = ok(cli("check"))
    lines = {line[5:].split(":", 1)[0]: line for line in result.stdout.splitlines()}
    for name in ("bucket list", "bucket write", "host claim"):
        assert lines[name].startswith("ok  "), result.stdout
    assert BUCKET in lines["bucket list"]
    assert "pruner role" in lines["remote prune"], result.stdout
    assert "s3:DeleteObject" in lines["remote prune"], result.stdout
    assert world.keys() == []  # the write probe left nothing behind


# ---------------------------------------------------------------- pruner


@enforce_iam
def test_pruner_deletes_the_older_backup(world: World, env: Env, cli: Cli, clock: Clock) -> None:
    keys = two_backups(world, cli, clock)
    # A central pruner: another machine, another local dir, no backups of its own.
    world.use(world.pruner, HOST="pruner-box", LOCAL_DIR=str(env.tmp / "pruner"))
    result = ok(cli("prune", "--where", "remote", "--policy", "last=1", "--host", HOST, "--json"))
    [group] = json.loads(result.stdout)["results"]
    assert group["errors"] == [], group
    older = min(k for k in keys if k.endswith(".manifest.json")).rsplit("/", 1)[1]
    older_id = older.removesuffix(".manifest.json")
    assert group["deleted"] == [older_id], group
    remaining = world.keys(f"{PREFIX}/{HOST}/www/")
    assert remaining == [k for k in keys if older_id not in k], remaining
    assert len(remaining) == 3


# ---------------------------------------------------------------- restorer


@enforce_iam
def test_restorer_lists_and_restores(world: World, env: Env, cli: Cli, clock: Clock) -> None:
    two_backups(world, cli, clock)
    # A DR machine: its own (empty) local dir and host name.
    world.use(world.restorer, HOST="dr-box", LOCAL_DIR=str(env.tmp / "dr"))
    backups = remote_backups(cli, "--host", HOST)
    assert [b["host"] for b in backups] == [HOST, HOST]
    ok(cli("verify", "--where", "remote", "--host", HOST))
    target = env.tmp / "restored"
    ok(cli("restore", "www", "--host", HOST, "--from", "remote", "--to", target))
    expected = {**FILES, "news.html": b"news\n"}
    restored = {
        p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()
    }
    assert restored == expected
    dr_dir = env.tmp / "dr"
    assert not list(dr_dir.rglob("*.tar.zst")), list(dr_dir.rglob("*"))  # not kept locally


@enforce_iam
def test_restorer_cannot_upload(world: World, env: Env, cli: Cli, clock: Clock) -> None:
    keys = two_backups(world, cli, clock)
    clock.advance(hours=1)
    world.use(world.restorer)
    result = cli("backup")
    assert_denied(result, BUCKET)
    assert len(env.archives("www")) == 3  # the new local archive is kept
    assert world.keys() == sorted([*keys, f"{PREFIX}/{HOST}/.host-id"])  # nothing deleted


# ---------------------------------------------------------------- scoping


@enforce_iam
def test_host_scoped_writer_cannot_upload_as_another_host(
    world: World, env: Env, cli: Cli, clock: Clock
) -> None:
    world.use(world.writer_a, HOST="a")
    ok(cli("backup"))
    assert any(k.startswith(f"{PREFIX}/a/www/") for k in world.keys())

    before = world.keys()
    world.use(world.writer_a, HOST="b")
    clock.advance(hours=1)
    assert_denied(cli("backup"), BUCKET, f"{PREFIX}/b/")
    assert world.keys() == before  # nothing written under b/, nothing of a/ touched
    for host in ("a", "b"):  # b's archive is kept locally, to be uploaded by a b writer
        assert len(list((env.local_dir / host / "www").glob("*.tar.zst"))) == 1, host


@enforce_iam
def test_prefix_scoped_writer_cannot_touch_another_prefix(
    world: World, env: Env, cli: Cli, clock: Clock
) -> None:
    world.use(world.writer_p2, S3_PREFIX="p2", LOCAL_DIR=str(env.tmp / "p2-box"))
    ok(cli("backup"))
    p2_keys = world.keys("p2/")
    assert len(p2_keys) == 4, p2_keys  # archive, index, manifest, host claim

    world.use(world.writer_p1, S3_PREFIX="p1", LOCAL_DIR=str(env.tmp / "p1-box"))
    ok(cli("backup"))
    assert len(world.keys("p1/")) == 4
    clock.advance(hours=1)
    world.use(world.writer_p1, S3_PREFIX="p2")
    assert_denied(cli("backup"), BUCKET)
    # Listing p2/ works in moto only (the s3:prefix condition is ignored, see above); reading
    # the archive there is refused.
    result = cli("restore", "www", "--from", "remote", "--to", env.tmp / "stolen")
    assert_denied(result, BUCKET)
    assert not (env.tmp / "stolen").exists()
    assert world.keys("p2/") == p2_keys
