"""`cloudbackup schedule cron|systemd [--at HH:MM]`: ready-to-install units for the nightly run.

:func:`render` is pure: it gets the command that starts this installation (absolute paths,
from :func:`find_executable`), the time, the env file and the paths the run writes, and
returns the text: a cron.d file, or the systemd service and timer, each after a
``# /etc/...`` line naming where it goes. ``infra/cron`` and ``infra/systemd`` hold the same
text rendered for ``/usr/local/bin/cloudbackup`` at 02:15 (a test keeps them identical).

Paths are quoted for the reader: cron hands its command to ``/bin/sh`` (and turns a bare
``%`` into a newline), systemd splits ``ExecStart=`` itself (and expands ``%`` specifiers and
``$`` variables); a path holding a newline is refused.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cloudbackup.core.errors import ConfigError, UsageError

__all__ = [
    "DEFAULT_AT",
    "DEFAULT_ENV_FILE",
    "DEFAULT_WRITE_PATHS",
    "KINDS",
    "TimeOfDay",
    "find_executable",
    "render",
]

Kind = Literal["cron", "systemd"]
KINDS: tuple[Kind, ...] = ("cron", "systemd")
DEFAULT_AT = "02:15"
DEFAULT_ENV_FILE = "/etc/cloudbackup.env"
#: What the service may write under ``ProtectSystem=strict``: the local dir of .env.example
#: and the log directory. The CLI passes the configured local dir and log file's directory.
DEFAULT_WRITE_PATHS: tuple[str, ...] = ("/var/backups/cloudbackup", "/var/log")
CRON_FILE = "/etc/cron.d/cloudbackup"
UNIT_DIR = "/etc/systemd/system"
SERVICE = "cloudbackup.service"
TIMER = "cloudbackup.timer"

_AT_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})")  # ASCII digits: \d also takes "１２"


@dataclass(frozen=True)
class TimeOfDay:
    """A wall-clock time, ``HH:MM`` (24-hour), in the machine's local time as cron and
    systemd's ``OnCalendar=`` read it."""

    hour: int
    minute: int

    @classmethod
    def parse(cls, text: str, option: str = "--at") -> TimeOfDay:
        """``02:15`` or ``2:15``; :class:`UsageError` (exit 2) naming the bad value else."""
        match = _AT_RE.fullmatch(text.strip())
        if match and int(match[1]) <= 23 and int(match[2]) <= 59:
            return cls(int(match[1]), int(match[2]))
        raise UsageError(
            f"{option} {text!r} is not a time of day", "use HH:MM on a 24-hour clock, e.g. 02:15"
        )

    def __str__(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"


def find_executable(argv0: str | None = None, python: str | None = None) -> tuple[str, ...]:
    """The command that starts this installation, with absolute paths.

    The ``cloudbackup`` console script this process was started as (``sys.argv[0]``, made
    absolute; a symlink such as ``/usr/local/bin/cloudbackup`` is kept, so relinking an
    upgrade needs no new unit), else ``<sys.executable> -m cloudbackup``, which always names
    this installation (its virtualenv included). A ``cloudbackup`` found on ``PATH`` is not
    used: it may be another installation.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    python = sys.executable if python is None else python
    if argv0 and Path(argv0).name == "cloudbackup":
        script = os.path.abspath(argv0)
        if os.path.isfile(script) and os.access(script, os.X_OK):
            return (script,)
    if python and os.path.isabs(python):
        return (python, "-m", "cloudbackup")
    raise ConfigError(
        "cannot tell where this installation of cloudbackup is",
        "run it by its absolute path (e.g. /usr/local/bin/cloudbackup schedule ...)",
    )


def render(
    kind: str,
    at: str | TimeOfDay = DEFAULT_AT,
    *,
    executable: Sequence[str],
    env_file: str = DEFAULT_ENV_FILE,
    write_paths: Sequence[str] = DEFAULT_WRITE_PATHS,
) -> str:
    """The units for ``kind`` (``cron`` or ``systemd``) running ``run`` daily at ``at``.

    ``executable`` is the command that starts cloudbackup (:func:`find_executable`);
    ``write_paths`` are what the systemd service may write (the local dir, a directory
    destination and the log file's directory). Bad input is a :class:`UsageError` / :class:`ConfigError` (exit 2).
    """
    time = at if isinstance(at, TimeOfDay) else TimeOfDay.parse(at)
    command = _check_paths("executable", executable)
    env = _check_paths("--env-file", [env_file])[0]
    if kind == "cron":
        return _cron(time, command, env)
    if kind == "systemd":
        paths = _check_paths("write path", write_paths)
        return _service(command, env, paths) + "\n" + _timer(time)
    raise UsageError(f"unknown schedule kind {kind!r}", "use cron or systemd")


def _check_paths(what: str, values: Sequence[str]) -> list[str]:
    if not values or not values[0]:
        raise ConfigError(f"{what}: nothing given")
    if not os.path.isabs(values[0]):
        raise ConfigError(
            f"{what} {values[0]!r} is not an absolute path",
            "cron and systemd do not run in this directory",
        )
    for value in values:
        if any(c in value for c in "\n\r\x00"):
            raise ConfigError(f"{what} {value!r} holds a line break or NUL", "rename it")
    return list(values)


# --------------------------------------------------------------------------- cron


def _cron_words(words: Sequence[str]) -> str:
    """Shell-quoted for ``/bin/sh``, with ``%`` escaped for cron."""
    return " ".join(shlex.quote(word) for word in words).replace("%", "\\%")


def _cron(time: TimeOfDay, command: Sequence[str], env_file: str) -> str:
    exe = _cron_words([*command, "--env-file", env_file])
    pruner = _cron_words([*command, "--env-file", "/etc/cloudbackup-pruner.env"])
    return f"""\
# {CRON_FILE}
# The nightly backup on a host (writer role). Print this file for your installation with
# `cloudbackup schedule cron --at HH:MM`; install it as root, mode 0644.
# cron runs jobs in /, so the settings come from --env-file, never from a .env in the cwd.
# cron mails whatever the job prints to MAILTO: with -q a good night prints nothing, a failing
# night mails its summary and errors. Pair it with CLOUDBACKUP_PING_URL (healthchecks.io or
# similar) to be told when the job did NOT run at all: mail cannot tell you that.
MAILTO=root
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# m h dom mon dow user command
{time.minute} {time.hour} * * * root {exe} -q run
# Metrics for node_exporter's textfile collector every 10 minutes (read-only, takes no lock):
#*/10 * * * * root {exe} -q status --prometheus /var/lib/node_exporter/textfile_collector/cloudbackup.prom >/dev/null || true
# On a separate, trusted machine with the pruner role (not on the hosts):
#45 5 * * * root {pruner} -q prune --where remote --all-hosts
"""


# --------------------------------------------------------------------------- systemd


def _unit_word(word: str, *, variables: bool) -> str:
    """One word of a unit file's command line or path list: ``%`` escaped (specifiers), ``$``
    too where systemd expands variables (``variables``: the arguments of ``ExecStart=``, not
    the program's path), quoted when it holds a space, a quote or a backslash."""
    word = word.replace("%", "%%")
    if variables:
        word = word.replace("$", "$$")
    if any(c in word for c in " \t\"'\\"):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _exec_line(words: Sequence[str]) -> str:
    return " ".join(_unit_word(word, variables=index > 0) for index, word in enumerate(words))


def _path_list(paths: Sequence[str]) -> str:
    return " ".join(_unit_word(path, variables=False) for path in paths)


def _service(command: Sequence[str], env_file: str, write_paths: Sequence[str]) -> str:
    exec_start = _exec_line([*command, "--env-file", env_file, "run"])
    return f"""\
# {UNIT_DIR}/{SERVICE}
# The nightly backup, started by {TIMER}. Print both units for your installation with
# `cloudbackup schedule systemd --at HH:MM`.
# `systemctl start cloudbackup` runs a backup now; `journalctl -u cloudbackup` shows its log.
[Unit]
Description=cloudbackup nightly backup
Wants=network-online.target
After=network-online.target
# Mail or page someone when the run fails (exit != 0): define cloudbackup-failure@.service
# (e.g. a script that calls `mail` or your pager) and uncomment; or set CLOUDBACKUP_NOTIFY.
#OnFailure=cloudbackup-failure@%n.service

[Service]
Type=oneshot
ExecStart={exec_start}
# Exit 1 (partial failure) must still be a failure for OnFailure= and `systemctl --failed`.
SuccessExitStatus=0
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
TimeoutStartSec=12h

# Hardening. The service reads the sources and writes only the local dir, a directory
# destination (CLOUDBACKUP_DEST) and the log; its hooks and cmd: sources run inside the same
# sandbox.
# It must be able to READ every source: ProtectHome=read-only, never yes (a source may live
# under /home). The local dir must exist and be listed in ReadWritePaths=, and so must the
# directory of a SQLite source in WAL mode (read-only, SQLite cannot open such a database
# while no other program has it open: it must create the -shm file).
# Left out on purpose, as they break common backups: MemoryDenyWriteExecute= (JIT runtimes
# in cmd: sources and hooks), RestrictNamespaces= (container tools), PrivateDevices= and
# ProtectClock= (both close /dev: `zfs send` needs /dev/zfs).
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={_path_list(write_paths)}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
UMask=0077
"""


def _timer(time: TimeOfDay) -> str:
    return f"""\
# {UNIT_DIR}/{TIMER}
# Enable with: systemctl daemon-reload && systemctl enable --now {TIMER}
[Unit]
Description=cloudbackup nightly backup timer

[Timer]
OnCalendar=*-*-* {time}:00
# Up to 10 minutes later, so hosts sharing a bucket do not all start in the same second.
RandomizedDelaySec=10m
# A machine that was off at {time} runs the missed backup at boot.
Persistent=true
AccuracySec=1m

[Install]
WantedBy=timers.target
"""
