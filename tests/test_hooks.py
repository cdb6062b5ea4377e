"""Hooks: `/bin/sh -c` in the scrubbed child environment with the run's result, output to the
log, a timeout that kills the whole process group, the 0600 summary file, and which hooks run
for which outcome."""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbackup.cli.output import RedactingFilter
from cloudbackup.core.errors import ConfigError
from cloudbackup.ops import hooks
from cloudbackup.ops.hooks import (
    Hook,
    Hooks,
    after_hooks,
    parse_timeout,
    result_env,
    run_hook,
    summary_file,
)

BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "AWS_SESSION_TOKEN": "aws-session-token",
    "AWS_SECRET_ACCESS_KEY_FILE": "/run/secrets/aws",
    "AWS_REGION": "eu-west-1",
    "CLOUDBACKUP_SOURCES": "postgresql://app:pg-secret@db/shop",
    "CLOUDBACKUP_S3_BUCKET": "my-backups",
    "CLOUDBACKUP_NOTIFY": "mailto://ops:mail-secret@smtp.example.org",
    "PGPASSWORD": "pg-secret",
    "PGPASSFILE": "/root/.pgpass",
}


REDACT = RedactingFilter(["aws-secret-value", "pg-secret", "mail-secret"]).redact


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def log() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("cloudbackup")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not us (killed all the same)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_dead(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.05)
    return _dead(pid)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("text", "seconds"), [(None, 600), ("", 600), ("10m", 600), ("90s", 90), ("2h", 7200)])
def test_timeout_parses(text: str | None, seconds: float) -> None:
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("text", ["0s", "10", "ten minutes", "-5m", "1.5m"])
def test_bad_timeout_is_a_config_error_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_timeout(text)
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith("CLOUDBACKUP_HOOK_TIMEOUT:")


def test_hooks_from_values() -> None:
    parsed = Hooks.from_values(
        {
            "CLOUDBACKUP_BEFORE_RUN": "systemctl stop app",
            "CLOUDBACKUP_AFTER_RUN": "  ",
            "CLOUDBACKUP_HOOK_TIMEOUT": "30s",
        }
    )
    assert parsed == Hooks(before_run="systemctl stop app", timeout=30.0)
    with pytest.raises(ConfigError, match="CLOUDBACKUP_ON_FAILURE holds a NUL"):
        Hooks.from_values({"CLOUDBACKUP_ON_FAILURE": "echo a\x00b"})


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("ok", [Hook.AFTER_RUN]),
        ("warning", [Hook.AFTER_RUN]),
        ("failed", [Hook.AFTER_RUN, Hook.ON_FAILURE]),
    ],
)
def test_after_run_always_on_failure_only_when_failed(outcome: str, expected: list[Hook]) -> None:
    configured = Hooks(before_run="b", after_run="a", on_failure="f")
    assert [hook for hook, _command in after_hooks(configured, outcome)] == expected
    only_failure = Hooks(on_failure="f")
    assert [h for h, _ in after_hooks(only_failure, outcome)] == [
        h for h in expected if h is Hook.ON_FAILURE
    ]
    with pytest.raises(ValueError, match="unknown outcome"):
        after_hooks(configured, "interrupted")


# --------------------------------------------------------------------------- environment


def test_hook_gets_scrubbed_environment_and_the_result(tmp_path: Path, log: Records) -> None:
    dump = tmp_path / "env.txt"
    with summary_file({"results": [{"source": "www", "ok": False}], "exit_code": 1}) as summary:
        result = run_hook(
            Hook.AFTER_RUN,
            f'env > "{dump}"; cat "$CLOUDBACKUP_SUMMARY" > "{tmp_path}/summary.json"; '
            f'stat -c %a "$CLOUDBACKUP_SUMMARY" > "{tmp_path}/mode"',
            base_env=BASE_ENV, redact=REDACT,
            extra_env=result_env("failed", 1, summary),
            timeout=30,
        )
        assert summary.exists()
    assert result.ok and result.exit_code == 0 and not result.timed_out
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    for secret in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_SECRET_ACCESS_KEY_FILE", "CLOUDBACKUP_SOURCES", "CLOUDBACKUP_S3_BUCKET",
        "CLOUDBACKUP_NOTIFY", "PGPASSWORD", "PGPASSFILE",
    ):
        assert secret not in env, secret
    text = dump.read_text()
    for value in ("aws-secret-value", "pg-secret", "mail-secret", "AKIAEXAMPLEKEY"):
        assert value not in text
    assert env["CLOUDBACKUP_RESULT"] == "failed"
    assert env["CLOUDBACKUP_EXIT_CODE"] == "1"
    assert env["CLOUDBACKUP_SUMMARY"] == str(summary)
    assert env["AWS_REGION"] == "eu-west-1" and env["LANG"] == "C.UTF-8"  # not secrets
    # The summary file: the run's JSON document, mode 0600, removed afterwards.
    assert '"source": "www"' in (tmp_path / "summary.json").read_text()
    assert (tmp_path / "mode").read_text().strip() == "600"
    assert not summary.exists()


def test_summary_file_is_removed_even_when_the_hook_deleted_or_replaced_it(tmp_path: Path) -> None:
    with summary_file({"exit_code": 0}, directory=tmp_path) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.parent == tmp_path
        path.unlink()
    with summary_file({"exit_code": 0}, directory=tmp_path) as path:
        path.write_text("changed")
    assert list(tmp_path.iterdir()) == []


def test_before_hook_gets_no_result_variables(tmp_path: Path) -> None:
    dump = tmp_path / "env.txt"
    result = run_hook(Hook.BEFORE_RUN, f'env > "{dump}"', base_env=BASE_ENV, redact=REDACT, timeout=30)
    assert result.ok
    assert "CLOUDBACKUP_" not in dump.read_text()


# --------------------------------------------------------------------------- results and output


def test_output_goes_to_the_log_and_the_tail_is_redacted(log: Records) -> None:
    redact = RedactingFilter(["hunter2"]).redact
    result = run_hook(
        Hook.BEFORE_RUN,
        "echo stopping app; echo 'password=hunter2' >&2; printf 'bad \\377 byte \\033[2J\\n'; exit 0",
        base_env=BASE_ENV, timeout=30, redact=redact,
    )
    assert result.ok
    assert result.output == ("stopping app", "password=***", "bad \\xff byte \\x1b[2J")
    assert "hook before-run: stopping app" in log.messages
    assert "hook before-run: bad \\xff byte \\x1b[2J" in log.messages  # one line, no escape codes
    assert any(m.startswith("hook before-run succeeded") for m in log.messages)


def test_failing_hook_reports_its_exit_code(log: Records) -> None:
    result = run_hook(Hook.AFTER_RUN, "echo cannot restart app; exit 3", base_env=BASE_ENV, redact=REDACT, timeout=30)
    assert not result.ok and result.exit_code == 3 and not result.timed_out
    assert result.output == ("cannot restart app",)
    assert result.message == "hook after-run failed: exit code 3"
    warning = [r for r in log.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warning] == ["hook after-run failed: exit code 3"]


def test_hook_killed_by_a_signal() -> None:
    result = run_hook(Hook.AFTER_RUN, "kill -KILL $$", base_env=BASE_ENV, redact=REDACT, timeout=30)
    assert not result.ok and result.exit_code == -signal.SIGKILL
    assert result.error == "killed by signal 9"


def test_shell_that_cannot_start_is_a_failed_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "SHELL", "/nonexistent/sh")
    result = run_hook(Hook.BEFORE_RUN, "true", base_env=BASE_ENV, redact=REDACT, timeout=30)
    assert not result.ok and result.exit_code is None
    assert result.error is not None and "cannot start /nonexistent/sh" in result.error


# --------------------------------------------------------------------------- timeout


def test_timeout_kills_the_hook_and_the_child_it_started(tmp_path: Path, log: Records) -> None:
    pid_file = tmp_path / "child.pid"
    result = run_hook(
        Hook.BEFORE_RUN,
        f'sleep 300 & echo $! > "{pid_file}"; echo waiting; wait',
        base_env=BASE_ENV, redact=REDACT, timeout=1, kill_grace=2,
    )
    assert result.timed_out and not result.ok and result.exit_code is None
    assert "timed out after 1s" in (result.error or "")
    assert result.output == ("waiting",)
    child = int(pid_file.read_text())
    assert _wait_dead(child), f"the hook's child {child} was left running"
    assert any("timed out" in m for m in log.messages)


def test_timeout_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    result = run_hook(
        Hook.AFTER_RUN,
        f"trap '' TERM; sleep 300 & echo $! > \"{pid_file}\"; wait",
        base_env=BASE_ENV, redact=REDACT, timeout=1, kill_grace=0.5,
    )
    assert result.timed_out
    assert _wait_dead(int(pid_file.read_text()))


def test_a_child_left_holding_the_output_counts_as_the_hook_still_running(tmp_path: Path) -> None:
    """The shell exited, but a background child still writes to the hook's output: the hook is
    not done until it is (or the timeout kills it), as with `ssh host cmd`."""
    pid_file = tmp_path / "child.pid"
    result = run_hook(
        Hook.AFTER_RUN, f'sleep 300 & echo $! > "{pid_file}"; exit 0',
        base_env=BASE_ENV, redact=REDACT, timeout=1, kill_grace=1,
    )
    assert result.timed_out and not result.ok
    assert _wait_dead(int(pid_file.read_text()))


def test_a_detached_child_with_its_own_output_is_left_alone(tmp_path: Path) -> None:
    """`app >/dev/null 2>&1 &` (restarting a service by hand) is not the hook's output: the hook
    is done when its shell is."""
    pid_file = tmp_path / "child.pid"
    result = run_hook(
        Hook.AFTER_RUN, f'sleep 300 >/dev/null 2>&1 & echo $! > "{pid_file}"',
        base_env=BASE_ENV, redact=REDACT, timeout=30,
    )
    child = int(pid_file.read_text())
    try:
        assert result.ok and not result.timed_out
        assert not _dead(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_interrupted_while_waiting_kills_the_hook(tmp_path: Path) -> None:
    """Ctrl-C reaches cloudbackup, not the hook (its own session): the hook must not outlive it."""
    pid_file = tmp_path / "child.pid"
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_hook(
                Hook.BEFORE_RUN, f'sleep 300 & echo $! > "{pid_file}"; wait',
                base_env=BASE_ENV, redact=REDACT, timeout=60, kill_grace=1,
            )
    finally:
        timer.cancel()
    assert _wait_dead(int(pid_file.read_text()))
