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
import json
import os
import platform
import re
import shlex
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """The ``cloudbackup`` command: ``--ours-cmd``, else ``<python dir>/cloudbackup``, else ``python -m``.

    This checkout's package is compiled to bytecode first (untimed), as ``pip install``
    does for a wheel: with ``PYTHONDONTWRITEBYTECODE=1`` (set on the benchmark VM) an
    editable install would otherwise compile every module on every run (~0.2 s a command)."""
    compile_bytecode()
    if override:
        return shlex.split(override), {}
    exe = Path(sys.executable).parent / "cloudbackup"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)], {}
    # Not installed: run the package from this checkout.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "cloudbackup"], {"PYTHONPATH": pythonpath}


def compile_bytecode() -> None:
    """Write the .pyc files of this checkout's package (``compileall`` writes them whatever
    ``PYTHONDONTWRITEBYTECODE`` says); a wheel's were written when it was installed."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "cloudbackup")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


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


def add_harness_args(parser: argparse.ArgumentParser, bench_root: Path) -> None:
    """``--cache``, ``--ours-cmd``, ``--ours-env``, ``--port``, ``--workdir``, ``--keep``, ``--results``."""
    parser.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto")
    parser.add_argument("--ours-cmd", help="command for cloudbackup")
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for ours"
    )
    parser.add_argument("--port", type=int, help="moto server port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=bench_root / "work")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--results", type=Path, help="append the report to this file")


def emit_report(text: str, results: Path | None, heading: str) -> None:
    """Print the report; with ``--results``, append it under ``## heading`` there too."""
    print(text)
    if results:
        append_under_heading(results, heading, text)
        log(f"appended to {results} under '## {heading}'")


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


# ---------------------------------------------------------------- peak RSS vs input size

RSS_SIZES = "0.25GiB,1GiB,4GiB"


def add_rss_scaling_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--rss-scaling`` and ``--rss-sizes`` (see README.md, "Peak RSS vs input size")."""
    parser.add_argument(
        "--rss-scaling",
        action="store_true",
        help=f"also run {what} once on each --rss-sizes mixed tree and compare peak RSS",
    )
    parser.add_argument(
        "--rss-sizes",
        default=RSS_SIZES,
        metavar="SIZE,SIZE,...",
        help=f"mixed-tree sizes for --rss-scaling (default {RSS_SIZES})",
    )


def rss_sizes(parser: argparse.ArgumentParser, text: str) -> list[int]:
    import gen_dataset

    try:
        sizes = sorted({gen_dataset.parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        parser.error(f"--rss-sizes: {exc}")
    if len(sizes) < 2:
        parser.error("--rss-sizes: give at least two sizes")
    return sizes


def rss_scaling_report(
    sizes: Sequence[int],
    infos: Mapping[int, tuple[Path, Mapping[str, Any]]],
    rows: Mapping[str, Mapping[int, Sample]],
) -> str:
    """The table of one run per side and size, and each side's largest / smallest peak."""
    lines = [
        "#### Peak RSS vs dataset size (one run each)",
        "",
        "| Command | Dataset | Files | Input | Wall (s) | CPU (s) | Peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for side, by_size in rows.items():
        for size in sizes:
            dataset, info = infos[size]
            s = by_size[size]
            lines.append(
                f"| {side} | `{dataset.name}` | {info['files']:,} | {fmt_bytes(info['bytes'])} | "
                f"{s.wall:.2f} | {s.cpu:.2f} | {s.maxrss_mib:.1f} |"
            )
    lines.append("")
    grew = sizes[-1] / sizes[0]
    for side, by_size in rows.items():
        small, big = by_size[sizes[0]].maxrss_mib, by_size[sizes[-1]].maxrss_mib
        lines.append(
            f"- {side}: peak RSS at {fmt_bytes(sizes[-1])} / at {fmt_bytes(sizes[0])} = "
            f"{big / small:.2f} (input grew {grew:g}×; ≈1.0 means memory does not grow with "
            f"the input); highest {max(s.maxrss_mib for s in by_size.values()):.1f} MiB"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- datasets


@dataclass
class Datasets:
    """Generates or reuses datasets; ``cleanup()`` removes the ones it generated (unless ``keep``).

    A dataset at the default path (``gen_dataset.default_path``) is reused when its
    ``.dataset-info.json`` matches the generator version, kind, seed, size (and file count);
    otherwise it is generated again.  An explicit directory that exists is used as it is.
    """

    seed: int
    keep: bool
    generated: list[Path] = field(default_factory=list)

    def get(
        self,
        size: int | None,
        explicit: Path | None = None,
        kind: str = "mixed",
        files: int | None = None,
    ) -> tuple[Path, dict[str, object]]:
        import gen_dataset

        if kind == "small":
            files = files or gen_dataset.SMALL_TREE_FILES
            size = gen_dataset.default_small_size(files) if size is None else size
        else:
            size = gen_dataset.GiB if size is None else size
        path = explicit or gen_dataset.default_path(kind, size, self.seed, files)
        info = gen_dataset.read_info(path)
        if explicit is not None and path.exists():
            if info is None:  # someone else's directory: use it as it is
                files_found, total = regular_files(path)
                info = {"files": files_found, "bytes": total}
            log(f"using dataset {path}")
            return path, info
        wanted = (gen_dataset.GENERATOR_VERSION, kind, self.seed, size, files)
        if info is not None:
            small = info.get("small")
            have = (
                info.get("generator_version"),
                gen_dataset.kind_of(info),
                info.get("seed"),
                info.get("size"),
                small.get("files") if kind == "small" and isinstance(small, dict) else None,
            )
            if have == wanted:
                log(f"reusing dataset {path}")
                return path, info
        if path.exists() and info is None:
            raise SystemExit(
                f"{path} exists and was not made by gen_dataset.py; pass --dataset or remove it"
            )
        what = f"{files:,} small files, " if kind == "small" else ""
        log(f"generating dataset {path} ({what}{fmt_bytes(size)}, seed {self.seed}) ...")
        info = gen_dataset.generate(
            path, size, self.seed, force=True, quiet=True, kind=kind, files=files
        )
        log(gen_dataset.summary_line(path, info))
        self.generated.append(path)
        return path, info

    def cleanup(self) -> None:
        if self.keep:
            return
        for path in self.generated:
            log(f"removing generated dataset {path} (use --keep to keep it)")
            shutil.rmtree(path, ignore_errors=True)


def add_dataset_args(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--dataset``, ``--dataset-kind``, ``--size``, ``--files``, ``--seed`` (see README.md)."""
    parser.add_argument("--dataset", type=Path, help=default_help)
    parser.add_argument(
        "--dataset-kind",
        choices=("mixed", "small"),
        default="mixed",
        help="mixed: the 1 GiB mixed tree (default); small: the small-file tree "
        "(200,000 files, 790 MB, in /tmp/cb-bench/ds-small)",
    )
    parser.add_argument(
        "--size",
        type=_parse_size,
        default=None,
        help="dataset size (default 1GiB for mixed; 3,950 bytes per file for small)",
    )
    parser.add_argument(
        "--files",
        type=int,
        help="files in the small-file tree (default 200,000; --dataset-kind small)",
    )
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")


def _parse_size(text: str) -> int:
    import gen_dataset

    return gen_dataset.parse_size(text)


def check_dataset_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.files is not None and args.dataset_kind != "small":
        parser.error("--files applies to --dataset-kind small only")


def regular_files(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``root``, not following symlinks."""
    files = total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return files, total


def tree_stats(root: Path) -> tuple[int, int]:
    """(non-directory entries, regular-file bytes) under ``root``, no symlink followed."""
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            files += 1
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return files, total


def dataset_description(path: Path, info: Mapping[str, object]) -> str:
    """``- Dataset: ...`` for a report: path, counts, what the generator put in, where it lives."""
    import gen_dataset

    files, nbytes = int(info["files"]), int(info["bytes"])  # type: ignore[call-overload]
    text = f"- Dataset: `{path}`, {files:,} files, {nbytes:,} bytes ({fmt_bytes(nbytes)})"
    if "seed" in info:
        inf: dict[str, Any] = dict(info)
        if gen_dataset.kind_of(inf) == "small":
            text += (
                f"; gen_dataset.py --kind small --files {inf['small']['files']} --size "
                f"{inf['size']} --seed {inf['seed']}: small-file tree, {inf['dirs']:,} directories "
                f"up to {inf['max_depth']} deep (at most {inf['max_files_in_a_dir']:,} files in one), "
                f"{fmt_bytes(inf['small']['incompressible_bytes'])} of it random, "
                f"{inf['symlinks']} symlinks, {inf['empty_dirs']} empty dirs"
            )
        else:
            text += (
                f"; gen_dataset.py --size {gen_dataset.size_label(inf['size'])} --seed {inf['seed']}: "
                f"text {fmt_bytes(inf['text']['bytes'])} in {inf['text']['files']} files, "
                f"incompressible {fmt_bytes(inf['large_incompressible']['bytes'])} in "
                f"{inf['large_incompressible']['files']} files, {inf['small']['files']:,} small files "
                f"({fmt_bytes(inf['small']['bytes'])}), {inf['symlinks']} symlinks, "
                f"{inf['empty_dirs']} empty dirs"
            )
    return text + f"; stored on {storage_of(path)}"


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a SRC DST`` (DST must not exist): modes, mtimes, symlinks kept; new inodes, ctimes."""
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists; copy_tree wants a new path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


# ---------------------------------------------------------------- where things live; tmpfs scratch


def _unescape_mount(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def fs_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding ``path`` (or its nearest existing ancestor): ext4, tmpfs..."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    real = os.path.realpath(probe)
    best, kind = "", "?"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = _unescape_mount(fields[4])
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, right.split()[0]
    return kind


def storage_of(path: str | os.PathLike[str]) -> str:
    """``tmpfs`` or ``disk (ext4)``, for reports."""
    kind = fs_type(path)
    return "**tmpfs**" if kind == "tmpfs" else f"**disk** ({kind})"


def add_scratch_args(parser: argparse.ArgumentParser, default: str = "disk") -> None:
    parser.add_argument(
        "--scratch",
        choices=("disk", "tmpfs"),
        default=default,
        help="where outputs and restore targets go: the workdir's disk, or a tmpfs the harness "
        f"mounts under the workdir and unmounts at the end (needs root; default {default})",
    )
    parser.add_argument(
        "--tmpfs-size",
        default=None,
        metavar="SIZE",
        help="size= option of the tmpfs mount (default: the kernel's, half of RAM)",
    )


class Scratch:
    """The directory that receives outputs: ``WORK/scratch`` on disk, or a tmpfs mounted there.

    Use as a context manager; a tmpfs is unmounted (and its contents discarded) on exit.
    """

    def __init__(self, kind: str, path: Path, tmpfs_size: str | None = None) -> None:
        self.kind = kind
        self.path = path
        self.tmpfs_size = tmpfs_size
        self.mounted = False

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.kind == "tmpfs":
            options = "mode=0755" + (f",size={self.tmpfs_size}" if self.tmpfs_size else "")
            try:
                done = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", options, "cb-bench-scratch", str(self.path)],
                    capture_output=True,
                    text=True,
                )
                error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
                ok = done.returncode == 0
            except OSError as exc:
                error, ok = str(exc), False
            if not ok:
                self.path.rmdir()
                raise SystemExit(
                    f"--scratch tmpfs: cannot mount a tmpfs on {self.path}: {error.rstrip('.')}. Mounting needs "
                    "root (or CAP_SYS_ADMIN): run the benchmark as root, or use --scratch disk"
                )
            self.mounted = True
            log(f"tmpfs mounted on {self.path}")
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if done.returncode != 0:
            log(
                f"warning: could not unmount the tmpfs on {self.path}: {done.stderr.strip()}; "
                f"unmount it by hand: umount {self.path}"
            )
            return
        self.mounted = False
        log(f"tmpfs on {self.path} unmounted")

    def describe(self) -> str:
        if self.kind == "tmpfs":
            size = f", size={self.tmpfs_size}" if self.tmpfs_size else ""
            return f"**tmpfs** (mounted by the harness for this run{size})"
        return storage_of(self.path)


# ---------------------------------------------------------------- S3 (moto) buckets

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def clean_env() -> dict[str, str]:
    """This process's environment without ``CLOUDBACKUP_*``/``AWS_*``, plus moto's credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDBACKUP_", "AWS_"))}
    env.update(AWS_ENV)
    return env


class Buckets:
    """Buckets on the moto server: create, list, measure, roll back, remove (all untimed)."""

    def __init__(self, endpoint: str) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}),
        )
        self.counter = 0

    def create(self, side: str) -> str:
        self.counter += 1
        name = f"bench-{side}-{os.getpid()}-{self.counter}"
        self.client.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> list[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [obj for page in pages for obj in page.get("Contents", [])]

    def total_bytes(self, bucket: str) -> int:
        """The bucket's size, from a LIST (what S3 would bill as stored bytes)."""
        return sum(int(o["Size"]) for o in self.objects(bucket))

    def abort_uploads(self, bucket: str) -> None:
        for upload in self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            self.client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )

    def roll_back(self, bucket: str, keep: set[str]) -> int:
        """Delete every object whose key is not in ``keep`` (and open uploads); return how many."""
        self.abort_uploads(bucket)
        extra = [o["Key"] for o in self.objects(bucket) if o["Key"] not in keep]
        for key in extra:
            self.client.delete_object(Bucket=bucket, Key=key)
        return len(extra)

    def remove(self, bucket: str) -> None:
        self.abort_uploads(bucket)
        for obj in self.objects(bucket):
            self.client.delete_object(Bucket=bucket, Key=obj["Key"])
        self.client.delete_bucket(Bucket=bucket)


# ---------------------------------------------------------------- reading our --json output

# The restore stages we expect, in pipeline order (others are shown after them, as reported).
STAGE_ORDER = ("read", "download", "hash", "decrypt", "decompress", "extract", "count", "install")


def json_document(sample: Sample) -> dict[str, Any] | None:
    """Our ``--json`` stdout as a dict, or None when stdout is not one JSON object."""
    try:
        doc = json.loads(sample.stdout)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def reported_stages(sample: Sample) -> dict[str, float] | None:
    """Stage timings from ``restore --json``, when the version under test reports them.

    Expected (optional) shape: ``{"stages": {"read": 1.2, "hash": 1.1, "decompress": 2.0,
    "extract": 3.1, "count": 0.2, "install": 0.01}}`` — seconds per stage, each stage's own busy (or
    elapsed) time; with streaming they overlap, so their sum may exceed the wall time.  A
    stage may also be an object with a ``seconds`` key (``{"download": {"seconds": 1.2,
    "bytes": 6.7e8}}``).  Anything else is ignored.
    """
    doc = json_document(sample)
    stages = doc.get("stages") if doc else None
    if not isinstance(stages, dict):
        return None
    found: dict[str, float] = {}
    for name, value in stages.items():
        if isinstance(value, dict):
            value = value.get("seconds")
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[str(name)] = float(value)
    return found or None


def stages_table(samples: Mapping[str, list[Sample]], names: Sequence[str]) -> str:
    """Median seconds per reported stage for the given contenders, or a "not reported" line."""
    per = {n: [st for s in samples.get(n, []) if (st := reported_stages(s))] for n in names}
    if not any(per.values()):
        return (
            "- Restore stages: **not reported** (this version's `restore --json` carries no "
            "`stages` object)"
        )
    seen: list[str] = [s for s in STAGE_ORDER if any(s in r for runs in per.values() for r in runs)]
    for runs in per.values():
        for r in runs:
            seen += [s for s in r if s not in seen]
    lines = [
        "| Stage, median s (runs reporting it) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for stage in seen:
        cells = []
        for n in names:
            values = [r[stage] for r in per[n] if stage in r]
            cells.append(
                f"{statistics.median(values):.2f} ({len(values)})" if values else "not reported"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    sums = [
        f"{statistics.median(sum(r.values()) for r in per[n]):.2f}" if per[n] else "not reported"
        for n in names
    ]
    walls = [
        f"{statistics.median(s.wall for s in samples[n]):.2f}" if samples.get(n) else "–"
        for n in names
    ]
    lines.append("| sum of stages | " + " | ".join(sums) + " |")
    lines.append("| wall time of the command | " + " | ".join(walls) + " |")
    return "\n".join(lines)


def bar_line(
    label: str, value: float, bar: float, unit: str = "×", digits: int = 2, sign: str = ""
) -> str:
    """``- label: **value** (meets the bar of ≤ bar)`` or ``(does not meet ...)``."""
    mark = "meets" if value <= bar else "does not meet"
    shown = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return f"- {label}: **{shown}{unit}** ({mark} the bar of ≤ {sign}{bar:g}{unit})"
