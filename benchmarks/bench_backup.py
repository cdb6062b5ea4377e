#!/usr/bin/env python3
"""Benchmark ``cloudbackup backup --no-upload`` against ``tar | zstd -3 -T0 && sha256sum``.

    python benchmarks/bench_backup.py [--size 1GiB] [--runs 5] [--dataset DIR] [--keep]
                                      [--dataset-kind mixed|small] [--files N]
                                      [--reference auto|plain|pax] [--scratch disk|tmpfs]
                                      [--cache auto|cold|warm] [--only ours|theirs]
                                      [--rss-scaling] [--results benchmarks/RESULTS.md]

See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gen_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
log = common.log
ours_base_command = common.ours_base_command
dir_bytes = common.dir_bytes
size_label = gen_dataset.size_label
dataset_bytes = common.regular_files
Datasets = common.Datasets
BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE_NAME = "bench"
SMALL_TREE_BAR = 2.0  # local backup of the small-file tree: at most 2x tar --format=pax | zstd
# The reference pipelines: plain tar (the original reference) or tar doing the per-file work
# that ours does (PAX headers, extended attributes).
REFERENCE_TAR = {
    "plain": "tar -cf -",
    "pax": "tar --format=pax --xattrs -cf -",
}


def default_dataset(size: int, seed: int) -> Path:
    return gen_dataset.default_path("mixed", size, seed)


def make_ours(
    dataset: Path,
    work: Path,
    base: list[str],
    base_env: dict[str, str],
    extra_env: dict[str, str],
    scratch: Path | None = None,
) -> common.Contender:
    local = (scratch or work) / "ours-local"
    cwd = work / "ours-cwd"  # empty, so no stray .env file is picked up

    def prepare() -> None:
        shutil.rmtree(local, ignore_errors=True)  # every run is a first backup
        local.mkdir(parents=True)
        cwd.mkdir(parents=True, exist_ok=True)

    def command() -> tuple[list[str], dict[str, str], str]:
        env = dict(os.environ)
        env.update(base_env)
        env.update({"CLOUDBACKUP_LOCAL_DIR": str(local), "CLOUDBACKUP_HOST": "bench"})
        env.update(extra_env)
        return [*base, "backup", "--no-upload", f"{SOURCE_NAME}={dataset}"], env, str(cwd)

    def output_bytes() -> int:
        size = dir_bytes(local)
        if size == 0:
            raise common.CommandFailed(f"ours wrote nothing under {local}")
        return size

    return common.Contender("ours", command, prepare, output_bytes)


def make_theirs(
    dataset: Path, work: Path, level: int, scratch: Path | None = None, reference: str = "plain"
) -> common.Contender:
    out = (scratch or work) / "theirs.tar.zst"
    script = (
        f"{REFERENCE_TAR[reference]} -C {shlex.quote(str(dataset))} . "
        f"| zstd -{level} -T0 -q -o {shlex.quote(str(out))}"
        f" && sha256sum {shlex.quote(str(out))}"
    )

    def prepare() -> None:
        work.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)

    def command() -> tuple[list[str], None, str]:
        return ["bash", "-o", "pipefail", "-c", script], None, str(work)

    return common.Contender("theirs", command, prepare, lambda: out.stat().st_size)


def header(
    args: argparse.Namespace,
    cache_mode: str,
    ours_cmd: list[str],
    sides: list[str],
    scratch: common.Scratch | None = None,
) -> str:
    env = common.environment()
    lines = [
        f"### Backup benchmark, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        f"- Tools: {env['tar']}; {env['zstd']}",
    ]
    if "ours" in sides:
        lines.append(
            f"- ours: `{shlex.join(ours_cmd)} backup --no-upload {SOURCE_NAME}=DATASET` "
            "(`CLOUDBACKUP_LOCAL_DIR` emptied before each run, `CLOUDBACKUP_HOST=bench`, "
            "run from an empty directory so no `.env` is read)"
        )
    if "theirs" in sides:
        lines.append(
            f"- theirs ({args.reference} reference): `{REFERENCE_TAR[args.reference]} -C DATASET . "
            f"| zstd -{args.level} -T0 -q -o OUT.tar.zst && sha256sum OUT.tar.zst`"
        )
    if scratch is not None:
        lines.append(
            f"- Outputs (ours' `CLOUDBACKUP_LOCAL_DIR`, theirs' OUT.tar.zst): {scratch.describe()}"
        )
    if args.ours_env:
        lines.append(f"- ours' extra environment: `{' '.join(args.ours_env)}`")
    lines += [
        f"- Page cache: **{cache_mode}** "
        + (
            "(`sync; echo 3 > /proc/sys/vm/drop_caches` before every run)"
            if cache_mode == "cold"
            else "(`sync` before every run)"
        )
        + "; the dataset is read once, untimed, before the first run",
    ]
    return "\n".join(lines)


def dataset_line(path: Path, info: dict[str, Any]) -> str:
    return common.dataset_description(path, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_dataset_args(parser, "use this directory (generated there if missing)")
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per side, interleaved (default 5; 0 skips)"
    )
    parser.add_argument(
        "--reference",
        choices=("auto", "plain", "pax"),
        default="auto",
        help="theirs: plain `tar -cf -`, or `tar --format=pax --xattrs -cf -`; "
        "auto (default): pax for the small-file tree, plain otherwise",
    )
    common.add_scratch_args(parser)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep datasets generated by this run and the outputs of the last runs",
    )
    parser.add_argument(
        "--cache",
        choices=("auto", "cold", "warm"),
        default="auto",
        help="cold: drop the page cache before every run; warm: read the dataset once first; "
        "auto (default): cold if dropping works, else warm",
    )
    parser.add_argument("--only", choices=("ours", "theirs"), help="run one side only")
    parser.add_argument("--level", type=int, default=3, help="zstd level for theirs (default 3)")
    parser.add_argument(
        "--ours-cmd",
        help="command for cloudbackup (default: <python dir>/cloudbackup, "
        "else python -m cloudbackup from this checkout)",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for ours (repeatable)",
    )
    common.add_rss_scaling_args(parser, "each side")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=BENCH_ROOT / "work",
        help="outputs go to WORKDIR/run-PID "
        "(default /tmp/cb-bench/work; keep it on the same disk as the dataset)",
    )
    parser.add_argument("--results", type=Path, help="append the markdown report to this file")
    args = parser.parse_args(argv)
    common.check_dataset_args(parser, args)
    args.rss_sizes = common.rss_sizes(parser, args.rss_sizes)
    if args.reference == "auto":
        args.reference = "pax" if args.dataset_kind == "small" else "plain"
    if 0 < args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")

    extra_env = common.env_pairs(parser, args.ours_env)
    ours_cmd, ours_env = ours_base_command(args.ours_cmd)
    sides = [args.only] if args.only else ["ours", "theirs"]

    cache_mode = common.resolve_cache_mode(args.cache)
    datasets = Datasets(args.seed, args.keep)
    work = args.workdir / f"run-{os.getpid()}"  # only this directory is removed at the end
    scratch = common.Scratch(args.scratch, work / "scratch", args.tmpfs_size)
    report: list[str] = [header(args, cache_mode, ours_cmd, sides, scratch)]
    try:
        scratch_dir = scratch.__enter__()
        if args.runs > 0:
            dataset, info = datasets.get(
                args.size, args.dataset, kind=args.dataset_kind, files=args.files
            )
            input_bytes = info["bytes"]
            # One untimed read first, in both modes: with "cold" it still matters, because on a VM the
            # host may cache the disk image and would otherwise make only the very first run slow.
            log("reading the dataset once, untimed ...")
            common.warm_cache(dataset)
            contenders = []
            if "ours" in sides:
                contenders.append(
                    make_ours(dataset, work, ours_cmd, ours_env, extra_env, scratch_dir)
                )
            if "theirs" in sides:
                contenders.append(
                    make_theirs(dataset, work, args.level, scratch_dir, args.reference)
                )
            samples = common.run_interleaved(contenders, args.runs, cache_mode)
            report += [
                dataset_line(dataset, info),
                f"- Method: {args.runs} runs per side, interleaved ({' → '.join(sides)} → ...), "
                "medians with (min–max); MB = 10⁶ bytes; ratio = ours median / theirs median",
                "",
                common.comparison_table(samples, input_bytes),
                "",
                "<details><summary>All runs</summary>",
                "",
                common.runs_table(samples, input_bytes),
                "",
                "</details>",
            ]
            if args.dataset_kind == "small" and len(sides) == 2:
                ratio = statistics.median(s.wall for s in samples["ours"]) / statistics.median(
                    s.wall for s in samples["theirs"]
                )
                report.append(
                    "\n"
                    + common.bar_line(
                        f"Small-file tree, wall time ours/theirs ({args.reference} reference)",
                        ratio,
                        SMALL_TREE_BAR,
                    )
                )
            if "theirs" in sides:
                digest = (
                    samples["theirs"][-1].stdout.split()[0] if samples["theirs"][-1].stdout else "?"
                )
                report.append(f"\ntheirs sha256 of the last output: `{digest}`")
        if args.rss_scaling:
            report += [
                "",
                rss_scaling(
                    args,
                    datasets,
                    work,
                    cache_mode,
                    sides,
                    ours_cmd,
                    ours_env,
                    extra_env,
                    scratch_dir,
                ),
            ]
    finally:
        scratch.unmount()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        datasets.cleanup()

    text = "\n".join(report) + "\n"
    print(text)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as fh:
            fh.write("\n" + text)
        log(f"appended to {args.results}")
    return 0


def rss_scaling(
    args: argparse.Namespace,
    datasets: Datasets,
    work: Path,
    cache_mode: str,
    sides: list[str],
    ours_cmd: list[str],
    ours_env: dict[str, str],
    extra_env: dict[str, str],
    scratch: Path | None = None,
) -> str:
    """One run per side on each ``--rss-sizes`` mixed tree: does peak RSS grow with the input?"""
    rows: dict[str, dict[int, common.Sample]] = {s: {} for s in sides}
    infos = {}
    for size in args.rss_sizes:
        dataset, info = datasets.get(size)
        infos[size] = (dataset, info)
        common.warm_cache(dataset)  # untimed, as in the main comparison
        for side in sides:
            contender = (
                make_ours(dataset, work, ours_cmd, ours_env, extra_env, scratch)
                if side == "ours"
                else make_theirs(dataset, work, args.level, scratch, args.reference)
            )
            sample = common.measure_once(contender, cache_mode)
            rows[side][size] = sample
            log(
                f"rss-scaling {size_label(size):>5} {side:>7}: wall {sample.wall:.2f} s  CPU {sample.cpu:.2f} s  "
                f"peak RSS {sample.maxrss_mib:.1f} MiB"
            )
    return common.rss_scaling_report(args.rss_sizes, infos, rows)


if __name__ == "__main__":
    sys.exit(main())
