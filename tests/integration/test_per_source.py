"""Per-source settings end to end over moto: an hourly database and daily files in one
configuration, each with its own retention (local and remote, in one prune, and from a
central pruner with --all-hosts), codec and excludes; `run` pruning the offsite copies of
the one source that has a remote policy; `backup --dry-run` printing the plan."""

from __future__ import annotations

import json
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Clock, Env, S3Env, make_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(
        env.tmp / "srv" / "www",
        {"index.html": "<h1>hello</h1>\n", "cache/page.html": "cached\n", "css/a.css": "a{}\n"},
    )


@pytest.fixture
def app_db(env: Env) -> Path:
    path = env.tmp / "srv" / "app.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("create table t (x)")
        db.execute("insert into t values (1)")
    return path


@pytest.fixture
def configured(
    env: Env, s3_env: S3Env, www: Path, app_db: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Daily files and an hourly database in one configuration; returns the db's spec."""
    db_spec = f"app-db=sqlite://{app_db}"
    settings = {
        "CLOUDBACKUP_SOURCES": f"{www}\n{db_spec}",
        "CLOUDBACKUP_LOCAL_RETENTION": "daily=2",
        "CLOUDBACKUP_REMOTE_RETENTION": "daily=3",
        "CLOUDBACKUP_LOCAL_RETENTION__APP_DB": "hourly=3",
        "CLOUDBACKUP_REMOTE_RETENTION__APP_DB": "hourly=5",
        "CLOUDBACKUP_COMPRESSION__APP_DB": "gzip",
        "CLOUDBACKUP_EXCLUDE__WWW": "cache",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return db_spec


def nights(cli: Any, clock: Clock, db_spec: str, days: int = 3, hours: int = 4) -> None:
    """Each day: both sources at 02:15, then the database alone every hour."""
    for day in range(days):
        if day:
            clock.advance(hours=24 - hours)
        result = cli("backup")
        assert result.exit_code == 0, result.stderr
        for _hour in range(hours):
            clock.advance(hours=1)
            result = cli("backup", db_spec)
            assert result.exit_code == 0, result.stderr


def groups(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["where"], r["source"]): r for r in document["results"]}


def test_hourly_database_and_daily_files_in_one_configuration(
    env: Env, s3_env: S3Env, cli: Any, clock: Clock, configured: str
) -> None:
    nights(cli, clock, configured)
    assert len(env.manifests("www")) == 3 and len(env.manifests("app-db")) == 15
    assert all(p.name.endswith(".tar.gz") for p in env.archives("app-db"))
    # www is a chain (a full, then incrementals): its names say so.
    assert [p.name.endswith(".incr.tar.zst") for p in env.archives("www")] == [False, True, True]
    with tarfile.open(env.archives("app-db")[-1]) as tar:  # gzip, as its own setting says
        assert tar.getnames()
    manifest = json.loads(env.manifests("app-db")[-1].read_text())
    assert (manifest["compression"], manifest["compression_level"]) == ("gzip", 6)

    dry = cli("prune", "--where", "all", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    result = cli("prune", "--where", "all", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    by_group = groups(document)
    policies = {group: r["policy"] for group, r in by_group.items()}
    assert policies == {
        ("local", "app-db"): "hourly=3",
        ("local", "www"): "daily=2",
        ("remote", "app-db"): "hourly=5",
        ("remote", "www"): "daily=3",
    }
    kept = {group: len(r["keep"]) for group, r in by_group.items()}
    assert kept == {
        ("local", "app-db"): 3,
        ("local", "www"): 3,  # daily=2 keeps the two newest, and their base
        ("remote", "app-db"): 5,
        ("remote", "www"): 3,
    }
    (base,) = [k for k in by_group[("local", "www")]["keep"] if k["reasons"][0].startswith("base")]
    assert base["reasons"] == [f"base of {by_group[('local', 'www')]['keep'][0]['id']}"]
    assert {g: r["delete"] for g, r in groups(json.loads(dry.stdout)).items()} == {
        g: r["delete"] for g, r in by_group.items()
    }, "the dry run printed the plan the real run executed"
    assert len(env.manifests("www")) == 3 and len(env.manifests("app-db")) == 3
    remote_db = [k for k in s3_env.keys() if "/app-db/" in k and k.endswith(".manifest.json")]
    remote_www = [k for k in s3_env.keys() if "/www/" in k and k.endswith(".manifest.json")]
    assert (len(remote_db), len(remote_www)) == (5, 3)


def test_the_cache_is_excluded_from_the_files_only(
    env: Env, s3_env: S3Env, cli: Any, configured: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_COMPRESSION", "none")  # a plain tar to read here
    assert cli("backup", "--no-upload").exit_code == 0
    (archive,) = env.archives("www")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(name.endswith("index.html") for name in names)
    assert not any("cache" in name for name in names)


def test_a_central_pruner_applies_each_sources_policy_by_name(
    env: Env, s3_env: S3Env, cli: Any, clock: Clock, configured: str, monkeypatch: Any
) -> None:
    nights(cli, clock, configured, days=2, hours=3)
    # The pruner: no sources of its own, only the policies (and another host name).
    monkeypatch.delenv("CLOUDBACKUP_SOURCES")
    monkeypatch.setenv("CLOUDBACKUP_HOST", "pruner")
    result = cli("prune", "--where", "remote", "--all-hosts", "--json")
    assert result.exit_code == 0, result.stderr
    by_group = groups(json.loads(result.stdout))
    assert {g: r["policy"] for g, r in by_group.items()} == {
        ("remote", "app-db"): "hourly=5",
        ("remote", "www"): "daily=3",
    }
    assert len(by_group[("remote", "app-db")]["keep"]) == 5
    assert len(by_group[("remote", "app-db")]["deleted"]) == 3


def test_run_prunes_offsite_only_the_source_with_a_remote_policy(
    env: Env, s3_env: S3Env, cli: Any, clock: Clock, configured: str, monkeypatch: Any
) -> None:
    monkeypatch.delenv("CLOUDBACKUP_REMOTE_RETENTION")  # a writer, except for the database
    for _night in range(7):
        result = cli("run", "--json")
        assert result.exit_code == 0, result.stderr
        clock.advance(hours=1)
    prunes = json.loads(result.stdout)["prune"]
    assert {(p["where"], p["source"]) for p in prunes} == {
        ("local", "app-db"),
        ("local", "www"),
        ("remote", "app-db"),
    }
    remote = s3_env.keys()
    assert len([k for k in remote if "/app-db/" in k and k.endswith(".manifest.json")]) == 5
    assert len([k for k in remote if "/www/" in k and k.endswith(".manifest.json")]) == 7


def test_an_override_naming_no_configured_source_stops_every_command(
    env: Env, s3_env: S3Env, cli: Any, configured: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION__APP_BD", "hourly=1")
    for command in (["run"], ["prune"], ["backup", "--dry-run"], ["list"]):
        result = cli(*command)
        assert result.exit_code == 2, command
        result.assert_one_error("CLOUDBACKUP_REMOTE_RETENTION__APP_BD", "names no source")
    assert env.archives("www") == [] and s3_env.keys() == []


def test_backup_dry_run_prints_the_plan_with_each_sources_settings(
    env: Env, s3_env: S3Env, cli: Any, configured: str
) -> None:
    human = cli("backup", "--dry-run")
    assert human.exit_code == 0, human.stderr
    assert "dry run: 2 of 2 source(s) would be backed up; nothing written" in human.stdout
    www_line = next(line for line in human.stdout.splitlines() if "www: would archive" in line)
    assert "2 files" in www_line, "the cache is excluded as the real run would"
    assert f"then upload it to s3://{s3_env.bucket}/cloudbackup/testhost/www/www-" in www_line
    db_line = next(line for line in human.stdout.splitlines() if "app-db: would archive" in line)
    assert "(gzip 6)" in db_line and ".tar.gz" in db_line
    document = json.loads(cli("backup", "--dry-run", "--json").stdout)
    plans = {r["source"]: r["plan"] for r in document["results"]}
    assert plans["www"]["files"] == 2 and plans["www"]["compression"] == "zstd"
    assert plans["app-db"]["files"] is None and plans["app-db"]["compression"] == "gzip"
    assert plans["app-db"]["remote_key"].endswith(".tar.gz")
    assert env.archives("www") == [] and s3_env.keys() == []
