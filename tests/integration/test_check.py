"""`cloudbackup check` against moto (one line per check, exit 0/1, nothing left behind) and
`cloudbackup iam render`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.lock import DirLock
from tests.conftest import Env, S3Env, make_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def www(env: Env, monkeypatch: pytest.MonkeyPatch) -> Path:
    tree = make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hello</h1>\n"})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(tree))
    return tree


def lines_of(stdout: str) -> dict[str, str]:
    """``{"source www": "ok   source www: ...", ...}`` (the check name → its line)."""
    found = {}
    for line in stdout.splitlines():
        mark, rest = line[:4], line[5:]
        assert mark in ("ok  ", "warn", "FAIL"), line
        found.setdefault(rest.split(":", 1)[0], line)
    return found


def test_all_green(env: Env, s3_env: S3Env, cli: Any, www: Path) -> None:
    result = cli("check")
    assert result.exit_code == 0, result.stdout + result.stderr
    lines = lines_of(result.stdout)
    for name in (
        "configuration",
        "source www",
        "local dir",
        "bucket list",
        "bucket write",
        "host claim",
        "remote prune",
    ):
        assert lines[name].startswith("ok  "), lines
    assert s3_env.bucket in lines["bucket list"]
    assert "FAIL" not in result.stdout and "Traceback" not in result.stderr


def test_check_json(env: Env, s3_env: S3Env, cli: Any, www: Path) -> None:
    result = cli("check", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["ok"] is True
    assert {"check", "ok", "warning", "detail"} <= set(doc["checks"][0])
    assert "bucket write" in {c["check"] for c in doc["checks"]}


def test_write_probe_leaves_nothing_behind(env: Env, s3_env: S3Env, cli: Any, www: Path) -> None:
    assert cli("check").exit_code == 0
    assert s3_env.keys() == []
    uploads = s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket)
    assert uploads.get("Uploads", []) == []
    # Nothing created locally either: the local dir is only reported as creatable.
    assert not env.local_dir.exists()
    assert "creatable" in cli("check").stdout


def test_host_claimed_by_this_machine_is_ok(
    env: Env, s3_env: S3Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "")
    assert cli("run").exit_code == 0  # claims <prefix>/testhost/
    result = cli("check")
    assert result.exit_code == 0, result.stdout
    assert "belongs to this machine" in lines_of(result.stdout)["host claim"]


def test_host_claimed_by_another_machine_fails(
    env: Env, s3_env: S3Env, cli: Any, www: Path
) -> None:
    s3_env.client.put_object(
        Bucket=s3_env.bucket,
        Key=s3_env.key("testhost", "", ".host-id").replace("//", "/"),
        Body=b"someone-else\n",
        Metadata={"machine-id": "someone-else"},
    )
    result = cli("check")
    assert result.exit_code == 1
    line = lines_of(result.stdout)["host claim"]
    assert line.startswith("FAIL") and "CLOUDBACKUP_HOST" in line


def test_missing_source_fails_and_is_named(
    env: Env, s3_env: S3Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = env.tmp / "srv" / "gone"
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www},{gone}")
    result = cli("check")
    assert result.exit_code == 1
    lines = lines_of(result.stdout)
    assert lines["source www"].startswith("ok  ")
    assert lines["source gone"].startswith("FAIL") and str(gone) in lines["source gone"]
    assert "Traceback" not in result.stderr


def test_no_bucket_is_a_failure_unless_local_only(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = cli("check")
    assert result.exit_code == 1
    line = lines_of(result.stdout)["bucket"]
    assert line.startswith("FAIL") and "CLOUDBACKUP_S3_BUCKET" in line
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    result = cli("check")
    assert result.exit_code == 0
    assert "local-only" in lines_of(result.stdout)["bucket"]


def test_missing_bucket_fails_the_list_check(
    env: Env, s3_env: S3Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", s3_env.bucket + "-nope")
    monkeypatch.setenv("CLOUDBACKUP_RETRY_ATTEMPTS", "1")
    result = cli("check")
    assert result.exit_code == 1
    line = lines_of(result.stdout)["bucket list"]
    assert line.startswith("FAIL") and "nope" in line
    assert "Traceback" not in result.stderr


def test_env_file_readable_by_others_is_warned_about(
    env: Env, s3_env: S3Env, cli: Any, www: Path
) -> None:
    env_file = env.tmp / "cloudbackup.env"
    env_file.write_text("CLOUDBACKUP_COMPRESSION=gzip\n")
    env_file.chmod(0o644)
    result = cli("--env-file", env_file, "check")
    assert result.exit_code == 0  # a warning, not a failure
    line = lines_of(result.stdout)["env file"]
    assert line.startswith("warn") and str(env_file) in line and "chmod 600" in line
    env_file.chmod(0o600)
    result = cli("--env-file", env_file, "check")
    assert "env file" not in lines_of(result.stdout)


def test_remote_retention_needs_the_pruner_role(
    env: Env, s3_env: S3Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "writer role is enough" in lines_of(cli("check").stdout)["remote prune"]
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION", "daily=7,weekly=4")
    result = cli("check")
    assert result.exit_code == 0
    line = lines_of(result.stdout)["remote prune"]
    assert "pruner role" in line and "s3:DeleteObject" in line


def test_check_does_not_take_the_lock(env: Env, s3_env: S3Env, cli: Any, www: Path) -> None:
    with DirLock(env.local_dir):
        assert cli("check").exit_code == 0


def test_invalid_configuration_is_exit_2(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "daily=many")
    result = cli("check")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_LOCAL_RETENTION")


# ---------------------------------------------------------------- iam render


def test_iam_render_writer_for_one_host(env: Env, cli: Any) -> None:
    # A one-letter bucket ("b") is refused like any invalid CLOUDBACKUP_S3_BUCKET value
    # (S3 names have 3 to 63 characters), so the shortest valid name stands in for it.
    result = cli(
        "iam", "render", "--role", "writer", "--bucket", "bkt", "--prefix", "p", "--host", "h"
    )
    assert result.exit_code == 0, result.stderr
    policy = json.loads(result.stdout)
    assert policy["Version"] == "2012-10-17" and policy["Statement"]
    assert "arn:aws:s3:::bkt/p/h/*" in result.stdout
    assert "arn:aws:s3:::bkt/p/*" not in result.stdout  # scoped to the one host
    assert "{{" not in result.stdout and "${" not in result.stdout.replace("${aws:", "")


@pytest.mark.parametrize("role", ["writer", "pruner", "restorer"])
def test_iam_render_every_role_is_json(env: Env, cli: Any, role: str) -> None:
    result = cli("iam", "render", "--role", role, "--bucket", "bkt", "--prefix", "p")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["Statement"]
    assert "arn:aws:s3:::bkt" in result.stdout


def test_iam_render_with_bucket_and_prefix_ignores_unrelated_broken_settings(
    env: Env, cli: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "keep-everything")
    result = cli("iam", "render", "--role", "writer", "--bucket", "bkt", "--prefix", "p")
    assert result.exit_code == 0, result.stderr
    assert "arn:aws:s3:::bkt/p/" in result.stdout
    # Without --prefix the configuration is read, and its error is reported.
    result = cli("iam", "render", "--role", "writer", "--bucket", "bkt")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_LOCAL_RETENTION")
    # The given values themselves are still validated.
    result = cli("iam", "render", "--role", "writer", "--bucket", "b", "--prefix", "p")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_S3_BUCKET")


def test_iam_render_needs_a_bucket(env: Env, cli: Any) -> None:
    result = cli("iam", "render", "--role", "writer")
    assert result.exit_code == 2
    result.assert_one_error("bucket")
