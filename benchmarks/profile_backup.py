#!/usr/bin/env python3
"""Where the archive pass of a backup spends its CPU: the walk, the read-ahead and the tar
writer on the main thread, the hashing writer thread, zstd's workers.

    python benchmarks/profile_backup.py [DATASET] [--runs 3] [--cache warm|cold]
                                        [--no-prefetch] [--out DIR] [--profile | --instructions]

Runs the archive pass in this process (``write_archive`` over ``walk_tree``, as ``cloudbackup
backup --no-upload`` does it, without the CLI's start-up, lock and manifest) on DATASET
(default: the 20,000-file small tree, ``/tmp/cb-bench/ds-small-20k``) and writes the archive
to ``--out`` (default ``/dev/shm``, so the output costs no disk). Per run it reports wall
time, the process's CPU (user + sys, all threads), each thread's CPU (read from
``/proc/self/task`` every 50 ms: main, archive-writer, and the threads Python did not start,
which are zstd's workers), the main thread's CPU per member and the peak RSS.

``--profile``: one run under cProfile; the functions with the most own time and the Python
calls per member. ``--instructions``: the user-space instructions per member of the walk,
read-ahead and tar writer on a null sink (no compression, no hashing), counted by
``valgrind --tool=callgrind`` with ``PYTHONHASHSEED=0``: the same code gives the same count
to a fraction of a percent, whatever else the machine runs. Keep that dataset small (2,000
files: ``gen_dataset.py DIR --kind small --files 2000 --size 7900000``); valgrind runs
Python ~50x slower.

See benchmarks/README.md ("Where the archive pass spends its time").
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from cloudbackup.core.patterns import PathMatcher  # noqa: E402
from cloudbackup.sources.base import SourceContext  # noqa: E402
from cloudbackup.sources.tree import walk_tree  # noqa: E402
from cloudbackup.stream import tarwriter  # noqa: E402
from cloudbackup.stream.compress import make_compressor  # noqa: E402
from cloudbackup.stream.pipeline import write_archive  # noqa: E402

DEFAULT_DATASET = Path("/tmp/cb-bench/ds-small-20k")
TICK = os.sysconf("SC_CLK_TCK")


def context() -> SourceContext:
    return SourceContext(
        spool_dir=Path(tempfile.gettempdir()),
        backup_id="profile",
        exclude=PathMatcher(()),
        skip_inodes=frozenset(),
        warn=lambda category, message: None,
    )


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + sys) of each thread of this process, by native id."""
    cpu = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return cpu


class ThreadSampler:
    """Samples every thread's CPU every 50 ms while the archive is written; labels them."""

    def __init__(self) -> None:
        self.start = thread_cpu()
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {threading.main_thread().native_id or 0: "main"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _sample(self) -> None:
        for thread in threading.enumerate():
            if thread.native_id and thread.native_id not in self.names:
                self.names[thread.native_id] = thread.name
        self.last.update(thread_cpu())

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_name(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for tid, cpu in self.last.items():
            name = self.names.get(tid, "zstd workers")
            if name == "sampler":
                continue
            totals[name] = totals.get(name, 0.0) + cpu - self.start.get(tid, 0.0)
        return totals


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def one_run(dataset: Path, out: Path, prefetch: bool) -> dict[str, Any]:
    partial = out / f"profile-{os.getpid()}.tar.zst.partial"
    partial.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with ThreadSampler() as sampler:
        stats = write_archive(
            walk_tree(str(dataset), context()),
            partial,
            compression="zstd",
            level=None,
            warn=lambda category, message: None,
            prefetch=prefetch,
        )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    partial.unlink(missing_ok=True)
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "threads": sampler.by_name(),
        "members": stats.file_count + stats.dirs,
        "size": stats.size,
        "maxrss": after.ru_maxrss / 1024,
    }


def report_run(index: int, run: dict[str, Any]) -> None:
    threads = run["threads"]
    main = threads.get("main", 0.0)
    parts = "  ".join(f"{name} {cpu:.2f}" for name, cpu in sorted(threads.items()))
    print(
        f"run {index}: wall {run['wall']:.2f} s  CPU {run['user'] + run['sys']:.2f} s "
        f"(user {run['user']:.2f}, sys {run['sys']:.2f})  threads: {parts}  "
        f"main {main / run['members'] * 1e6:.1f} us/member  archive {run['size']:,} B  "
        f"peak RSS {run['maxrss']:.1f} MiB",
        flush=True,
    )


def profile(dataset: Path, out: Path, prefetch: bool) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run = one_run(dataset, out, prefetch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    print(
        f"{stats.total_calls:,} calls for {run['members']:,} members: "  # type: ignore[attr-defined]
        f"{stats.total_calls / run['members']:.1f} per member"  # type: ignore[attr-defined]
    )


class _NullSink:
    def put(self, chunk: bytes) -> None:
        pass


def writer_pass(dataset: Path) -> None:
    """The walk, read-ahead and tar writer onto a null sink (the ``--instructions`` body)."""
    for _entry in walk_tree(str(dataset), context()):  # warm the caches, as in the base
        pass
    if os.environ.get("PROFILE_BACKUP_BASE"):
        for _entry in walk_tree(str(dataset), context()):  # the base: a walk alone
            pass
        return
    out = tarwriter.TarOut(make_compressor("none", None), _NullSink(), None)  # type: ignore[arg-type]
    stats = tarwriter.ArchiveStats()
    tarwriter.write_tar(
        walk_tree(str(dataset), context()), out, stats, lambda c, m: None, prefetch=True
    )
    out.finish()


def instructions(dataset: Path) -> None:
    """Instructions of the writer pass minus those of a second walk, per member."""
    members = sum(1 for _entry in walk_tree(str(dataset), context()))
    counts = []
    for base in ("", "1"):
        env = dict(os.environ, PYTHONHASHSEED="0", PROFILE_BACKUP_BASE=base)
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                str(dataset),
                "--writer-pass",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(ln for ln in done.stderr.splitlines() if "Collected" in ln)
        counts.append(int(line.split()[-1]))
    total, base_count = counts
    print(
        f"{members:,} members: {total - base_count:,} instructions for the walk, read-ahead and "
        f"tar writer; {(total - base_count) / members:,.0f} per member"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--no-prefetch", action="store_true", help="without the read-ahead")
    parser.add_argument("--out", type=Path, default=Path("/dev/shm"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true", help="one run under cProfile")
    mode.add_argument("--instructions", action="store_true", help="count instructions")
    mode.add_argument("--writer-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.dataset.is_dir():
        parser.error(f"{args.dataset}: no such dataset (see gen_dataset.py)")
    if args.writer_pass:
        writer_pass(args.dataset)
        return 0
    if args.instructions:
        instructions(args.dataset)
        return 0
    for _entry in walk_tree(str(args.dataset), context()):  # imports and dentries, untimed
        pass
    if args.profile:
        profile(args.dataset, args.out, not args.no_prefetch)
        return 0
    for index in range(1, args.runs + 1):
        if args.cache == "cold":
            drop_caches()
        report_run(index, one_run(args.dataset, args.out, not args.no_prefetch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
