"""`schedule`: the cron.d file and the systemd units, the shipped examples kept identical to what
is rendered, paths quoted for cron's shell and systemd's parser, `--at` validated (exit 2)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbackup.core.errors import ConfigError
from cloudbackup.ops import schedule
from cloudbackup.ops.schedule import TimeOfDay, find_executable, render

ROOT = Path(__file__).resolve().parent.parent
EXE = ("/usr/local/bin/cloudbackup",)


def _units(text: str) -> dict[str, str]:
    """Split `schedule systemd` output at its `# /etc/systemd/system/<name>` lines."""
    units: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("# /etc/systemd/system/"):
            name = line.split()[1].rsplit("/", 1)[1]
            units[name] = ""
        assert name is not None, f"text before the first unit header: {line!r}"
        units[name] += line
    return units


def _ini(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",), strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def _cron_jobs(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if line and not line.startswith("#") and "=" not in line.split()[0]
    ]


# --------------------------------------------------------------------------- --at


@pytest.mark.parametrize(
    ("text", "hour", "minute"),
    [("02:15", 2, 15), ("2:15", 2, 15), ("00:00", 0, 0), ("23:59", 23, 59), (" 07:05\n", 7, 5)],
)
def test_at_parses(text: str, hour: int, minute: int) -> None:
    assert TimeOfDay.parse(text) == TimeOfDay(hour, minute)
    assert str(TimeOfDay.parse(text)) == f"{hour:02d}:{minute:02d}"


@pytest.mark.parametrize(
    "text", ["24:00", "12:60", "1215", "12:5", "", "-1:10", "12:15:00", "２:15", "1２:15", "2:15pm", "a:b"]
)
def test_bad_at_is_exit_2_naming_it(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        render("cron", text, executable=EXE)
    assert caught.value.exit_code == 2
    assert repr(text) in caught.value.message and "--at" in caught.value.message
    assert "HH:MM" in str(caught.value)


def test_unknown_kind_and_relative_paths_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown schedule kind 'anacron'"):
        render("anacron", executable=EXE)
    with pytest.raises(ConfigError, match="not an absolute path"):
        render("cron", executable=("cloudbackup",))
    with pytest.raises(ConfigError, match="--env-file 'cloudbackup.env' is not an absolute path"):
        render("systemd", executable=EXE, env_file="cloudbackup.env")
    with pytest.raises(ConfigError, match="line break"):
        render("cron", executable=("/opt/x\n* * * * * root rm -rf /",))
    with pytest.raises(ConfigError, match="line break"):
        render("systemd", executable=EXE, write_paths=["/var/backups\nExecStartPre=/bin/evil"])


# --------------------------------------------------------------------------- the shipped examples


def test_shipped_cron_file_is_what_schedule_cron_prints() -> None:
    shipped = (ROOT / "infra/cron/cloudbackup.cron").read_text()
    assert render("cron", "02:15", executable=EXE) == shipped


def test_shipped_systemd_units_are_what_schedule_systemd_prints() -> None:
    service = (ROOT / "infra/systemd/cloudbackup.service").read_text()
    timer = (ROOT / "infra/systemd/cloudbackup.timer").read_text()
    assert render("systemd", "02:15", executable=EXE) == service + "\n" + timer


# --------------------------------------------------------------------------- cron


def test_cron_line_fields() -> None:
    text = render("cron", "03:07", executable=("/opt/cb/bin/cloudbackup",), env_file="/etc/cb.env")
    assert text.startswith("# /etc/cron.d/cloudbackup\n")
    assert text.endswith("\n")  # cron ignores a last line without a newline
    jobs = _cron_jobs(text)
    assert len(jobs) == 1, jobs  # the metrics and pruner lines are examples, commented out
    fields = jobs[0].split(None, 6)
    assert fields[:6] == ["7", "3", "*", "*", "*", "root"]
    assert shlex.split(fields[6]) == [
        "/opt/cb/bin/cloudbackup", "--env-file", "/etc/cb.env", "-q", "run"
    ]
    assert "MAILTO=root" in text.splitlines()
    path_line = next(line for line in text.splitlines() if line.startswith("PATH="))
    assert "/usr/local/bin" in path_line and "/usr/bin" in path_line  # pg_dump, hooks


def test_cron_command_survives_cron_and_the_shell(tmp_path: Path) -> None:
    """A path with a space, a quote, `%` (cron's newline) and `$` reaches the program intact."""
    weird = tmp_path / "my dir's 100% $HOME"
    weird.mkdir()
    exe = weird / "cloudbackup"
    record = tmp_path / "argv"
    exe.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {shlex.quote(str(record))}\n')
    exe.chmod(0o755)
    env_file = str(weird / "cloudbackup.env")
    line = _cron_jobs(render("cron", "02:15", executable=(str(exe),), env_file=env_file))[0]
    command = line.split(None, 6)[6]
    assert "%" not in command.replace("\\%", "")  # every % is escaped for cron
    as_cron_runs_it = command.replace("\\%", "%")  # cron un-escapes \% and hands the rest to sh
    subprocess.run(["/bin/sh", "-c", as_cron_runs_it], check=True, cwd="/")
    assert record.read_text().splitlines() == ["--env-file", env_file, "-q", "run"]


# --------------------------------------------------------------------------- systemd


def test_systemd_units_shape() -> None:
    text = render(
        "systemd", "04:30", executable=("/opt/cb/bin/cloudbackup",), env_file="/etc/cb.env",
        write_paths=["/srv/backups", "/var/log/cloudbackup"],
    )
    units = _units(text)
    assert list(units) == ["cloudbackup.service", "cloudbackup.timer"]
    service = _ini(units["cloudbackup.service"])
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"] == "/opt/cb/bin/cloudbackup --env-file /etc/cb.env run"
    assert service["Service"]["ReadWritePaths"] == "/srv/backups /var/log/cloudbackup"
    # Hardening that keeps sources readable and the usual dump tools working.
    assert service["Service"]["ProtectSystem"] == "strict"
    assert service["Service"]["ProtectHome"] == "read-only"
    for breaks_backups in ("MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock", "RestrictNamespaces"):
        assert breaks_backups not in service["Service"]
    timer = _ini(units["cloudbackup.timer"])
    assert timer["Timer"]["OnCalendar"] == "*-*-* 04:30:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"] == "10m"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_units_verify(tmp_path: Path) -> None:
    """The units as systemd reads them: `systemd-analyze verify` (here and on CI's machines)
    must accept them without a single warning; the executable path is a real one, with a
    space, `%` and `$` that systemd would otherwise mangle."""
    weird = tmp_path / "opt dir 100% $x"
    weird.mkdir()
    exe = weird / "cloudbackup"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    units = _units(render("systemd", "02:15", executable=(str(exe),)))
    for name, text in units.items():
        (tmp_path / name).write_text(text)
        assert _ini(text).sections()  # parses as INI wherever systemd is missing
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        proc = subprocess.run(
            [analyze, "verify", *(str(tmp_path / name) for name in units)],
            capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == "", proc.stderr  # unknown keys are only warnings: none
        assert "not executable" not in proc.stdout


def test_bad_paths_are_caught_by_systemd_analyze(tmp_path: Path) -> None:
    """The verify test above can fail: a missing executable is reported."""
    analyze = shutil.which("systemd-analyze")
    units = _units(render("systemd", "02:15", executable=(str(tmp_path / "missing" / "cloudbackup"),)))
    (tmp_path / "cloudbackup.service").write_text(units["cloudbackup.service"])
    if analyze is None:
        assert "missing/cloudbackup" in units["cloudbackup.service"]
        return
    proc = subprocess.run([analyze, "verify", str(tmp_path / "cloudbackup.service")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "missing/cloudbackup" in proc.stderr


# --------------------------------------------------------------------------- this installation


def test_find_executable_prefers_the_console_script_it_was_started_as(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "cloudbackup"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    link = tmp_path / "cloudbackup"
    link.symlink_to(script)
    assert find_executable(str(script), "/usr/bin/python3") == (str(script),)
    # Started through a symlink: the symlink is kept (relinking an upgrade needs no new unit).
    assert find_executable(str(link), "/usr/bin/python3") == (str(link),)
    # A relative argv[0] (started as ./cloudbackup) is made absolute.
    monkeypatch.chdir(bin_dir)
    assert find_executable("./cloudbackup", "/usr/bin/python3") == (str(script),)


def test_find_executable_falls_back_to_this_python(tmp_path: Path) -> None:
    not_executable = tmp_path / "cloudbackup"
    not_executable.write_text("")
    python = "/opt/cb/bin/python3"
    assert find_executable("/usr/lib/python3/pytest", python) == (python, "-m", "cloudbackup")
    assert find_executable(str(not_executable), python) == (python, "-m", "cloudbackup")
    assert find_executable("", python) == (python, "-m", "cloudbackup")
    with pytest.raises(ConfigError, match="cannot tell where"):
        find_executable("", "")


def test_the_python_dash_m_form_runs_from_cron_s_directory() -> None:
    """`<python> -m cloudbackup` is a command cron (cwd /) and systemd can run."""
    command = find_executable("/not/the/script", sys.executable)
    proc = subprocess.run([*command, "--version"], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cloudbackup" in proc.stdout + proc.stderr


def test_defaults_are_the_spec_s() -> None:
    assert schedule.DEFAULT_AT == "02:15"
    assert schedule.DEFAULT_ENV_FILE == "/etc/cloudbackup.env"
    text = render("cron", executable=EXE)
    assert _cron_jobs(text)[0].startswith("15 2 * * * root /usr/local/bin/cloudbackup --env-file /etc/cloudbackup.env ")
