"""Hooks: the operator's shell command lines run before and after `run`.

``CLOUDBACKUP_BEFORE_RUN``, ``CLOUDBACKUP_AFTER_RUN`` and ``CLOUDBACKUP_ON_FAILURE`` (SPEC
"Operations") are run with ``/bin/sh -c`` in a new process group, with the scrubbed child
environment (``childenv.build``: no ``CLOUDBACKUP_*``, no AWS or PostgreSQL secrets), stdin
from ``/dev/null``, and their stdout and stderr logged line by line (the log's redacting filter
applies). A hook may take ``CLOUDBACKUP_HOOK_TIMEOUT`` (default ``10m``): then its whole
process group is killed (TERM, then KILL), children it started included.

After-hooks get the run's result: ``CLOUDBACKUP_RESULT`` (``ok``/``warning``/``failed``),
``CLOUDBACKUP_EXIT_CODE`` and ``CLOUDBACKUP_SUMMARY``, the path of a 0600 file holding the
run's ``--json`` document, removed when the hooks are done (:func:`summary_file`).

Semantics the caller applies (:func:`after_hooks` and :class:`HookResult` give the facts): a
failing before-hook stops the run (exit 1, failure ping and notification); ``AFTER_RUN``
always runs, ``ON_FAILURE`` only when the outcome is ``failed``; a failing after-hook is a
warning and does not change the exit code; ``run --dry-run`` runs no hooks.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from cloudbackup import config
from cloudbackup.core import childenv
from cloudbackup.core.errors import ConfigError
from cloudbackup.core.outcome import REPORTED
from cloudbackup.core.retention import format_duration

__all__ = [
    "DEFAULT_TIMEOUT",
    "Hook",
    "HookResult",
    "Hooks",
    "after_hooks",
    "parse_timeout",
    "result_env",
    "run_hook",
    "summary_file",
]

LOG = logging.getLogger("cloudbackup")

DEFAULT_TIMEOUT = "10m"
#: After SIGTERM, how long a timed-out hook's process group gets before SIGKILL.
KILL_GRACE = 5.0
#: How many of a hook's last output lines :class:`HookResult` keeps.
TAIL_LINES = 20
SHELL = "/bin/sh"
RESULTS = frozenset({"ok", "warning", "failed"})


class Hook(enum.Enum):
    """The three hooks; the value is the variable that holds the command line."""

    BEFORE_RUN = "CLOUDBACKUP_BEFORE_RUN"
    AFTER_RUN = "CLOUDBACKUP_AFTER_RUN"
    ON_FAILURE = "CLOUDBACKUP_ON_FAILURE"

    @property
    def label(self) -> str:
        """``before-run`` / ``after-run`` / ``on-failure``: how the log names it."""
        return self.name.lower().replace("_", "-")


def parse_timeout(text: str | None, variable: str = "CLOUDBACKUP_HOOK_TIMEOUT") -> float:
    """``CLOUDBACKUP_HOOK_TIMEOUT`` in seconds: a duration (``90s``, ``10m``, ``1h``; unset or
    empty: ``10m``), at least one second. ConfigError naming the variable otherwise."""
    clean = (text or "").strip() or DEFAULT_TIMEOUT
    try:
        return config.parse_hook_timeout(clean)
    except config.Invalid as exc:
        raise ConfigError(f"{variable}: {exc}", exc.hint) from None


@dataclass(frozen=True)
class Hooks:
    """The configured hooks: a command line per hook (None: not set) and the timeout."""

    before_run: str | None = None
    after_run: str | None = None
    on_failure: str | None = None
    timeout: float = 600.0

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Hooks:
        """The hooks of the configuration (``CLOUDBACKUP_BEFORE_RUN``... rows)."""
        return cls(
            before_run=settings.before_run,
            after_run=settings.after_run,
            on_failure=settings.on_failure,
            timeout=settings.hook_timeout,
        )

    @classmethod
    def from_values(cls, values: Mapping[str, str | None]) -> Hooks:
        """From variable values (``CLOUDBACKUP_BEFORE_RUN``... and
        ``CLOUDBACKUP_HOOK_TIMEOUT``); blank command lines count as unset."""

        def command(hook: Hook) -> str | None:
            value = values.get(hook.value)
            if value is not None and "\x00" in value:
                raise ConfigError(f"{hook.value} holds a NUL byte", "give one shell command line")
            return (value.strip() or None) if value is not None else None

        return cls(
            before_run=command(Hook.BEFORE_RUN),
            after_run=command(Hook.AFTER_RUN),
            on_failure=command(Hook.ON_FAILURE),
            timeout=parse_timeout(values.get("CLOUDBACKUP_HOOK_TIMEOUT")),
        )

    def command(self, hook: Hook) -> str | None:
        return {
            Hook.BEFORE_RUN: self.before_run,
            Hook.AFTER_RUN: self.after_run,
            Hook.ON_FAILURE: self.on_failure,
        }[hook]


def after_hooks(hooks: Hooks, outcome: str) -> list[tuple[Hook, str]]:
    """The after-hooks to run for this outcome, in order: ``AFTER_RUN`` always (first: it
    usually undoes what the before-hook did, such as restarting a stopped service), then
    ``ON_FAILURE`` when the outcome is ``failed``. Unset hooks are left out."""
    _check_result(outcome)
    wanted = [Hook.AFTER_RUN] + ([Hook.ON_FAILURE] if outcome == "failed" else [])
    return [(hook, command) for hook in wanted if (command := hooks.command(hook))]


def result_env(outcome: str, exit_code: int, summary_path: Path | None) -> dict[str, str]:
    """The variables an after-hook gets about the run (added to the scrubbed environment)."""
    _check_result(outcome)
    env = {"CLOUDBACKUP_RESULT": outcome, "CLOUDBACKUP_EXIT_CODE": str(int(exit_code))}
    if summary_path is not None:
        env["CLOUDBACKUP_SUMMARY"] = str(summary_path)
    return env


def _check_result(outcome: str) -> None:
    if outcome not in RESULTS:
        raise ValueError(f"unknown outcome {outcome!r}: one of {sorted(RESULTS)}")


@contextlib.contextmanager
def summary_file(document: Mapping[str, Any], directory: Path | None = None) -> Iterator[Path]:
    """A file holding ``document`` as JSON (the run's ``--json`` document), mode 0600 from its
    creation (``mkstemp``), in ``directory`` or the temp dir; removed on exit, whatever the
    hooks did to it meanwhile."""
    fd, name = tempfile.mkstemp(prefix="cloudbackup-summary-", suffix=".json", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, ensure_ascii=True, default=str)
            out.write("\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(frozen=True)
class HookResult:
    """What one hook did. ``ok``: it exited 0 within its time."""

    hook: Hook
    ok: bool
    exit_code: int | None  # None: not started, or killed after its timeout
    timed_out: bool = False
    seconds: float = 0.0
    output: tuple[str, ...] = field(default=())  # its last lines (stdout and stderr)
    error: str | None = None  # why it failed, in words

    @property
    def message(self) -> str:
        """One line for the log and the summary."""
        if self.ok:
            return f"hook {self.hook.label} succeeded ({self.seconds:.1f}s)"
        return f"hook {self.hook.label} failed: {self.error}"


def run_hook(
    hook: Hook,
    command: str,
    *,
    base_env: Mapping[str, str],
    extra_env: Mapping[str, str] | None = None,
    timeout: float,
    cwd: Path | None = None,
    redact: Callable[[str], str],
    kill_grace: float = KILL_GRACE,
    clock: Callable[[], float] = time.monotonic,
) -> HookResult:
    """Run one hook's command line with ``/bin/sh -c``; never raises for the hook's sake.

    ``base_env`` is the process environment as the CLI read it (``Settings.child_env``); the
    hook gets ``childenv.build(base_env, extra_env)``. Each output line is logged (INFO, as
    ``hook <name>: <line>``) and the last ones are kept, passed through ``redact`` (the run's
    ``RedactingFilter.redact``; the log's own filter also redacts what it writes). Interrupted
    while waiting (Ctrl-C, SIGTERM turned into an exception), it kills the group and re-raises. The run waits for the shell and for every process
    that still holds its output, up to ``timeout`` seconds; then the whole process group gets
    SIGTERM, and SIGKILL ``kill_grace`` seconds later.
    """
    env = childenv.build(base_env, extra_env)
    started = clock()
    LOG.info("hook %s: running", hook.label)
    try:
        proc = subprocess.Popen(
            [SHELL, "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group, so a timeout kills all of it
        )
    except OSError as exc:
        return _finish(
            HookResult(hook, ok=False, exit_code=None, error=f"cannot start {SHELL}: {exc.strerror}")
        )
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    reader = threading.Thread(
        target=_read_output, args=(proc.stdout, hook, tail, redact), daemon=True
    )
    reader.start()
    deadline = started + timeout
    timed_out = False
    try:
        proc.wait(timeout=max(0.0, deadline - clock()))
        reader.join(max(0.0, deadline - clock()))
        timed_out = reader.is_alive()  # a child it left behind still holds the output
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:
        # Ctrl-C or SIGTERM while waiting: the hook is in its own session, so the terminal's
        # signal never reached it. It must not outlive the run.
        _kill_group(proc, reader, kill_grace)
        raise
    if timed_out:
        _kill_group(proc, reader, kill_grace)
        reader.join(kill_grace)
    seconds = clock() - started
    output = tuple(tail)
    code = proc.returncode
    if timed_out:
        result = HookResult(
            hook, ok=False, exit_code=None, timed_out=True, seconds=seconds, output=output,
            error=f"timed out after {_duration(timeout)} (CLOUDBACKUP_HOOK_TIMEOUT); "
            "its processes were killed",
        )
    elif code == 0:
        result = HookResult(hook, ok=True, exit_code=0, seconds=seconds, output=output)
    else:
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        result = HookResult(
            hook, ok=False, exit_code=code, seconds=seconds, output=output, error=reason
        )
    return _finish(result)


def _duration(seconds: float) -> str:
    try:
        return format_duration(timedelta(seconds=seconds))  # 600 -> 10m
    except ValueError:  # a fraction of a second (tests)
        return f"{seconds:g}s"


def _finish(result: HookResult) -> HookResult:
    if result.ok:
        LOG.info("%s", result.message)
    else:  # run's summary says it again (an error or a warning line)
        LOG.warning("%s", result.message, extra=REPORTED)
    return result


def _read_output(
    stream: IO[bytes], hook: Hook, tail: deque[str], redact: Callable[[str], str]
) -> None:
    """Log every line of the hook's output; keep the last ones. Bytes that are not UTF-8 are
    shown escaped; control characters too (a line is one log line)."""
    with stream:
        for raw in stream:
            text = raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")
            text = "".join(
                c if c == "\t" or c.isprintable() else c.encode("unicode_escape").decode()
                for c in text
            )
            LOG.info("hook %s: %s", hook.label, text)
            tail.append(redact(text))


def _kill_group(proc: subprocess.Popen[bytes], reader: threading.Thread, grace: float) -> None:
    """SIGTERM to the hook's process group; once the shell and everything holding its output
    are gone, or ``grace`` seconds later, SIGKILL to what is left of the group; reap the shell.
    The group id is the shell's pid (``start_new_session``)."""
    pgid = proc.pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # The output pipe closes when its last holder dies, zombies included: no polling of pids.
    reader.join(max(0.0, deadline - time.monotonic()))
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
