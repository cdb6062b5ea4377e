"""Measuring commands for the benchmarks: wall time, CPU time, peak RSS; interleaved runs; tables.

What is measured, per command (see README.md):

* **wall**: ``time.perf_counter()`` from just before ``Popen`` to just after
  ``os.wait4`` returns.
* **CPU**: ``ru_utime + ru_stime`` from the ``struct rusage`` that
  ``os.wait4(pid, 0)`` returns for the child.  On Linux that covers the child
  and every descendant it waited for (all threads included), so for
  ``bash -c 'a | b && c'`` it is the CPU time of the whole pipeline.
* **peak RSS**: ``ru_maxrss`` from the same ``wait4`` (kB, shown as MiB).  On
  Linux this is the *largest* peak of any single process in the tree (the
  child's own, or a waited-for descendant's), **not the sum** of processes
  that ran at the same time.  For ``tar | zstd`` it is therefore zstd's peak
  (tar's is a few MiB), and for a Python program it is the interpreter's own
  peak unless it spawns a bigger child.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MB = 1000**2
MiB = 1024**2


class CommandFailed(RuntimeError):
    pass


@dataclass
class Sample:
    """One measured run of one command."""

    name: str
    wall: float
    user: float
    sys: float
    maxrss_kb: int
    returncode: int
    stdout: str = ""
    stderr: str = ""
    output_bytes: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_kb / 1024


def run_measured(
    cmd: Sequence[str],
    *,
    name: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> Sample:
    """Run ``cmd`` (no shell) and measure it with ``os.wait4`` (see the module docstring).

    stdout and stderr go to temporary files (no pipes, so nothing can block
    while we sit in ``wait4``) and are returned as text.  With ``check`` a
    non-zero exit raises :class:`CommandFailed` with the end of stderr.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
        out.seek(0)
        err.seek(0)
        sample = Sample(
            name=name or Path(cmd[0]).name,
            wall=wall,
            user=usage.ru_utime,
            sys=usage.ru_stime,
            maxrss_kb=usage.ru_maxrss,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )
    if check and sample.returncode != 0:
        tail = "\n".join(sample.stderr.strip().splitlines()[-20:])
        raise CommandFailed(f"{sample.name}: exit {sample.returncode} from {' '.join(cmd)}\n{tail}")
    return sample


def run_shell(script: str, **kwargs: object) -> Sample:
    """Run a bash script (with ``pipefail``) measured as one tree: max RSS of any process, CPU of all."""
    return run_measured(["bash", "-o", "pipefail", "-c", script], **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Page cache


def drop_caches() -> bool:
    """``sync`` then drop the page cache, dentries and inodes; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def warm_cache(root: str | os.PathLike[str]) -> int:
    """Read every regular file under ``root`` once (untimed) so it sits in the page cache; return bytes read."""
    total = 0
    buf = bytearray(4 * MiB)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                with open(path, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        total += n
            except OSError:
                pass
    return total


def resolve_cache_mode(mode: str) -> str:
    """``auto`` becomes ``cold`` when the page cache can be dropped, else ``warm``."""
    if mode == "auto":
        return "cold" if drop_caches() else "warm"
    if mode == "cold" and not drop_caches():
        raise SystemExit(
            "cannot drop the page cache here (needs root and a writable /proc/sys/vm/drop_caches); "
            "use --cache warm"
        )
    return mode


def env_pairs(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """``--ours-env KEY=VALUE`` options as a dict; a malformed one is a usage error."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--ours-env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


# --------------------------------------------------------------------------
# Interleaved runs


@dataclass
class Contender:
    """One side of a comparison.

    ``command()`` returns (argv, env, cwd); ``prepare()`` runs untimed before
    each run (e.g. delete the previous output); ``output_bytes()`` runs untimed
    after each run and says how big the output is; ``cleanup()`` runs after
    that.
    """

    name: str
    command: Callable[[], tuple[list[str], dict[str, str] | None, str | None]]
    prepare: Callable[[], None] = lambda: None
    output_bytes: Callable[[], int] = lambda: 0
    cleanup: Callable[[], None] = lambda: None


def _io_stall_us() -> int | None:
    try:
        with open("/proc/pressure/io") as fh:
            return int(fh.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def settle_disk(limit: float = 60.0) -> float:
    """Wait (untimed) until the disk is idle — tasks stalled on I/O for under 2% of a
    second, as /proc/pressure/io counts it — at most ``limit`` seconds; returns the wait.

    Deleting the previous run's output (a GiB of files, on a filesystem mounted with online
    discard) keeps the disk busy for seconds after ``rm`` returns; file creation in the next
    run then stalls on the journal, so whichever side ran after a deletion paid for it.
    """
    started = time.monotonic()
    before = _io_stall_us()
    if before is None:
        return 0.0  # no pressure information here: nothing to wait for
    while time.monotonic() - started < limit:
        time.sleep(1.0)
        now = _io_stall_us() or before
        if now - before < 20_000:
            break
        before = now
    return time.monotonic() - started


def measure_once(contender: Contender, cache_mode: str) -> Sample:
    contender.prepare()
    os.sync()  # do not let the previous run's dirty pages be written back during this one
    settle_disk()
    if cache_mode == "cold":
        drop_caches()
    argv, env, cwd = contender.command()
    sample = run_measured(argv, name=contender.name, env=env, cwd=cwd)
    sample.output_bytes = contender.output_bytes()
    contender.cleanup()
    return sample


def run_interleaved(
    contenders: Sequence[Contender],
    runs: int,
    cache_mode: str,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict[str, list[Sample]]:
    """Run A, B, A, B, ... ``runs`` times each; return the samples per contender name."""
    samples: dict[str, list[Sample]] = {c.name: [] for c in contenders}
    for i in range(runs):
        for contender in contenders:
            sample = measure_once(contender, cache_mode)
            samples[contender.name].append(sample)
            log(
                f"run {i + 1}/{runs} {contender.name:>7}: wall {sample.wall:7.2f} s  CPU {sample.cpu:7.2f} s  "
                f"peak RSS {sample.maxrss_mib:7.1f} MiB  output {fmt_bytes(sample.output_bytes or 0)}"
            )
    return samples


# --------------------------------------------------------------------------
# Formatting


def fmt_bytes(n: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


def _spread(values: list[float], digits: int) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


# A reported metric: its value for one run, and the digits it is shown with.
Metric = tuple[Callable[[Sample], float], int]


def archive_metrics(input_bytes: int) -> dict[str, Metric]:
    """The metrics of the backup and upload benchmarks (output = the archive)."""
    return {
        "Wall time (s)": (lambda s: s.wall, 2),
        "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
        "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
        "Output size (MiB)": (lambda s: (s.output_bytes or 0) / MiB, 1),
        "Throughput (MB/s of input)": (lambda s: input_bytes / MB / s.wall, 1),
        "Compression ratio (input/output)": (
            lambda s: input_bytes / s.output_bytes if s.output_bytes else 0.0,
            3,
        ),
    }


def comparison_table(
    samples: Mapping[str, list[Sample]],
    input_bytes: int,
    ours: str = "ours",
    theirs: str = "theirs",
    metrics: Mapping[str, Metric] | None = None,
) -> str:
    """Markdown table: median (min–max) per side and the ratio of medians ours/theirs."""
    names = [n for n in (ours, theirs) if samples.get(n)]
    header = "| Metric | " + " | ".join(f"{n} median (min–max)" for n in names)
    rule = "|---|" + "---:|" * len(names)
    if len(names) == 2:
        header += f" | {ours}/{theirs} |"
        rule += "---:|"
    else:
        header += " |"
    lines = [header, rule]
    for metric, (value, digits) in (metrics or archive_metrics(input_bytes)).items():
        per = {n: [value(s) for s in samples[n]] for n in names}
        row = f"| {metric} | " + " | ".join(_spread(per[n], digits) for n in names)
        if len(names) == 2:
            a, b = statistics.median(per[ours]), statistics.median(per[theirs])
            row += f" | {a / b:.2f}" if b else " | –"
        lines.append(row + " |")
    return "\n".join(lines)


def runs_table(
    samples: Mapping[str, list[Sample]],
    input_bytes: int | None,
    output_label: str = "Output",
) -> str:
    """Markdown table of every run, in the order they ran (MB/s of input when given)."""
    header = f"| Run | Command | Wall (s) | CPU (s) | Peak RSS (MiB) | {output_label} (MiB) |"
    rule = "|---:|---|---:|---:|---:|---:|"
    if input_bytes is not None:
        header += " MB/s |"
        rule += "---:|"
    lines = [header, rule]
    longest = max((len(v) for v in samples.values()), default=0)
    for i in range(longest):
        for name, runs in samples.items():
            if i < len(runs):
                s = runs[i]
                row = (
                    f"| {i + 1} | {name} | {s.wall:.2f} | {s.cpu:.2f} | {s.maxrss_mib:.1f} | "
                    f"{(s.output_bytes or 0) / MiB:.1f} |"
                )
                if input_bytes is not None:
                    row += f" {input_bytes / MB / s.wall:.1f} |"
                lines.append(row)
    return "\n".join(lines)


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip(" *") if text else "?"


def environment() -> dict[str, str]:
    """Facts about the machine and tools that a reader needs to compare results."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "cpu": f"{cpu} × {os.cpu_count()}",
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tar": _first_line(["tar", "--version"]),
        "zstd": _first_line(["zstd", "--version"]),
    }


def which(name: str) -> str | None:
    return shutil.which(name)


# ---------------------------------------------------------------- shared by the bench_* scripts

REPO_ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ours_base_command(override: str | None) -> tuple[list[str], dict[str, str]]:
    """The ``cloudbackup`` command: ``--ours-cmd``, else ``<python dir>/cloudbackup``, else ``python -m``."""
    if override:
        return shlex.split(override), {}
    exe = Path(sys.executable).parent / "cloudbackup"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)], {}
    # Not installed: run the package from this checkout.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "cloudbackup"], {"PYTHONPATH": pythonpath}


def aws_command() -> list[str]:
    exe = Path(sys.executable).parent / "aws"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("aws")
    if not found:
        raise SystemExit("the AWS CLI (aws) is needed for the reference side; pip install awscli")
    return [found]


def dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def append_under_heading(path: Path, heading: str, text: str) -> None:
    """Append ``text`` under ``## heading`` (created if missing, kept before the next ``## ``)."""
    title = f"## {heading}"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    lines = existing.splitlines()
    if title not in lines:
        body = existing.rstrip("\n")
        body = (body + "\n\n" if body else "") + title + "\n\n" + text
        path.write_text(body.rstrip("\n") + "\n")
        return
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before = "\n".join(lines[:end]).rstrip("\n")
    after = "\n".join(lines[end:])
    merged = before + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + after if after else "")
    path.write_text(merged.rstrip("\n") + "\n")


class MotoServer:
    """A moto S3 server in its own process (so it does not share our GIL), stopped by its pid."""

    def __init__(self, work: Path, port: int | None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "moto_server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe), "-H", "127.0.0.1", "-p", str(self.port)]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"moto server exited; see {self.log_path}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                log(f"moto server pid {self.proc.pid} on {self.url}")
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"moto server did not answer on {self.url}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
