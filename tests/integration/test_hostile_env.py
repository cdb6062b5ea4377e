"""Hostile environment and clock, end to end: real PostgreSQL children and command sources
under a hostile environment, a database password full of URL separators, and a backup dated
in the future, over moto (S3) with the CLI in-process."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from cloudbackup.sources import pgtools as postgres
from tests.conftest import CliResult, Clock, Env, S3Env, make_tree
from tests.integration.pgserver import PgServer
from tests.test_hostile_env import environ_of, read_members
from tests.test_monitor import families

pytestmark = pytest.mark.slow

CLI = Callable[..., CliResult]

ROLE = "hostile_owner"
DB = "hostile"
# Every URL separator a password can hold; each piece is unique, so any of them found in any
# output is a leak (a tail left behind by a redactor that stopped at the wrong "@").
PIECES = ["Hun7erQ", "Ta1lX", "c0l0nY", "sl4shZ", "pctW"]
DB_PASSWORD = "Hun7erQ@Ta1lX:c0l0nY/sl4shZ%pctW"
AWS_KEY_ID = "AKIAHOSTILE0ENV0KEY9"
AWS_SECRET = "aws-secret-Jq8-hostile-integration"
AWS_TOKEN = "aws-token-Wm5-hostile-integration"
PG_PASSWORD = "pgpassword-Nn2-hostile-integration"
SECRETS = [DB_PASSWORD, *PIECES, AWS_KEY_ID, AWS_SECRET, AWS_TOKEN, PG_PASSWORD]
FORBIDDEN_NAMES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "PGPASSWORD",
    "PGSERVICEFILE",
}


def assert_no_secret(data: bytes | str, where: str) -> None:
    haystack = data if isinstance(data, bytes) else data.encode()
    for secret in SECRETS:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form.encode() not in haystack, f"{form!r} leaked into {where}"


@pytest.fixture
def hostile_db(pg_server: PgServer) -> str:
    """A database owned by a role whose password holds @ : / and %."""
    pg_server.psql(
        f"DROP DATABASE IF EXISTS {DB}; DROP ROLE IF EXISTS {ROLE};\n"
        f"CREATE ROLE {ROLE} LOGIN PASSWORD '{DB_PASSWORD}';\n"
        f"CREATE DATABASE {DB} OWNER {ROLE};"
    )
    pg_server.psql(
        f"SET ROLE {ROLE}; CREATE TABLE t (id int, note text); "
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g;",
        db=DB,
    )
    return DB


def wrappers(tmp: Path, log_dir: Path) -> Path:
    """psql, pg_dump and pg_dumpall that record their environment (as the kernel gave it:
    ``/proc/PID/environ``) and then run the real program."""
    real = postgres.find_tools(("pg_dump", "pg_dumpall", "psql"), env=dict(os.environ))
    bindir = tmp / "recording-bin"
    bindir.mkdir()
    log_dir.mkdir()
    for name in ("psql", "pg_dump", "pg_dumpall"):
        script = bindir / name
        script.write_text(
            "#!/bin/sh\n"
            f'/bin/cat /proc/$$/environ > "{log_dir}/{name}.$$"\n'
            f'exec "{real.bindir / name}" "$@"\n'
        )
        script.chmod(0o755)
    return bindir


def test_children_get_a_scrubbed_environment_and_the_password_stays_hidden(
    env: Env,
    cli: CLI,
    s3_env: S3Env,
    pg_server: PgServer,
    hostile_db: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """SPEC "Everything read is untrusted": pg_dump, pg_dumpall, psql (version probes too)
    and command sources get no CLOUDBACKUP_*, AWS credential or PG password variable; the
    database password (with @ : / %) appears in no manifest, object, metadata, tag, log or
    output, in either URL form."""
    log_dir = tmp_path / "child-envs"
    bindir = wrappers(tmp_path, log_dir)
    monkeypatch.setattr(postgres, "candidate_dirs", lambda *_: [bindir])
    userinfo = f"postgresql://{ROLE}:{quote(DB_PASSWORD, safe='@:')}@127.0.0.1:{pg_server.port}"
    query = (
        f"postgresql://{ROLE}@127.0.0.1:{pg_server.port}/{DB}"
        f"?sslmode=disable&password={quote(DB_PASSWORD, safe='')}"
    )
    assert "@Ta1lX:c0l0nY%2F" in userinfo, "the @ and : of the password are left as they are"
    monkeypatch.setenv(
        "CLOUDBACKUP_SOURCES",
        "\n".join(
            [
                f"db1={userinfo}/{DB}",
                f"db2={query}",
                "envdump=cmd:env",
                "procenv=cmd:/bin/cat /proc/self/environ",
            ]
        ),
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)  # moto takes any credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "pg_service.conf"))
    user_passfile = tmp_path / "user.pgpass"
    user_passfile.write_text("*:*:*:*:not-this-one\n")
    user_passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(user_passfile))
    log_file = env.tmp / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))

    result = cli("-v", "backup", "--json")
    assert result.exit_code == 0, result.stderr
    assert all(r["ok"] and r["uploaded"] for r in json.loads(result.stdout)["results"])

    # The children's environments, as the kernel gave them.
    recorded = sorted(log_dir.iterdir())
    assert {p.name.split(".")[0] for p in recorded} == {"psql", "pg_dump", "pg_dumpall"}
    assert len(recorded) >= 7, "probes, --version and dumps of two sources"
    for path in recorded:
        raw = path.read_bytes()
        child = environ_of(raw)
        assert child.get("PATH") == os.environ["PATH"], path.name
        assert not [n for n in child if n.startswith("CLOUDBACKUP_")], (path.name, child)
        assert not FORBIDDEN_NAMES & set(child), (path.name, child)
        if "PGPASSFILE" in child:  # only one the tool made: in the local dir, or in memory
            passfile = child["PGPASSFILE"]
            assert passfile.startswith((str(env.local_dir), "/dev/fd/")), passfile
        assert_no_secret(raw, f"the environment of {path.name}")
    assert any("PGPASSFILE" in environ_of(p.read_bytes()) for p in recorded)

    # Command sources: a scrubbed environment, still with PATH.
    for source in ("envdump", "procenv"):
        (archive,) = env.archives(source)
        child = environ_of(read_members(archive)[f"{source}.out"])
        assert child["PATH"] == os.environ["PATH"]
        assert not [n for n in child if n.startswith("CLOUDBACKUP_")]
        assert not FORBIDDEN_NAMES & set(child) and "PGPASSFILE" not in child

    # Manifests carry the redacted form of each URL form.
    specs = {
        p.parent.name: json.loads(p.read_bytes())["spec"]
        for p in env.local_dir.rglob("*.manifest.json")
    }
    assert specs["db1"] == f"postgresql://{ROLE}:***@127.0.0.1:{pg_server.port}/{DB}"
    assert specs["db2"].endswith("&password=***")

    # The secrets nowhere: output, log, every local file (archives decompressed too), every
    # S3 object, its metadata and its tags.
    assert_no_secret(result.stdout, "--json output")
    assert_no_secret(result.stderr, "stderr")
    assert_no_secret(log_file.read_bytes(), "the log file")
    for path in env.local_dir.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_bytes(), str(path))
            if ".tar" in path.name:
                for name, data in read_members(path).items():
                    assert_no_secret(data, f"member {name} of {path.name}")
    keys = s3_env.keys()
    assert sum(k.endswith(".manifest.json") for k in keys) == 4
    for key in keys:
        obj = s3_env.client.get_object(Bucket=s3_env.bucket, Key=key)
        assert_no_secret(obj["Body"].read(), key)
        assert_no_secret(json.dumps(obj.get("Metadata", {})), f"metadata of {key}")
        tags = s3_env.client.get_object_tagging(Bucket=s3_env.bucket, Key=key)["TagSet"]
        assert_no_secret(json.dumps(tags), f"tags of {key}")


# ---------------------------------------------------------------- the clock, over S3

FUTURE = datetime(2036, 3, 1, 4, 0, tzinfo=UTC)
FUTURE_ID = "www-20360301T040000Z"


def status_doc(cli: CLI) -> tuple[int, dict[str, Any]]:
    result = cli("status", "--json")
    assert "Traceback" not in result.stderr, result.stderr
    document = json.loads(result.stdout)
    ((row,),) = [h["sources"] for h in document["hosts"]]
    return result.exit_code, row


def last_success(cli: CLI, env: Env) -> float:
    prom = env.tmp / "metrics.prom"
    cli("status", "--prometheus", prom)
    (sample,) = families(prom)["cloudbackup_last_success_timestamp_seconds"].samples
    return float(sample.value)


def test_a_backup_dated_2036_is_forgotten_everywhere_and_backups_resume(
    env: Env, cli: CLI, s3_env: S3Env, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    www = make_tree(env.tmp / "www", {"index.html": "<h1>hi</h1>", "app.js": "x()"})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(www))
    now = clock.now
    clock.advance(days=-1)
    assert cli("backup").exit_code == 0
    good_id = "www-20261120T021500Z"
    clock.now = FUTURE  # one night with the clock in 2036
    assert cli("backup").exit_code == 0
    clock.now = now
    remote = [k for k in s3_env.keys() if k.endswith(".manifest.json")]
    assert len(remote) == 2 and any(FUTURE_ID in k for k in remote)

    code, row = status_doc(cli)
    assert (code, row["state"], row["newest"]) == (1, "WARNING", good_id)
    assert row["future_dated"] == [FUTURE_ID] and row["age_seconds"] == 86400
    assert last_success(cli, env) == now.timestamp() - 86400

    blocked = cli("backup")
    assert blocked.exit_code == 1
    line = blocked.assert_one_error(FUTURE_ID, "dated in the future")
    assert f"cloudbackup forget {FUTURE_ID} --where all" in line

    dry = cli("forget", FUTURE_ID, "--where", "all", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    assert {r["where"] for r in planned["results"]} == {"local", "remote"}
    assert all(r["delete"] == [FUTURE_ID] and r["deleted"] == [] for r in planned["results"])
    assert len([k for k in s3_env.keys() if FUTURE_ID in k]) == 3  # archive, index, manifest
    assert env.files("www", f"{FUTURE_ID}.*")

    gone = cli("forget", FUTURE_ID, "--where", "all")
    assert gone.exit_code == 0, gone.stderr
    assert f"remote {FUTURE_ID}  deleted" in gone.stdout
    assert f"local  {FUTURE_ID}  deleted" in gone.stdout
    assert not [k for k in s3_env.keys() if FUTURE_ID in k]
    assert not env.files("www", f"{FUTURE_ID}.*"), "manifest, archive and upload record"
    assert env.files("www", f"{good_id}.*")

    resumed = cli("backup", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    (res,) = json.loads(resumed.stdout)["results"]
    assert res["id"] == "www-20261121T021500Z" and res["uploaded"]
    code, row = status_doc(cli)
    assert (code, row["state"], row["future_dated"]) == (0, "OK", [])
    assert row["newest"] == "www-20261121T021500Z"
    assert last_success(cli, env) == now.timestamp()


def test_forget_refuses_a_backup_under_object_lock(
    env: Env, cli: CLI, s3_env: S3Env, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_env.bucket + "-locked"
    s3_env.client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", bucket)
    monkeypatch.setenv("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:2d")
    www = make_tree(env.tmp / "www", {"index.html": "<h1>hi</h1>"})
    assert cli("backup", www).exit_code == 0
    ident = "www-20261121T021500Z"

    def objects() -> list[str]:
        page = s3_env.client.list_objects_v2(Bucket=bucket)
        return sorted(o["Key"] for o in page.get("Contents", []))

    before = objects()
    assert len(before) >= 2
    for where in ("all", "remote"):
        refused = cli("forget", ident, "--where", where)
        assert refused.exit_code == 2
        refused.assert_one_error(ident, "object lock until 2026-11-23T02:15:00Z")
        assert objects() == before and env.files("www", f"{ident}.*")
    # Locked by a setting this machine does not have: S3 says so (one HEAD).
    monkeypatch.delenv("CLOUDBACKUP_S3_OBJECT_LOCK")
    refused = cli("forget", ident, "--where", "all")
    assert refused.exit_code == 2
    refused.assert_one_error(ident, "object lock")
    # archive, index, manifest, upload record
    assert objects() == before and len(env.files("www", f"{ident}.*")) == 4
