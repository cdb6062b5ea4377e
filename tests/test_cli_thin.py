"""The thin CLI: shared options with one meaning each, the ping protocol owned by ``run``'s
use case, and settings read once (the ping URL of a broken configuration, ``_FILE`` forms
and per-source values through the command line)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from cloudbackup.cli.commands import cli as cli_group
from cloudbackup.config import Settings
from cloudbackup.core.errors import ConfigError, LockHeld
from cloudbackup.ops import run as nightly
from tests.conftest import Clock, Env, make_tree
from tests.test_cli_backup import _command_paths
from tests.test_monitor import PingServer


def _commands() -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for path in _command_paths(cli_group):
        command: Any = cli_group
        for name in path:
            command = command.commands[name]
        if path:
            found[" ".join(path)] = command
    return found


def _option(command: click.Command, flag: str) -> click.Option | None:
    return next(
        (p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None
    )


# ---------------------------------------------------------------- shared options


def test_a_shared_option_has_one_meaning_everywhere() -> None:
    """--json, --source, --where, --dry-run, --all-hosts: the same help wherever they are."""
    for flag in ("--json", "--source", "--dry-run", "--all-hosts", "--allow-shrink"):
        helps = {
            name: option.help
            for name, command in _commands().items()
            if (option := _option(command, flag)) is not None
        }
        assert len(helps) >= 2, flag
        assert len(set(helps.values())) == 1, (flag, helps)


def test_host_is_named_by_its_meaning() -> None:
    """`--host` reads another host's backups, or (upload, run) acts as that host."""
    helps = {
        name: option.help
        for name, command in _commands().items()
        if (option := _option(command, "--host")) is not None and name != "iam render"
    }
    acting = {name for name, text in helps.items() if text and text.startswith("Act as")}
    reading = {name for name, text in helps.items() if text and text.startswith("Backups of")}
    assert acting == {"upload", "run"}
    assert reading == {"list", "verify", "restore", "prune", "forget"}
    assert len({helps[name] for name in acting}) == len({helps[name] for name in reading}) == 1


# ---------------------------------------------------------------- run's ping protocol


class Pings:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str, str | None]] = []

    def __call__(self, url: str | None, suffix: str = "", *, body: str | None = None) -> bool:
        self.calls.append((url, suffix, body))
        return True


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> Pings:
    recorded = Pings()
    monkeypatch.setattr("cloudbackup.ops.status.ping", recorded)
    return recorded


def settings(tmp_path: Path, **values: Any) -> Settings:
    from cloudbackup.config import parse_sources

    base: dict[str, Any] = {
        "local_dir": tmp_path / "local",
        "host": "h1",
        "local_only": True,
        "ping_url": "https://hc.example/u",
        "sources": parse_sources(str(tmp_path)),
    }
    return Settings(**(base | values))


def nightly_with(load: Any, report: nightly.RunReport | Exception | None = None, **kw: Any) -> Any:
    def open_context(chosen: Settings) -> Any:
        return chosen

    def run(ctx: Any, options: Any, into: nightly.RunReport) -> nightly.RunReport:
        if isinstance(report, Exception):
            raise report
        if report is not None:
            into.errors += report.errors
        return into

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nightly, "run", run)
        patch.setattr(nightly, "_last_run", lambda ctx, report, options: {})
        patch.setattr(nightly.monitor, "write_last_run", lambda ctx, document: None)
        return nightly.nightly(
            load,
            open_context,
            describe=lambda r: f"summary of {len(r.errors)} error(s)",
            fallback=lambda: nightly.Alerts("h1", "https://fallback.example/u"),
            **kw,
        )


def test_a_good_run_pings_start_then_success(tmp_path: Path, pings: Pings) -> None:
    report = nightly_with(lambda: settings(tmp_path))
    assert report.exit_code == 0
    assert pings.calls == [
        ("https://hc.example/u", "/start", None),
        ("https://hc.example/u", "", None),
    ]


def test_a_failed_run_pings_fail_with_the_summary(tmp_path: Path, pings: Pings) -> None:
    nightly_with(lambda: settings(tmp_path), nightly.RunReport(errors=["prune failed"]))
    assert pings.calls[-1] == ("https://hc.example/u", "/fail", "summary of 1 error(s)")


def test_a_configuration_error_pings_the_fallback_url(pings: Pings) -> None:
    def broken() -> Settings:
        raise ConfigError("CLOUDBACKUP_COMPRESSION='rar' (environment) is invalid")

    with pytest.raises(ConfigError):
        nightly_with(broken)
    ((url, suffix, body),) = pings.calls
    assert (url, suffix) == ("https://fallback.example/u", "/fail")
    assert body is not None and "CLOUDBACKUP_COMPRESSION" in body


def test_a_refused_run_pings_fail_without_start(tmp_path: Path, pings: Pings) -> None:
    from cloudbackup.core.errors import UsageError

    with pytest.raises(UsageError, match="needs a bucket"):
        nightly_with(lambda: settings(tmp_path, local_only=False))
    ((url, suffix, body),) = pings.calls
    assert suffix == "/fail" and body is not None and "CLOUDBACKUP_S3_BUCKET" in body


def test_a_held_lock_pings_fail_without_start(tmp_path: Path, pings: Pings) -> None:
    from cloudbackup.lock import DirLock

    chosen = settings(tmp_path)
    chosen.local_dir.mkdir(parents=True)
    with DirLock(chosen.local_dir), pytest.raises(LockHeld):
        nightly_with(lambda: chosen)
    assert [suffix for _url, suffix, _body in pings.calls] == ["/fail"]


def test_an_unexpected_error_after_start_pings_fail(tmp_path: Path, pings: Pings) -> None:
    full = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        nightly_with(lambda: settings(tmp_path), full)
    assert [suffix for _url, suffix, _body in pings.calls] == ["/start", "/fail"]
    assert "unexpected error: OSError" in str(pings.calls[-1][2])
    assert str(pings.calls[-1][2]).startswith("cloudbackup run on h1: ")


# ---------------------------------------------------------------- through the command line


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    with PingServer() as server:
        yield server


def test_run_pings_fail_with_a_url_read_from_a_file_when_the_config_is_broken(
    env: Env, cli: Any, ping_server: PingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url_file = env.tmp / "ping-url"
    url_file.write_text(ping_server.url + "\n")
    url_file.chmod(0o600)
    monkeypatch.setenv("CLOUDBACKUP_PING_URL_FILE", str(url_file))
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "dayly=7")
    result = cli("run")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_LOCAL_RETENTION", "dayly")
    assert ping_server.calls == [("POST", "/fail")]
    assert "CLOUDBACKUP_LOCAL_RETENTION" in ping_server.pings[0].body


def test_both_forms_of_a_variable_is_one_line_exit_2(
    env: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket_file = env.tmp / "bucket"
    bucket_file.write_text("from-file\n")
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", "from-env")
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET_FILE", str(bucket_file))
    result = cli("list")
    assert result.exit_code == 2
    result.assert_one_error("CLOUDBACKUP_S3_BUCKET", "CLOUDBACKUP_S3_BUCKET_FILE", "both set")


def test_per_source_values_from_the_env_file(
    env: Env, cli: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-source forms and _FILE forms in a .env file, through `backup` and `prune`."""
    www = make_tree(env.tmp / "srv" / "www", {"index.html": "hi\n"})
    docs = make_tree(env.tmp / "srv" / "docs", {"a.txt": "a\n"})
    policy_file = env.tmp / "docs-policy"
    policy_file.write_text("last=1\n")
    (env.work / ".env").write_text(
        f"CLOUDBACKUP_SOURCES={www},{docs}\n"
        "CLOUDBACKUP_LOCAL_RETENTION=last=2\n"
        f"CLOUDBACKUP_LOCAL_RETENTION__DOCS_FILE={policy_file}\n"
        "CLOUDBACKUP_COMPRESSION__DOCS=none\n"
    )
    for _hour in range(3):
        assert cli("backup", "--full").exit_code == 0  # independent backups: no chain kept
        clock.advance(hours=1)
    assert all(p.name.endswith(".tar") for p in env.archives("docs"))
    result = cli("prune", "--json")
    assert result.exit_code == 0, result.stderr
    kept = {r["source"]: len(r["keep"]) for r in json.loads(result.stdout)["results"]}
    assert kept == {"docs": 1, "www": 2}
    assert len(env.manifests("docs")) == 1 and len(env.manifests("www")) == 2
    assert cli("prune", "--policy", "last=1", "--json").exit_code == 0  # --policy beats both
    assert len(env.manifests("www")) == 1


def test_backup_dry_run_judges_the_shrink_guard_as_the_real_run(
    env: Env, cli: Any, clock: Clock
) -> None:
    """The plan goes through the real run's guards: a tree that lost most of its files is
    refused by the dry run too (exit 1), and --allow-shrink lets both through."""
    www = make_tree(env.tmp / "srv" / "www", {f"page{i}.html": "x" for i in range(10)})
    assert cli("backup", www).exit_code == 0
    for i in range(8):
        (www / f"page{i}.html").unlink()
    clock.advance(hours=1)
    dry = cli("backup", "--dry-run", "--json", www)
    assert dry.exit_code == 1
    (result,) = json.loads(dry.stdout)["results"]
    assert "shrank from 10 to 2 files" in result["error"] and "plan" not in result
    allowed = cli("backup", "--dry-run", "--allow-shrink", "--json", www)
    assert allowed.exit_code == 0
    (result,) = json.loads(allowed.stdout)["results"]
    assert result["plan"]["files"] == 2
    assert len(env.archives("www")) == 1
