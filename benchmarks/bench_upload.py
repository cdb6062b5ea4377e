#!/usr/bin/env python3
"""Benchmark ``cloudbackup backup`` (archive + upload to S3) against
``tar | zstd -3 -T0 && sha256sum && aws s3 cp``.

    python benchmarks/bench_upload.py [--dataset /tmp/cb-bench/ds-1g] [--runs 5]
                                      [--cache auto|cold|warm] [--only ours|theirs]
                                      [--rss-scaling [--rss-sizes 0.25GiB,1GiB,4GiB]]
                                      [--results benchmarks/RESULTS.md] [--keep]

A moto S3 server runs in its own process (``moto_server -H 127.0.0.1 -p PORT``). The two
sides run interleaved (ours, theirs, ours, ...), each into a fresh bucket and, for ours, an
emptied ``CLOUDBACKUP_LOCAL_DIR``; buckets are emptied and deleted after each run (untimed):

* **ours**: ``cloudbackup backup --json bench=DATASET`` with ``CLOUDBACKUP_S3_BUCKET``,
  ``CLOUDBACKUP_S3_ENDPOINT_URL`` and otherwise default settings: archive (zstd -3,
  SHA-256 in the same pass), manifest, then the upload (claim, multipart with a SHA-256
  per part, HEAD check, manifest).
* **theirs**: ``tar -cf - -C DATASET . | zstd -3 -T0 -q -o OUT.tar.zst && sha256sum
  OUT.tar.zst && aws s3 cp OUT.tar.zst s3://BUCKET/... --endpoint-url URL`` (the AWS CLI's
  defaults: 8 MiB parts, 10 concurrent requests).

Measured per command with ``os.wait4`` (see common.py): wall, CPU (user+sys of the whole
process tree: the client side; moto's own CPU is not counted, but it shares the machine),
peak RSS (the largest single process). The report also splits the wall time into the
archive phase and the upload phase for each side. ``--rss-scaling`` adds one run per side
on each ``--rss-sizes`` mixed tree (generated at the default paths when missing, kept):
does peak RSS grow with the input? ``--runs 0`` skips the comparison. Linux only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gen_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
log = common.log
free_port = common.free_port
MotoServer = common.MotoServer
ours_base_command = common.ours_base_command
aws_command = common.aws_command
dir_bytes = common.dir_bytes


def append_results(path: Path, text: str) -> None:
    common.append_under_heading(path, "Upload", text)


BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE = "bench"
HOST = "bench"
AWS_ENV = common.AWS_ENV
WALL_BAR = 0.70  # ours' median wall time at most this share of theirs (issue 17)
RSS_BAR_MIB = 200.0  # ours' peak RSS at the default settings (issue 17)
Buckets = common.Buckets  # a fresh bucket per run, emptied and deleted afterwards (untimed)
clean_env = common.clean_env


class Side:
    """Per-run facts the contender callbacks share (bucket, remote bytes)."""

    def __init__(self) -> None:
        self.bucket = ""
        self.remote_bytes: list[int] = []


def make_ours(
    dataset: Path,
    work: Path,
    endpoint: str,
    buckets: Buckets,
    base: list[str],
    base_env: dict[str, str],
    extra_env: dict[str, str],
) -> tuple[common.Contender, Side]:
    local = work / "ours-local"
    cwd = work / "ours-cwd"  # empty: no stray .env is read
    side = Side()

    def prepare() -> None:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        cwd.mkdir(parents=True, exist_ok=True)
        side.bucket = buckets.create("ours")

    def command() -> tuple[list[str], dict[str, str], str]:
        env = clean_env()
        env.update(base_env)
        env.update(
            {
                "CLOUDBACKUP_LOCAL_DIR": str(local),
                "CLOUDBACKUP_HOST": HOST,
                "CLOUDBACKUP_S3_BUCKET": side.bucket,
                "CLOUDBACKUP_S3_ENDPOINT_URL": endpoint,
            }
        )
        env.update(extra_env)
        return [*base, "backup", "--json", f"{SOURCE}={dataset}"], env, str(cwd)

    def output_bytes() -> int:
        remote = [o for o in buckets.objects(side.bucket) if ".tar" in o["Key"]]
        if not remote:
            raise common.CommandFailed(f"ours uploaded no archive to {side.bucket}")
        side.remote_bytes.append(sum(o["Size"] for o in remote))
        return dir_bytes(local)

    def cleanup() -> None:
        buckets.remove(side.bucket)

    return common.Contender("ours", command, prepare, output_bytes, cleanup), side


def make_theirs(
    dataset: Path, work: Path, endpoint: str, buckets: Buckets, level: int
) -> tuple[common.Contender, Side]:
    out = work / "theirs.tar.zst"
    side = Side()

    def prepare() -> None:
        work.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        side.bucket = buckets.create("theirs")

    def command() -> tuple[list[str], dict[str, str], str]:
        q = shlex.quote
        target = f"s3://{side.bucket}/{HOST}/{SOURCE}/{out.name}"
        script = (
            "t0=$(date +%s.%N)"
            f" && tar -cf - -C {q(str(dataset))} . | zstd -{level} -T0 -q -o {q(str(out))}"
            f" && sha256sum {q(str(out))}"
            " && t1=$(date +%s.%N)"
            f" && {shlex.join(aws_command())} s3 cp {q(str(out))} {q(target)}"
            f" --endpoint-url {q(endpoint)} --only-show-errors"
            ' && t2=$(date +%s.%N) && echo "phases $t0 $t1 $t2" >&2'
        )
        return ["bash", "-o", "pipefail", "-c", script], clean_env(), str(work)

    def output_bytes() -> int:
        remote = buckets.objects(side.bucket)
        if not remote:
            raise common.CommandFailed(f"theirs uploaded nothing to {side.bucket}")
        side.remote_bytes.append(sum(o["Size"] for o in remote))
        return out.stat().st_size

    def cleanup() -> None:
        buckets.remove(side.bucket)
        out.unlink(missing_ok=True)

    return common.Contender("theirs", command, prepare, output_bytes, cleanup), side


def phases(name: str, sample: common.Sample) -> tuple[float, float] | None:
    """(archive seconds, upload seconds) of one run, from what the command reported."""
    if name == "ours":
        try:
            (result,) = json.loads(sample.stdout)["results"]
        except (ValueError, KeyError):
            return None
        archive = float(result["seconds"])
        return archive, sample.wall - archive  # the upload phase includes start-up
    for line in sample.stderr.splitlines():
        if line.startswith("phases "):
            t0, t1, t2 = (float(v) for v in line.split()[1:4])
            return t1 - t0, t2 - t1
    return None


def phase_table(samples: dict[str, list[common.Sample]]) -> str:
    lines = [
        "| Phase (median s) | " + " | ".join(samples) + " |",
        "|---|" + "---:|" * len(samples),
    ]
    split = {n: [p for s in runs if (p := phases(n, s))] for n, runs in samples.items()}
    for label, index in (("archive (+ sha256)", 0), ("upload (+ start-up for ours)", 1)):
        cells = [
            f"{statistics.median(p[index] for p in split[n]):.2f}" if split[n] else "–"
            for n in samples
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(samples: dict[str, list[common.Sample]]) -> list[str]:
    lines = []
    if samples.get("ours") and samples.get("theirs"):
        ratio = statistics.median(s.wall for s in samples["ours"]) / statistics.median(
            s.wall for s in samples["theirs"]
        )
        mark = "meets" if ratio <= WALL_BAR else "misses"
        lines.append(f"- Wall time ours/theirs: **{ratio:.2f}** ({mark} the bar of ≤ {WALL_BAR})")
    if samples.get("ours"):
        rss = max(s.maxrss_mib for s in samples["ours"])
        mark = "meets" if rss <= RSS_BAR_MIB else "misses"
        lines.append(
            f"- ours' highest peak RSS: **{rss:.1f} MiB** ({mark} the bar of ≤ {RSS_BAR_MIB:.0f} MiB)"
        )
    return lines


def dataset_info(path: Path) -> dict[str, Any]:
    info = gen_dataset.read_info(path)
    if info is None:
        files = total = 0
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full):
                    files += 1
                    total += os.lstat(full).st_size
        info = {"files": files, "bytes": total}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        type=Path,
        default=BENCH_ROOT / "ds-1g",
        help="dataset directory (default /tmp/cb-bench/ds-1g; generated with "
        "gen_dataset.py --size 1GiB --seed 1 when missing)",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per side (default 5; 0: none)"
    )
    parser.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto")
    parser.add_argument("--only", choices=("ours", "theirs"), help="run one side only")
    parser.add_argument("--level", type=int, default=3, help="zstd level for theirs (default 3)")
    parser.add_argument("--ours-cmd", help="command for cloudbackup")
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for ours"
    )
    parser.add_argument("--port", type=int, help="moto server port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=BENCH_ROOT / "work")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--results", type=Path, help="append the report to this file")
    common.add_rss_scaling_args(parser, "each side")
    args = parser.parse_args(argv)
    rss_sizes = common.rss_sizes(parser, args.rss_sizes) if args.rss_scaling else []
    if 0 < args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")
    extra_env = common.env_pairs(parser, args.ours_env)

    if args.runs > 0 and not args.dataset.exists():
        log(f"generating {args.dataset} (1 GiB, seed 1) ...")
        gen_dataset.generate(args.dataset, gen_dataset.parse_size("1GiB"), 1, quiet=True)
    info = dataset_info(args.dataset) if args.runs > 0 else {}
    cache_mode = common.resolve_cache_mode(args.cache)
    ours_cmd, ours_env = ours_base_command(args.ours_cmd)
    sides = [args.only] if args.only else ["ours", "theirs"]
    work = args.workdir / f"upload-{os.getpid()}"
    server = MotoServer(work, args.port)
    server.start()
    samples: dict[str, list[common.Sample]] = {}
    scaling = ""
    try:
        buckets = Buckets(server.url)

        def contender(dataset: Path, side: str) -> common.Contender:
            if side == "ours":
                return make_ours(dataset, work, server.url, buckets, ours_cmd, ours_env, extra_env)[
                    0
                ]
            return make_theirs(dataset, work, server.url, buckets, args.level)[0]

        if args.runs > 0:
            log("reading the dataset once, untimed ...")
            common.warm_cache(args.dataset)
            contenders = [contender(args.dataset, side) for side in sides]
            samples = common.run_interleaved(contenders, args.runs, cache_mode)
        if rss_sizes:
            scaling = rss_scaling(rss_sizes, sides, contender, cache_mode)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    env = common.environment()
    aws_version = common._first_line([*aws_command(), "--version"])
    report = [
        f"### Upload benchmark, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        f"- Tools: {env['tar']}; {env['zstd']}; {aws_version}; moto server in its own process "
        "on 127.0.0.1 (its CPU is not counted, but it shares the cores)",
        f"- ours: `{shlex.join(ours_cmd)} backup --json {SOURCE}=DATASET` (fresh "
        "`CLOUDBACKUP_LOCAL_DIR` and bucket per run, defaults otherwise: 8 MiB parts, 4 at a time, sent while the archive is written)",
        f"- theirs: `tar -cf - -C DATASET . | zstd -{args.level} -T0 -q -o OUT.tar.zst && "
        "sha256sum OUT.tar.zst && aws s3 cp OUT.tar.zst s3://BUCKET/KEY --endpoint-url URL` "
        "(fresh bucket per run; AWS CLI defaults: 8 MiB parts, 10 at a time)",
    ]
    if samples:
        report += comparison_report(args, cache_mode, sides, info, samples)
    if scaling:
        report += ["", f"- Page cache: **{cache_mode}**", "", scaling]
    text = "\n".join(report) + "\n"
    print(text)
    if args.results:
        append_results(args.results, text)
        log(f"appended to {args.results}")
    return 0


def rss_scaling(
    sizes: list[int],
    sides: list[str],
    contender: Callable[[Path, str], common.Contender],
    cache_mode: str,
) -> str:
    """One run per side on each mixed tree of ``sizes`` (default paths, generated when
    missing and kept): does peak RSS grow with the input?"""
    datasets = common.Datasets(seed=1, keep=True)
    rows: dict[str, dict[int, common.Sample]] = {side: {} for side in sides}
    infos = {}
    for size in sizes:
        dataset, info = datasets.get(size)
        infos[size] = (dataset, info)
        common.warm_cache(dataset)  # untimed, as in the comparison
        for side in sides:
            sample = common.measure_once(contender(dataset, side), cache_mode)
            rows[side][size] = sample
            log(
                f"rss-scaling {gen_dataset.size_label(size):>5} {side:>7}: wall {sample.wall:.2f} s  "
                f"CPU {sample.cpu:.2f} s  peak RSS {sample.maxrss_mib:.1f} MiB"
            )
    lines = [common.rss_scaling_report(sizes, infos, rows)]
    if "ours" in rows:
        rss = max(s.maxrss_mib for s in rows["ours"].values())
        mark = "meets" if rss <= RSS_BAR_MIB else "misses"
        lines.append(
            f"- ours' highest peak RSS over the sizes: **{rss:.1f} MiB** "
            f"({mark} the bar of ≤ {RSS_BAR_MIB:.0f} MiB)"
        )
    return "\n".join(lines)


def comparison_report(
    args: argparse.Namespace,
    cache_mode: str,
    sides: list[str],
    info: dict[str, Any],
    samples: dict[str, list[common.Sample]],
) -> list[str]:
    return [
        f"- Dataset: `{args.dataset}`, {info['files']:,} files, {info['bytes']:,} bytes "
        f"({common.fmt_bytes(info['bytes'])})",
        f"- Page cache: **{cache_mode}**; {args.runs} runs per side, interleaved "
        f"({' → '.join(sides)} → ...); medians with (min–max); "
        "output size = what stays on local disk",
        "",
        common.comparison_table(samples, info["bytes"]),
        "",
        phase_table(samples),
        "",
        *verdict(samples),
        "",
        "<details><summary>All runs</summary>",
        "",
        common.runs_table(samples, info["bytes"]),
        "",
        "</details>",
    ]


if __name__ == "__main__":
    sys.exit(main())
