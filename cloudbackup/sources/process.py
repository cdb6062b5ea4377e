"""Child programs of sources (``cmd:`` commands, the PostgreSQL clients): run without a
shell in exactly the environment given, stderr logged line by line."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from cloudbackup.core.errors import SourceError
from cloudbackup.sources.base import SourceContext


def describe_exit(code: int) -> str:
    """``exited with status 3`` / ``was killed by signal 9 (SIGKILL)``."""
    if code < 0:
        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-code}{name}"
    return f"exited with status {code}"


def run_logged(
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes],
    label: str,
    log: Callable[[str], None],
    env: Mapping[str, str],
    pass_fds: Sequence[int] = (),
    keep: int = 50,
) -> tuple[int, list[str]]:
    """Run ``argv`` without a shell (stdin from /dev/null) in exactly the environment ``env``
    (built by ``childenv.build``; never inherited); every stderr line goes to ``log`` as
    ``label: line``. Returns the exit status (negative: killed by that signal) and the last
    ``keep`` stderr lines. Raises SourceError when the program cannot be started."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=stdout,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError:
        raise SourceError(f"{label} not found", "install it or give its full path") from None
    except PermissionError:
        raise SourceError(f"{label} is not executable", "check its permissions") from None
    tail: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                log(f"{label}: {line}")
                tail.append(line)
                del tail[:-keep]

    reader = threading.Thread(target=drain, name="stderr-reader", daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except BaseException:  # interrupted: do not leave the child running on its own
        proc.kill()
        proc.wait()
        raise
    # A grandchild may keep stderr open after the command exits: do not wait for it forever.
    reader.join(timeout=5)
    return code, list(tail)


def run_to_file(
    argv: list[str],
    dest: Path,
    ctx: SourceContext,
    *,
    label: str,
    env: Mapping[str, str],
) -> None:
    """Run ``argv`` without a shell in the environment ``env``, its stdout into ``dest``
    (created 0600), stderr to the log; fail on a non-zero exit or a signal. Never leaves a
    "successful" half-output behind."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SourceError(f"{label}: cannot create {dest}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as out:
            code, tail = run_logged(argv, stdout=out, label=label, log=ctx.log, env=env)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    if code != 0:
        dest.unlink(missing_ok=True)
        detail = f": {tail[-1]}" if tail else ""
        raise SourceError(
            f"{label} {describe_exit(code)}{detail}", "see the log for its error output"
        )
