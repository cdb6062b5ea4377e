"""What an operator meets on the command line (issue 16), in-process and local-only: quiet
commands, configured sources by name, `-v`'s decisions and timings, one wording, progress
estimates, "refused" as exit 2, retry messages, help texts, space freed by prune, `run`'s
options, `schedule` and shell completion."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cloudbackup.cli.commands import cli as cli_group
from cloudbackup.cli.output import Progress, ProgressLine
from cloudbackup.core.errors import TransientStorageError
from cloudbackup.core.words import plural, size
from cloudbackup.storage.retry import RetryPolicy
from tests.conftest import Clock, Env, make_tree
from tests.s3_helpers import Sleeps
from tests.test_s3_unit import Flaky
from tests.test_sqlite_source import HOLDER, make_db

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hi</h1>\n", "a/b.txt": "b\n"})


@pytest.fixture
def docs(env: Env) -> Path:
    return make_tree(env.tmp / "srv" / "docs", {"readme.txt": "read me\n"})


@pytest.fixture
def local_only(
    env: Env, www: Path, docs: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> Env:
    """Two configured sources, no bucket, intended so (a `run` may go)."""
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{docs}")
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    return env


# ---------------------------------------------------------------- 1: quiet


def test_quiet_commands_print_nothing_when_they_succeed(
    local_only: Env, cli: Any, clock: Clock
) -> None:
    for args in (
        ("run",),
        ("backup",),
        ("verify",),
        ("prune",),
        ("prune", "--dry-run"),
        ("status",),
        ("check",),
        ("backup", "www", "--dry-run"),
    ):
        clock.advance(hours=1)
        result = cli("-q", *args)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "", ""), args


def test_quiet_never_hides_what_a_command_exists_to_print(
    local_only: Env, cli: Any
) -> None:
    assert cli("-q", "backup").exit_code == 0
    assert "www-" in cli("-q", "list").stdout
    assert json.loads(cli("-q", "status", "--json").stdout)["state"] == "OK"
    assert json.loads(cli("-q", "verify", "--json").stdout)["results"]
    assert '"Statement"' in cli("-q", "iam", "render", "--bucket", "my-backups", "--prefix", "p").stdout
    assert "cloudbackup" in cli("-q", "schedule", "cron").stdout


def test_quiet_failure_prints_its_summary_and_its_errors(
    local_only: Env, cli: Any, env: Env, monkeypatch: pytest.MonkeyPatch, www: Path
) -> None:
    gone = env.tmp / "srv" / "gone"
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{gone}")
    result = cli("-q", "run")
    assert result.exit_code == 1
    assert "1 of 2 source(s) backed up; failed: gone" in result.stdout
    assert "run completed with failures" in result.stdout
    result.assert_one_error("source gone", "does not exist")
    status = cli("-q", "status")
    assert status.exit_code == 2 and "status: CRITICAL" in status.stdout  # gone: no backup


def test_quiet_config_error_is_its_one_line(local_only: Env, cli: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("CLOUDBACKUP_COMPRESSION", "rar")
    result = cli("-q", "run")
    assert result.exit_code == 2 and result.stdout == ""
    result.assert_one_error("CLOUDBACKUP_COMPRESSION", "rar")


# ---------------------------------------------------------------- 6: configured sources by name


def test_backup_name_is_the_configured_source(
    local_only: Env, cli: Any, env: Env, www: Path, clock: Clock
) -> None:
    os.chdir(env.tmp)  # a directory named `www` is not what `backup www` means
    (env.tmp / "www").mkdir()
    result = cli("backup", "--json", "www")
    assert result.exit_code == 0, result.stderr
    (only,) = json.loads(result.stdout)["results"]
    assert only["source"] == "www" and only["file_count"] == 2  # /srv/www, not ./www
    assert env.archives("docs") == []


def test_backup_source_option_picks_configured_sources(
    local_only: Env, cli: Any, env: Env, clock: Clock
) -> None:
    result = cli("backup", "--json", "--source", "docs", "--source", "www")
    assert result.exit_code == 0, result.stderr
    assert [r["source"] for r in json.loads(result.stdout)["results"]] == ["docs", "www"]
    unknown = cli("backup", "--source", "wwww")
    assert unknown.exit_code == 2
    unknown.assert_one_error("no configured source named 'wwww'", "configured: www, docs")
    assert len(env.archives("www")) == 1


def test_backup_names_and_specs_together(
    local_only: Env, cli: Any, env: Env, clock: Clock
) -> None:
    extra = make_tree(env.tmp / "extra", {"x.txt": "x\n"})
    result = cli("backup", "--json", "docs", str(extra))
    assert result.exit_code == 0, result.stderr
    assert [r["source"] for r in json.loads(result.stdout)["results"]] == ["docs", "extra"]
    assert cli("backup", "--source", "docs", str(extra)).exit_code == 2


# ---------------------------------------------------------------- 7: -v


def test_verbose_logs_decisions_and_timings(local_only: Env, cli: Any, clock: Clock) -> None:
    assert cli("run").exit_code == 0
    clock.advance(days=1)
    result = cli("-v", "run")
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    for phase in ("recover", "backup", "prune", "archive www", "check www"):
        assert re.search(rf"phase {phase}: done in \d+\.\d{{3}}s", err), (phase, err)
    assert "backing up www, docs; upload: none" in err
    assert "www: previous backup www-20261121T021500Z (2 files, 14 bytes)" in err
    assert "www: zstd level 3; excludes: none; shrink guard 50%" in err
    assert re.search(r"local testhost/www: keep www-20261122T021500Z \(last 1/3\)", err)
    quiet_about_it = cli("run").stderr
    assert "phase" not in quiet_about_it and "previous backup" not in quiet_about_it


def test_verbose_says_what_the_walk_left_out_and_why(
    local_only: Env, cli: Any, env: Env, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(www / "cache", {"c.bin": "c\n"})
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(www / "backups"))  # inside the source
    assert cli("backup", "www").exit_code == 0  # creates the local dir
    result = cli("-v", "backup", "www", "--exclude", "cache")
    assert result.exit_code == 0, result.stderr
    assert f"{www}/cache: excluded (CLOUDBACKUP_EXCLUDE, --exclude)" in result.stderr
    assert f"{www}/backups: skipped (the local dir, the log or the .env file)" in result.stderr
    plain = cli("backup", "www", "--exclude", "cache").stderr
    assert "excluded" not in plain and "skipped" not in plain


def test_a_file_name_cannot_forge_a_log_line(
    local_only: Env, cli: Any, env: Env, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name from the walked tree holding a newline would start a line of its own: a
    forged priority for journald (``<0>``: emergency), a forged entry in cron's mail or the
    log file. It is shown escaped, on the line of the warning that names it."""
    os.mkfifo(www / "evil\n<0>forged\n2026-01-01T00:00:00+0000 ERROR forged\x1b[2K")
    log_file = env.tmp / "log" / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    result = cli("backup")
    assert result.exit_code == 0, result.stderr
    for text in (result.stderr, log_file.read_text()):
        (line,) = [li for li in text.splitlines() if "forged" in li]
        assert line.endswith("evil\\n<0>forged\\n2026-01-01T00:00:00+0000 ERROR forged\\x1b[2K: FIFO skipped")
        assert "\x1b" not in text


def test_a_report_line_cannot_be_forged_by_a_message_from_outside() -> None:
    """An error from a remote store (its XML message) or a child process may hold a
    newline; the summary (cron's mail, the journal) shows it escaped, on its own line."""
    from cloudbackup.cli import output
    from cloudbackup.ops.backup import SourceResult
    from cloudbackup.ops.run import RunReport
    from cloudbackup.ops.upload import UploadResult
    from cloudbackup.ops.verify import VerifyResult

    forged = "denied\n<0>run succeeded in 0.1s (exit 0)"
    report = RunReport(
        results=[SourceResult("www", id="www-1", archived=True, upload_error=forged)],
        uploads=[UploadResult("www-0", "www", forged)],
        verifies=[VerifyResult("www-1", "remote", forged)],
        errors=[forged],
        notes=[forged],
    )
    text = output.run_summary(report)
    assert not any(line.startswith("<0>") for line in text.splitlines()), text
    assert text.count("denied\\n<0>run succeeded") == 5, text
    assert text.splitlines()[-1] == "run found an integrity failure in 0.0s (exit 3)"


# ---------------------------------------------------------------- 9: one wording


def test_words(local_only: Env, cli: Any, env: Env, www: Path, monkeypatch: Any) -> None:
    assert (plural(1, "file"), plural(2, "file"), plural(1, "copy"), plural(3, "copy")) == (
        "1 file", "2 files", "1 copy", "3 copies"
    )  # fmt: skip
    assert (size(512), size(72566 * 1024**2), size(None)) == ("512 B", "70.9 GiB", "-")
    assert cli("backup").exit_code == 0
    # `list` says "both"; `--where both` is `--where all`.
    both = cli("list", "--where", "both")
    assert both.exit_code == 0 and "www-" in both.stdout
    # `check` names a source once; the free space reads as a size.
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"{www}\n{env.tmp / 'nowhere'}")
    checked = cli("check").stdout
    line = next(li for li in checked.splitlines() if "nowhere" in li)
    assert line.count("source nowhere") == 1, line
    free = next(li for li in checked.splitlines() if li.startswith("ok   local dir:"))
    assert re.search(r", \d+(\.\d)? (B|KiB|MiB|GiB|TiB) free$", free), free
    # Click's own errors read as ours.
    bad = cli("iam", "render", "--role", "admin", "--bucket", "b")
    assert bad.exit_code == 2 and "Error:" not in bad.stderr
    bad.assert_one_error("--role", "admin")
    # One file is one file.
    single = make_tree(env.tmp / "one", {"only.txt": "1\n"})
    plan = cli("backup", "--dry-run", str(single)).stdout
    assert "would archive 1 file, " in plan
    assert cli("backup", "hello=cmd:echo hello").exit_code == 0
    deep = cli("verify", "--deep", "--source", "hello")
    assert deep.exit_code == 0 and "; 1 file, 6 bytes walked" in deep.stdout, deep.stdout
    # `run` shows a verify result as `verify` does (see the integration tests for a bucket).


# ---------------------------------------------------------------- 11: progress


def test_progress_estimates_from_the_previous_backup_show_files_and_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    screen = io.StringIO()
    now = [0.0]
    line = ProgressLine(screen)
    bar = Progress("archive www", None, tty=True, line=line, clock=lambda: now[0])
    upload = Progress("upload www-1", None, tty=True, line=line, clock=lambda: now[0])
    bar.estimate(files=10, nbytes=1000)
    for _ in range(4):
        bar.count_file()
    now[0] = 1.0
    bar(500)
    upload(256)
    drawn = screen.getvalue().split("\r")[-1]
    assert "archive www: 4 of ~10 files, 500 B of ~1000 B ( 45%)" in drawn
    assert " | upload www-1: 256 B" in drawn  # both bars on one line
    bar.estimate(files=2, nbytes=100)  # the tree grew: an estimate never shows done early
    assert bar.fraction() == 0.99
    bar.close()
    upload.close()
    assert "archive www: 4 of 4 files, 500 B of 500 B (100%)" in screen.getvalue()
    assert screen.getvalue().endswith("\n") and line.bars == []


def test_the_archive_progress_gets_the_previous_backup_as_its_estimate(
    local_only: Env, cli: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, dict[str, Any], int]] = []

    class Recorder:
        tty = True  # a bar on a terminal: it counts files

        def __init__(self, label: str) -> None:
            self.label, self.files, self.estimated = label, 0, {}

        def __call__(self, n: int) -> None:
            pass

        def estimate(self, **totals: Any) -> None:
            self.estimated = totals

        def count_file(self) -> None:
            self.files += 1

        def close(self) -> None:
            seen.append((self.label, self.estimated, self.files))

    def factory() -> Callable[[str, int | None], Any]:
        return lambda label, total: Recorder(label)

    monkeypatch.setattr("cloudbackup.cli.commands._progress_factory", factory)
    assert cli("backup", "--source", "www").exit_code == 0
    clock.advance(hours=1)
    assert cli("backup", "--source", "www").exit_code == 0
    assert seen[0] == ("archive www", {}, 2)  # the first backup: nothing to go by
    label, estimated, files = seen[1]
    assert (label, estimated["files"], files) == ("archive www", 2, 2)
    assert estimated["nbytes"] >= 14  # the previous content, plus the members' headers
    # Not on a terminal (cron: a log line now and then), no step per member counts files.
    Recorder.tty = False
    clock.advance(hours=1)
    assert cli("backup", "--source", "www").exit_code == 0
    label, estimated, files = seen[2]
    assert (label, estimated["files"], files) == ("archive www", None, 0)
    assert estimated["nbytes"] >= 14


def test_no_progress_bar_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudbackup.cli import commands

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(commands, "_state", lambda: commands.AppState(quiet=True))
    assert commands._progress_factory()("archive www", None).tty is False  # type: ignore[attr-defined]
    monkeypatch.setattr(commands, "_state", lambda: commands.AppState())
    assert commands._progress_factory()("archive www", None).tty is True  # type: ignore[attr-defined]


# ---------------------------------------------------------------- 12: refused is exit 2


def test_restoring_over_a_sqlite_database_in_use_is_refused_exit_2(
    env: Env, cli: Any, clock: Clock
) -> None:
    database = make_db(env.tmp / "app.db", rows=3, wal=True)
    assert cli("backup", f"sqlite://{database}").exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(database), "write"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = cli("restore", "app", "--to", database)
        assert result.exit_code == 2
        result.assert_one_error("in use by another process", "stop the app")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert not list(env.tmp.glob("app.db.before-restore-*"))


# ---------------------------------------------------------------- 13: retry messages


def test_retry_warnings_and_the_final_error_show_no_query_strings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = '"http://127.0.0.1:9/bucket/key?uploadId=SECRETish&partNumber=3&X-Amz-Signature=ab"'
    flaky = Flaky(*[TransientStorageError(f"Could not connect to {url}")] * 3)
    sleeps = Sleeps()
    policy = RetryPolicy(attempts=3, base=0.5, sleep=sleeps)
    with caplog.at_level(logging.WARNING, logger="cloudbackup"), pytest.raises(
        TransientStorageError
    ) as caught:
        policy.call("upload part 3", flaky.op)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    for message in [*messages, str(caught.value)]:
        assert "http://127.0.0.1:9/bucket/key" in message and "uploadId" not in message
    assert "gave up after 3 attempts" in str(caught.value)
    for message in messages:
        assert re.search(r"retrying (in \d+(\.\d)?m?s|at once)$", message), message
        assert "0.0s" not in message


# ---------------------------------------------------------------- 14: help and README


def test_help_texts_give_examples_and_formats() -> None:
    runner = CliRunner()
    backup_help = runner.invoke(cli_group, ["backup", "--help"]).output
    assert "Examples:" in backup_help and "cloudbackup backup www" in backup_help
    assert "cloudbackup backup /srv/www" in backup_help
    status_help = runner.invoke(cli_group, ["status", "--help"]).output
    assert "--max-age DURATION" in status_help and "26h" in status_help and "8d" in status_help
    run_help = runner.invoke(cli_group, ["run", "--help"]).output
    for option in ("--source NAME", "--full", "--dry-run"):
        assert option in run_help


def test_readme_says_what_an_operator_needs() -> None:
    assert "iam render [--role writer\\|pruner\\|restorer\\|bucket-policy]" in README
    assert "_CLOUDBACKUP_COMPLETE=bash_source cloudbackup" in README
    assert "python -m moto.server" in README  # a local S3 to try it with
    assert "cloudbackup schedule cron" in README and "--log-json" in README


def test_shell_completion_is_clicks(env: Env) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cloudbackup"],
        env=os.environ | {"_CLOUDBACKUP_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "_CLOUDBACKUP_COMPLETE=bash_complete" in done.stdout


# ---------------------------------------------------------------- 15: space freed


def test_prune_reports_bytes_kept_and_freed(
    local_only: Env, cli: Any, clock: Clock, env: Env
) -> None:
    for _ in range(3):  # independent fulls: a chain would keep its ancestors
        assert cli("backup", "--full", "--source", "www").exit_code == 0
        clock.advance(hours=1)
    sizes = sorted(p.stat().st_size for p in env.archives("www"))
    dry = cli("prune", "--policy", "last=1", "--dry-run", "--json")
    (group,) = json.loads(dry.stdout)["results"]
    newest = env.archives("www")[-1].stat().st_size
    assert group["kept_bytes"] == newest and group["freed_bytes"] == sum(sizes) - newest
    human = cli("prune", "--policy", "last=1", "--dry-run").stdout
    assert f"space         {size(newest)} kept, {size(sum(sizes) - newest)} would be freed" in human
    real = cli("prune", "--policy", "last=1", "--json")
    document = json.loads(real.stdout)
    assert document["freed_bytes"] == sum(sizes) - newest == document["results"][0]["freed_bytes"]
    again = json.loads(cli("prune", "--policy", "last=1", "--json").stdout)
    assert again["freed_bytes"] == 0 and again["kept_bytes"] == newest


# ---------------------------------------------------------------- run's options, schedule


def test_run_source_backs_up_and_prunes_only_that_source(
    local_only: Env, cli: Any, clock: Clock, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION", "last=1")
    assert cli("run").exit_code == 0
    clock.advance(hours=1)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_RETENTION__DOCS", "last=5")
    result = cli("run", "--source", "docs", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [r["source"] for r in document["results"]] == ["docs"]
    assert {p["source"] for p in document["prune"]} == {"docs"}
    assert len(env.archives("docs")) == 2 and len(env.archives("www")) == 1
    # The state file keeps what the last full run said about www.
    state = json.loads((env.local_dir / ".state" / "testhost.last-run.json").read_text())
    assert sorted(r["source"] for r in state["results"]) == ["docs", "www"]
    unknown = cli("run", "--source", "nope")
    assert unknown.exit_code == 2
    unknown.assert_one_error("no configured source named 'nope'")


def test_run_full_is_passed_to_the_backup(
    local_only: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloudbackup.ops import backup as backing

    received: list[Any] = []
    real = backing.backup

    def spy(ctx: Any, specs: Any, options: Any, **kw: Any) -> Any:
        received.append(options)
        return real(ctx, specs, options, **kw)

    monkeypatch.setattr(backing, "backup", spy)
    assert cli("run", "--full").exit_code == 0
    assert cli("run").exit_code == 0
    assert [options.full for options in received] == [True, False]


def test_schedule_prints_units_for_this_installation(env: Env, cli: Any) -> None:
    cron = cli("schedule", "cron", "--at", "03:30")
    assert cron.exit_code == 0
    job = next(line for line in cron.stdout.splitlines() if line.startswith("30 3 "))
    assert job.startswith("30 3 * * * root /") and job.endswith(
        "--env-file /etc/cloudbackup.env -q run"
    )
    systemd = cli("--env-file", str(env.tmp / "cb.env"), "schedule", "systemd")
    assert systemd.exit_code == 2  # that env file does not exist
    (env.tmp / "cb.env").write_text(f"CLOUDBACKUP_LOCAL_DIR={env.tmp / 'backups'}\n")
    systemd = cli("--env-file", str(env.tmp / "cb.env"), "schedule", "systemd")
    assert systemd.exit_code == 0
    text = systemd.stdout
    assert "# /etc/systemd/system/cloudbackup.service" in text
    assert "# /etc/systemd/system/cloudbackup.timer" in text
    assert f"--env-file {env.tmp / 'cb.env'} run" in text
    assert "OnCalendar=*-*-* 02:15:00" in text
    assert f"ReadWritePaths={env.local_dir} /var/log" in text  # the configured local dir
    bad = cli("schedule", "cron", "--at", "25:00")
    assert bad.exit_code == 2
    bad.assert_one_error("--at", "25:00")


def test_the_systemd_unit_may_write_a_directory_destination(env: Env, cli: Any) -> None:
    """Under ProtectSystem=strict a directory destination that is not in ReadWritePaths=
    is read-only: every upload of the nightly service would fail."""
    dest = env.tmp / "nas backups"
    dest.mkdir()
    env_file = env.tmp / "cb.env"
    env_file.write_text(f"CLOUDBACKUP_DEST={dest.as_uri()}\n")
    systemd = cli("--env-file", str(env_file), "schedule", "systemd")
    assert systemd.exit_code == 0, systemd.stderr
    (line,) = [li for li in systemd.stdout.splitlines() if li.startswith("ReadWritePaths=")]
    assert line == f"ReadWritePaths={env.local_dir} \"{dest}\" /var/log", line


# ---------------------------------------------------------------- who hears of a refused run


def test_a_run_refused_before_it_started_is_notified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration error (the targets read on their own) and the lock held: the failure
    notification goes out as it does for a failed night, with the error as the summary."""
    from cloudbackup.config import Settings, parse_sources
    from cloudbackup.core.errors import ConfigError, LockHeld
    from cloudbackup.lock import DirLock
    from cloudbackup.ops import notify
    from cloudbackup.ops import run as nightly

    sent: list[notify.Message] = []
    monkeypatch.setattr(notify, "send", lambda urls, message: sent.append(message) or [])
    monkeypatch.setattr(notify, "validate", lambda urls: None)
    monkeypatch.setattr(nightly.monitor, "ping", lambda *a, **k: True)
    targets = ("json://hooks.example.org/cb",)
    logs = nightly.LogView(tail=lambda: ("INFO something happened",), redact=str)

    def broken() -> Settings:
        raise ConfigError("CLOUDBACKUP_COMPRESSION='rar' (environment) is invalid")

    with pytest.raises(ConfigError):
        nightly.nightly(
            broken, lambda s: s, describe=str, logs=logs,  # type: ignore[arg-type, return-value]
            fallback=lambda: nightly.Alerts("web1", None, targets),
        )  # fmt: skip
    chosen = Settings(
        local_dir=tmp_path, host="web1", local_only=True, notify=targets,
        sources=parse_sources(str(tmp_path)),
    )  # fmt: skip
    with DirLock(tmp_path), pytest.raises(LockHeld):
        nightly.nightly(
            lambda: chosen, lambda s: s, describe=str, logs=logs,  # type: ignore[arg-type, return-value]
            fallback=lambda: nightly.Alerts("unused"),
        )  # fmt: skip
    assert [m.title for m in sent] == [
        "cloudbackup web1: failed (exit 2)",
        "cloudbackup web1: failed (exit 4)",
    ]
    assert "CLOUDBACKUP_COMPRESSION='rar'" in sent[0].body
    assert "another cloudbackup run holds the lock" in sent[1].body
    assert all("INFO something happened" in m.body for m in sent)


def test_check_checks_the_notification_targets(
    local_only: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", "json://hooks.example.org/cb")
    good = cli("check")
    assert good.exit_code == 0, good.stdout
    assert "ok   notifications: 1 target accepted by Apprise, on failure" in good.stdout
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", "json://hooks.example.org/cb\nnope://s3cret@x")
    bad = cli("check")
    assert bad.exit_code == 1
    line = next(li for li in bad.stdout.splitlines() if li.startswith("FAIL notifications:"))
    assert "entry 2, nope://***" in line and "s3cret" not in bad.stdout + bad.stderr
