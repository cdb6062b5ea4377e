#!/usr/bin/env python3
"""Benchmark ``cloudbackup backup --no-upload`` against ``tar | zstd -3 -T0 && sha256sum``.

    python benchmarks/bench_backup.py [--size 1GiB] [--runs 5] [--dataset DIR] [--keep]
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
BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE_NAME = "bench"


def size_label(size: int) -> str:
    """1 GiB -> ``1g``, 256 MiB -> ``256m`` (the default dataset directories are ``ds-<label>``)."""
    if size % gen_dataset.GiB == 0:
        return f"{size // gen_dataset.GiB}g"
    if size % gen_dataset.MiB == 0:
        return f"{size // gen_dataset.MiB}m"
    return f"{size}b"


def default_dataset(size: int, seed: int) -> Path:
    return BENCH_ROOT / (f"ds-{size_label(size)}" + ("" if seed == 1 else f"-s{seed}"))


def dataset_bytes(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) under ``root``, not following symlinks."""
    files = total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                files += 1
                total += st.st_size
    return files, total


class Datasets:
    """Generates or reuses datasets; removes at the end the ones it generated (unless --keep)."""

    def __init__(self, seed: int, keep: bool) -> None:
        self.seed = seed
        self.keep = keep
        self.generated: list[Path] = []

    def get(self, size: int, explicit: Path | None = None) -> tuple[Path, dict[str, Any]]:
        path = explicit or default_dataset(size, self.seed)
        info = gen_dataset.read_info(path)
        if explicit is not None and path.exists():
            if info is None:  # someone else's directory: use it as it is
                files, total = dataset_bytes(path)
                info = {"files": files, "bytes": total}
            log(f"using dataset {path}")
            return path, info
        wanted = (gen_dataset.GENERATOR_VERSION, self.seed, size)
        if (
            info is not None
            and (info.get("generator_version"), info.get("seed"), info.get("size")) == wanted
        ):
            log(f"reusing dataset {path}")
            return path, info
        if path.exists() and info is None:
            raise SystemExit(
                f"{path} exists and was not made by gen_dataset.py; pass --dataset or remove it"
            )
        log(f"generating dataset {path} ({gen_dataset.format_size(size)}, seed {self.seed}) ...")
        info = gen_dataset.generate(path, size, self.seed, force=True, quiet=True)
        log(gen_dataset.summary_line(path, info))
        self.generated.append(path)
        return path, info

    def cleanup(self) -> None:
        if self.keep:
            return
        for path in self.generated:
            log(f"removing generated dataset {path} (use --keep to keep it)")
            shutil.rmtree(path, ignore_errors=True)


def make_ours(
    dataset: Path, work: Path, base: list[str], base_env: dict[str, str], extra_env: dict[str, str]
) -> common.Contender:
    local = work / "ours-local"
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


def make_theirs(dataset: Path, work: Path, level: int) -> common.Contender:
    out = work / "theirs.tar.zst"
    script = (
        f"tar -cf - -C {shlex.quote(str(dataset))} . | zstd -{level} -T0 -q -o {shlex.quote(str(out))}"
        f" && sha256sum {shlex.quote(str(out))}"
    )

    def prepare() -> None:
        work.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)

    def command() -> tuple[list[str], None, str]:
        return ["bash", "-o", "pipefail", "-c", script], None, str(work)

    return common.Contender("theirs", command, prepare, lambda: out.stat().st_size)


def header(args: argparse.Namespace, cache_mode: str, ours_cmd: list[str], sides: list[str]) -> str:
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
            f"- theirs: `tar -cf - -C DATASET . | zstd -{args.level} -T0 -q -o OUT.tar.zst "
            "&& sha256sum OUT.tar.zst`"
        )
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
    text = f"- Dataset: `{path}`, {info['files']:,} files, {info['bytes']:,} bytes ({common.fmt_bytes(info['bytes'])})"
    if "seed" in info:
        text += (
            f"; gen_dataset.py --size {size_label(info['size'])} --seed {info['seed']}: "
            f"text {common.fmt_bytes(info['text']['bytes'])} in {info['text']['files']} files, "
            f"incompressible {common.fmt_bytes(info['large_incompressible']['bytes'])} in "
            f"{info['large_incompressible']['files']} files, {info['small']['files']:,} small files "
            f"({common.fmt_bytes(info['small']['bytes'])}), {info['symlinks']} symlinks, "
            f"{info['empty_dirs']} empty dirs"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        type=gen_dataset.parse_size,
        default=gen_dataset.parse_size("1GiB"),
        help="dataset size (default 1GiB)",
    )
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per side, interleaved (default 5; 0 skips)"
    )
    parser.add_argument(
        "--dataset", type=Path, help="use this directory (generated there if missing)"
    )
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
    parser.add_argument(
        "--rss-scaling",
        action="store_true",
        help="also run each side once on 0.25 GiB and once on 1 GiB and compare peak RSS",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=BENCH_ROOT / "work",
        help="outputs go to WORKDIR/run-PID "
        "(default /tmp/cb-bench/work; keep it on the same disk as the dataset)",
    )
    parser.add_argument("--results", type=Path, help="append the markdown report to this file")
    args = parser.parse_args(argv)
    if 0 < args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")

    extra_env = common.env_pairs(parser, args.ours_env)
    ours_cmd, ours_env = ours_base_command(args.ours_cmd)
    sides = [args.only] if args.only else ["ours", "theirs"]

    cache_mode = common.resolve_cache_mode(args.cache)
    datasets = Datasets(args.seed, args.keep)
    work = args.workdir / f"run-{os.getpid()}"  # only this directory is removed at the end
    report: list[str] = [header(args, cache_mode, ours_cmd, sides)]
    try:
        if args.runs > 0:
            dataset, info = datasets.get(args.size, args.dataset)
            input_bytes = info["bytes"]
            # One untimed read first, in both modes: with "cold" it still matters, because on a VM the
            # host may cache the disk image and would otherwise make only the very first run slow.
            log("reading the dataset once, untimed ...")
            common.warm_cache(dataset)
            contenders = []
            if "ours" in sides:
                contenders.append(make_ours(dataset, work, ours_cmd, ours_env, extra_env))
            if "theirs" in sides:
                contenders.append(make_theirs(dataset, work, args.level))
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
            if "theirs" in sides:
                digest = (
                    samples["theirs"][-1].stdout.split()[0] if samples["theirs"][-1].stdout else "?"
                )
                report.append(f"\ntheirs sha256 of the last output: `{digest}`")
        if args.rss_scaling:
            report += [
                "",
                rss_scaling(args, datasets, work, cache_mode, sides, ours_cmd, ours_env, extra_env),
            ]
    finally:
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
) -> str:
    """One run per side on 0.25 GiB and on 1 GiB: does peak RSS grow with the input?"""
    rows: dict[str, dict[int, common.Sample]] = {s: {} for s in sides}
    infos = {}
    sizes = [gen_dataset.parse_size("0.25GiB"), gen_dataset.parse_size("1GiB")]
    for size in sizes:
        dataset, info = datasets.get(size)
        infos[size] = (dataset, info)
        common.warm_cache(dataset)  # untimed, as in the main comparison
        for side in sides:
            contender = (
                make_ours(dataset, work, ours_cmd, ours_env, extra_env)
                if side == "ours"
                else make_theirs(dataset, work, args.level)
            )
            sample = common.measure_once(contender, cache_mode)
            rows[side][size] = sample
            log(
                f"rss-scaling {size_label(size):>5} {side:>7}: wall {sample.wall:.2f} s  CPU {sample.cpu:.2f} s  "
                f"peak RSS {sample.maxrss_mib:.1f} MiB"
            )
    lines = [
        "#### Peak RSS vs dataset size (one run each)",
        "",
        "| Command | Dataset | Files | Input | Wall (s) | CPU (s) | Peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        for size in sizes:
            dataset, info = infos[size]
            s = rows[side][size]
            lines.append(
                f"| {side} | `{dataset.name}` | {info['files']:,} | {common.fmt_bytes(info['bytes'])} | "
                f"{s.wall:.2f} | {s.cpu:.2f} | {s.maxrss_mib:.1f} |"
            )
    lines.append("")
    for side in sides:
        small, big = (rows[side][s].maxrss_mib for s in sizes)
        lines.append(
            f"- {side}: peak RSS at 1 GiB / at 0.25 GiB = {big / small:.2f} "
            f"(input grew 4×; ≈1.0 means memory does not grow with the input)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
