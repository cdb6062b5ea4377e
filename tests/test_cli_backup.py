"""The `backup` command end to end in-process: exit codes, summaries, one-line errors, JSON,
ids, the clock and shrink guards, dry runs, the lock; plus `list`, `verify`, help and version."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import click
import pytest

from cloudbackup import __version__
from cloudbackup.cli.commands import cli as cli_group
from cloudbackup.lock import DirLock
from cloudbackup.stream import tarwriter as archive
from tests.conftest import CliResult, Clock, Env, make_tree
from tests.manifests import load_manifest

BACKUP_KEYS = {"source", "id", "ok", "size", "seconds", "uploaded", "warnings", "error"}
LIST_KEYS = {"id", "host", "source", "created_at", "size", "local", "remote", "verified"}


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(
        env.tmp / "srv" / "www",
        {"index.html": "<h1>hello</h1>\n", "css/site.css": "body{}\n", "img/logo.svg": "<svg/>"},
    )


def assert_nothing_written(env: Env) -> None:
    host_dir = env.local_dir / env.host
    assert not host_dir.exists() or not any(host_dir.rglob("*.*")), list(host_dir.rglob("*"))


# ---------------------------------------------------------------- success and partial failure


def test_backup_one_source(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    result = cli("backup", www)
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in env.archives("www")] == ["www-20261121T021500Z.tar.zst"]
    assert [p.name for p in env.manifests("www")] == ["www-20261121T021500Z.manifest.json"]
    assert "local-only" in result.stdout
    assert "www-20261121T021500Z" in result.stdout
    assert "error" not in result.stderr.lower() and "Traceback" not in result.stderr
    manifest = load_manifest(env.manifests("www")[0])
    assert (manifest.host, manifest.source, manifest.kind) == ("testhost", "www", "directory")
    assert manifest.file_count == 3
    assert manifest.created_at == "2026-11-21T02:15:00Z"
    assert not list(env.source_dir("www").glob("*.partial"))


def test_sources_from_the_environment(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_tree(env.tmp / "etc", {"a.conf": "a", "b.json": "{}"})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\nconf={other}/*.{{conf,json}}")
    result = cli("backup")
    assert result.exit_code == 0, result.stderr
    assert len(env.archives("www")) == 1 and len(env.archives("conf")) == 1


def test_one_missing_source_fails_alone(env: Env, cli: Any, www: Path) -> None:
    missing = env.tmp / "srv" / "gone"
    result = cli("backup", www, missing)
    assert result.exit_code == 1
    assert len(env.archives("www")) == 1
    assert env.archives("gone") == []
    summary = result.stdout.strip().splitlines()[-1]
    assert "gone" in summary and "1 of 2" in summary
    result.assert_one_error("gone", str(missing))


def test_json_output(env: Env, cli: Any, www: Path) -> None:
    result = cli("backup", "--json", www, env.tmp / "missing")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    ok, failed = document["results"]
    assert BACKUP_KEYS <= set(ok) and BACKUP_KEYS <= set(failed)
    assert ok["ok"] is True and ok["source"] == "www" and ok["id"].startswith("www-")
    assert ok["size"] == env.archives("www")[0].stat().st_size
    assert ok["uploaded"] is False and ok["error"] is None and ok["warnings"] == []
    assert failed["ok"] is False and failed["source"] == "missing" and "missing" in failed["error"]


def test_env_file_in_the_current_directory_and_precedence(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (env.work / ".env").write_text(f"CLOUDBACKUP_COMPRESSION=gzip\nCLOUDBACKUP_SOURCES={www}\n")
    assert cli("backup").exit_code == 0
    assert [p.suffix for p in env.archives("www")] == [".gz"]
    monkeypatch.setenv("CLOUDBACKUP_COMPRESSION", "xz")  # environment beats .env
    assert cli("backup").exit_code == 0
    assert sorted(p.suffix for p in env.archives("www")) == [".gz", ".xz"]
    assert cli("backup", "--compression", "bzip2").exit_code == 0  # command line beats both
    assert sorted(p.suffix for p in env.archives("www")) == [".bz2", ".gz", ".xz"]


def test_env_file_option_and_file_excluded(env: Env, cli: Any, www: Path) -> None:
    env_file = www / "cloudbackup.env"
    env_file.write_text("CLOUDBACKUP_COMPRESSION=none\n")
    result = cli("--env-file", env_file, "backup", www)
    assert result.exit_code == 0, result.stderr
    (path,) = env.archives("www")
    assert path.name.endswith(".tar")
    with tarfile.open(path) as tar:
        assert "cloudbackup.env" not in tar.getnames()
        assert "index.html" in tar.getnames()


def test_unknown_variable_warned(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_BUKET", "my-bucket")
    result = cli("backup", www)
    assert result.exit_code == 0
    assert "CLOUDBACKUP_S3_BUKET" in result.stderr
    assert "warning" in result.stderr.lower()


def test_top_level_symlink_resolved_and_real_path_recorded(env: Env, cli: Any) -> None:
    real = make_tree(env.tmp / "releases" / "42", {"index.html": "v42"})
    current = env.tmp / "current"
    current.symlink_to(real)
    assert cli("backup", current).exit_code == 0
    (manifest_path,) = env.manifests("current")  # named after the link
    manifest = load_manifest(manifest_path)
    assert manifest.file_count == 1
    # SPEC: "a top-level symlink is resolved once and the real path recorded"
    assert str(real) in manifest_path.read_text()


def test_hidden_host_name_backups_are_listed(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name the config accepts must not make its backups invisible (and with them the
    shrink and clock guards, which read the local listing)."""
    monkeypatch.setenv("CLOUDBACKUP_HOST", ".web")
    result = cli("backup", "--json", www)
    if result.exit_code == 2:  # rejected up front: fine, as long as it says why
        result.assert_one_error("CLOUDBACKUP_HOST", ".web")
        return
    assert result.exit_code == 0
    (entry,) = json.loads(result.stdout)["results"]
    listed = json.loads(cli("list", "--where", "local", "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == [entry["id"]]


def test_non_utf8_names_with_a_log_file(
    env: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = env.tmp / "src"
    src.mkdir()
    (src / "ok.txt").write_text("ok")
    os.mkfifo(os.fsencode(src) + b"/pipe\xe9")
    log_file = env.tmp / "log" / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    result = cli("backup", src)
    assert result.exit_code == 0
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr, result.stderr
    log = log_file.read_bytes()
    assert b"FIFO skipped" in log
    assert b"archived 1 file, 2 bytes" in log  # one file, not "1 files"


def test_missing_sqlite_file_fails_and_is_never_created(env: Env, cli: Any, www: Path) -> None:
    db = env.tmp / "var" / "app.db"
    db.parent.mkdir()
    result = cli("backup", f"sqlite://{db}", www)
    assert result.exit_code == 1
    result.assert_one_error(str(db))
    assert not db.exists()
    assert len(env.archives("www")) == 1


# ---------------------------------------------------------------- usage and configuration errors (exit 2)


@pytest.mark.parametrize(
    ("args", "environ", "culprits"),
    [
        ((), {}, ["no sources"]),
        (("--compression", "zip", "{www}"), {}, ["zip"]),
        (("{www}",), {"CLOUDBACKUP_COMPRESSION": "zip"}, ["CLOUDBACKUP_COMPRESSION", "zip"]),
        (
            ("{www}",),
            {"CLOUDBACKUP_COMPRESSION_LEVEL": "42"},
            ["CLOUDBACKUP_COMPRESSION_LEVEL", "42"],
        ),
        (
            ("{www}",),
            {"CLOUDBACKUP_S3_STORAGE_CLASS": "GLACIER"},
            ["CLOUDBACKUP_S3_STORAGE_CLASS", "GLACIER"],
        ),
        (("{www}", "{other}/www"), {}, ["www"]),
        (("/etc/*.conf",), {}, ["/etc/*.conf", "name"]),
        (("x=cmd:",), {}, ["cmd"]),
        (("--env-file", "/nonexistent/.env", "backup", "{www}"), {}, ["/nonexistent/.env"]),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    env: Env,
    cli: Any,
    www: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    environ: dict[str, str],
    culprits: list[str],
) -> None:
    make_tree(env.tmp / "other" / "www", {"f": "x"})
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    argv = [a.format(www=www, other=env.tmp / "other") for a in args]
    if argv[:1] != ["--env-file"]:
        argv = ["backup", *argv]
    result = cli(*argv)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    result.assert_one_error(*culprits)
    assert result.stdout == ""
    assert_nothing_written(env)


def test_config_error_is_the_only_line(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_OBJECT_LOCK", "forever")
    result = cli("backup", www)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        result.assert_one_error("CLOUDBACKUP_S3_OBJECT_LOCK", "forever")
    ]
    # Not a terminal: the log line carries its time first (cron mail, a redirect).
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} error: .*\n", result.stderr)


def test_verbose_still_maps_errors(env: Env, cli: Any) -> None:
    result = cli("-v", "backup")
    assert result.exit_code == 2
    assert "no sources" in result.stderr


# ---------------------------------------------------------------- warnings: unreadable and vanished files


def test_unreadable_file_exit_1_with_warnings_and_backup_kept(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (www / "private.key").write_text("k")
    original = archive._open_nofollow

    def deny(path: str, **kwargs: Any) -> int:
        if path.endswith("private.key"):
            raise PermissionError(13, "Permission denied", path)
        return original(path, **kwargs)

    monkeypatch.setattr(archive, "_open_nofollow", deny)
    result = cli("backup", www)
    assert result.exit_code == 1
    assert "warning" in result.stdout.lower()
    assert "private.key" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(env.archives("www")) == 1 and len(env.manifests("www")) == 1
    manifest = load_manifest(env.manifests("www")[0])
    assert any("private.key" in w for w in manifest.warnings)
    assert manifest.file_count == 3


def test_vanished_file_is_a_warning_exit_0(
    env: Env, cli: Any, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed = www / "tmp-upload.part"
    doomed.write_text("about to go")
    original = archive._open_nofollow

    def vanish(path: str, **kwargs: Any) -> int:
        if path == str(doomed) and os.path.exists(path):
            os.unlink(path)  # deleted between listing and reading
        return original(path, **kwargs)

    monkeypatch.setattr(archive, "_open_nofollow", vanish)
    result = cli("backup", "--json", www)
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["ok"] is True
    assert any("tmp-upload.part" in w and "vanished" in w for w in entry["warnings"])
    assert "tmp-upload.part" in result.stderr
    assert "error:" not in result.stderr.lower()


# ---------------------------------------------------------------- ids and the clock


def test_same_second_gets_a_sequence_suffix(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    for _ in range(3):
        assert cli("backup", www).exit_code == 0
    assert [p.name for p in env.manifests("www")] == [
        "www-20261121T021500Z-2.manifest.json",
        "www-20261121T021500Z-3.manifest.json",
        "www-20261121T021500Z.manifest.json",
    ]
    listed = json.loads(cli("list", "--where", "local", "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == [
        "www-20261121T021500Z",
        "www-20261121T021500Z-2",
        "www-20261121T021500Z-3",
    ]


def test_clock_behind_newest_backup_fails_that_source(
    env: Env, cli: Any, www: Path, clock: Clock
) -> None:
    assert cli("backup", www).exit_code == 0
    other = make_tree(env.tmp / "srv" / "db", {"dump.sql": "x"})
    clock.advance(hours=-1)
    result = cli("backup", www, other)
    assert result.exit_code == 1
    result.assert_one_error("www", "clock")
    assert len(env.archives("www")) == 1  # nothing new
    assert len(env.archives("db")) == 1  # the other source went on


# ---------------------------------------------------------------- shrink guard


def test_empty_directory_refused(env: Env, cli: Any) -> None:
    empty = env.tmp / "srv" / "empty"
    (empty / "only-dirs").mkdir(parents=True)
    result = cli("backup", empty)
    assert result.exit_code == 1
    result.assert_one_error("empty")
    assert env.archives("empty") == []
    assert env.files("empty", "*.partial") == []
    accepted = cli("backup", "--allow-shrink", empty)
    assert accepted.exit_code == 0
    assert len(env.archives("empty")) == 1


def test_shrunk_source_refused_with_numbers(env: Env, cli: Any, clock: Clock) -> None:
    src = make_tree(env.tmp / "srv" / "data", {f"f{i}.txt": "x" * 100 for i in range(10)})
    assert cli("backup", src).exit_code == 0
    for i in range(6):
        (src / f"f{i}.txt").unlink()
    clock.advance(minutes=1)
    result = cli("backup", src)
    assert result.exit_code == 1
    line = result.assert_one_error("data", "10", "4")
    assert "--allow-shrink" in line
    assert len(env.archives("data")) == 1
    assert list(env.source_dir("data").glob("*.partial")) == []
    assert cli("backup", "--allow-shrink", src).exit_code == 0
    assert len(env.archives("data")) == 2
    clock.advance(minutes=1)
    assert cli("backup", src).exit_code == 0  # compared with the accepted backup now


def test_shrink_guard_threshold_from_the_environment(
    env: Env, cli: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "srv" / "data", {f"f{i}.txt": "x" for i in range(10)})
    assert cli("backup", src).exit_code == 0
    for i in range(3):
        (src / f"f{i}.txt").unlink()
    monkeypatch.setenv("CLOUDBACKUP_SHRINK_GUARD", "20%")
    clock.advance(minutes=1)
    assert cli("backup", src).exit_code == 1
    monkeypatch.setenv("CLOUDBACKUP_SHRINK_GUARD", "off")
    assert cli("backup", src).exit_code == 0


def test_root_on_another_filesystem_refused(
    env: Env, cli: Any, www: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("backup", www).exit_code == 0
    real_device = os.stat(www).st_dev
    monkeypatch.setattr(
        "cloudbackup.sources.directory.DirectorySource.root_device", lambda self: real_device + 1
    )
    clock.advance(minutes=1)
    result = cli("backup", www)
    assert result.exit_code == 1
    result.assert_one_error("www", "filesystem")
    assert len(env.archives("www")) == 1
    assert cli("backup", "--allow-shrink", www).exit_code == 0
    assert len(env.archives("www")) == 2


# ---------------------------------------------------------------- dry run


def test_dry_run_writes_nothing(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    result = cli("backup", "--dry-run", www)
    assert result.exit_code == 0, result.stderr
    assert "dry run" in result.stdout
    assert_nothing_written(env)
    assert not env.source_dir("www").exists()
    assert cli("backup", www).exit_code == 0
    before = sorted(p.name for p in env.source_dir("www").iterdir())
    clock.advance(minutes=5)
    result = cli("backup", "--dry-run", www)
    assert result.exit_code == 0
    assert sorted(p.name for p in env.source_dir("www").iterdir()) == before


# ---------------------------------------------------------------- lock


def test_second_concurrent_run_exits_4(env: Env, cli: Any, www: Path) -> None:
    with DirLock(env.local_dir):
        result = cli("backup", www)
    assert result.exit_code == 4
    result.assert_one_error("lock")
    assert env.archives("www") == []
    assert cli("backup", www).exit_code == 0  # released


# ---------------------------------------------------------------- list


def test_list_local_json(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    other = make_tree(env.tmp / "srv" / "app", {"a": "1"})
    assert cli("backup", www, other).exit_code == 0
    clock.advance(hours=1)
    assert cli("backup", www).exit_code == 0
    result = cli("list", "--where", "local", "--json")
    assert result.exit_code == 0
    backups = json.loads(result.stdout)["backups"]
    assert [b["id"] for b in backups] == [
        "app-20261121T021500Z",
        "www-20261121T021500Z",
        "www-20261121T031500Z",
    ]
    for b in backups:
        assert LIST_KEYS <= set(b)
        assert (b["host"], b["local"], b["remote"], b["verified"]) == (
            "testhost",
            True,
            False,
            False,
        )
        name = f"{b['id']}{'.incr' if b['level'] else ''}.tar.zst"
        assert b["size"] == (env.source_dir(b["source"]) / name).stat().st_size
    assert backups[2]["created_at"] == "2026-11-21T03:15:00Z"
    # The second backup of www is an incremental of the first (the name says so).
    assert [(b["level"], b["parent"]) for b in backups] == [
        (0, None),
        (0, None),
        (1, "www-20261121T021500Z"),
    ]
    only = json.loads(cli("list", "--where", "local", "--source", "app", "--json").stdout)
    assert [b["id"] for b in only["backups"]] == ["app-20261121T021500Z"]
    human = cli("list", "--where", "local")
    assert "www-20261121T031500Z" in human.stdout


def test_list_ignores_incomplete_backups(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    assert cli("backup", www).exit_code == 0
    directory = env.source_dir("www")
    (directory / "www-20261121T030000Z.tar.zst.partial").write_bytes(b"half")
    (directory / "www-20261121T040000Z.tar.zst").write_bytes(b"no manifest")
    (directory / "README").write_text("junk")
    backups = json.loads(cli("list", "--where", "local", "--json").stdout)["backups"]
    assert [b["id"] for b in backups] == ["www-20261121T021500Z"]


def test_list_empty(env: Env, cli: Any) -> None:
    result = cli("list", "--where", "local", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"backups": []}


# ---------------------------------------------------------------- verify


def test_verify_detects_a_flipped_byte(env: Env, cli: Any, www: Path) -> None:
    assert cli("backup", www).exit_code == 0
    good = cli("verify")
    assert good.exit_code == 0, good.stderr
    assert "ok" in good.stdout
    (path,) = env.archives("www")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    bad = cli("verify")
    assert bad.exit_code == 3
    assert "FAIL" in bad.stdout and path.name.split(".")[0] in bad.stdout
    as_json = cli("verify", "--json")
    assert as_json.exit_code == 3
    (entry,) = json.loads(as_json.stdout)["results"]
    assert entry["ok"] is False and entry["where"] == "local" and "sha256" in entry["detail"]


def test_verify_deep_and_by_id(env: Env, cli: Any, www: Path, clock: Clock) -> None:
    assert cli("backup", www).exit_code == 0
    result = cli("verify", "--deep", "www-20261121T021500Z")
    assert result.exit_code == 0, result.stderr
    assert "3 files" in result.stdout
    missing = cli("verify", "www-20200101T000000Z")
    assert missing.exit_code == 2
    missing.assert_one_error("www-20200101T000000Z")


def test_verify_detects_truncation(env: Env, cli: Any, www: Path) -> None:
    assert cli("backup", www).exit_code == 0
    (path,) = env.archives("www")
    path.write_bytes(path.read_bytes()[:-10])
    result = cli("verify", "--json")
    assert result.exit_code == 3
    assert "size" in json.loads(result.stdout)["results"][0]["detail"]


# ---------------------------------------------------------------- help and version


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


@pytest.mark.parametrize(
    "path", _command_paths(cli_group), ids=lambda p: " ".join(p) or "cloudbackup"
)
def test_every_command_has_help(env: Env, cli: Any, path: tuple[str, ...]) -> None:
    result: CliResult = cli(*path, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: cloudbackup")
    assert result.stderr == ""


def test_spec_commands_exist() -> None:
    names = set(cli_group.commands)
    assert {
        "backup",
        "upload",
        "list",
        "verify",
        "restore",
        "prune",
        "run",
        "status",
        "check",
        "iam",
    } <= names


def test_version(env: Env, cli: Any) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout and "cloudbackup" in result.stdout


def test_list_remote_without_bucket_is_a_usage_error(env: Env, cli: Any) -> None:
    result = cli("list", "--where", "remote")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_S3_BUCKET")
