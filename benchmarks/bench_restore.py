#!/usr/bin/env python3
"""Benchmark ``cloudbackup restore --from remote`` against ``aws s3 cp && sha256sum -c && tar -x``.

    python benchmarks/bench_restore.py [--dataset /tmp/cb-bench/ds-1g] [--runs 5]
                                       [--cache auto|cold|warm] [--only ours|theirs]
                                       [--results benchmarks/RESULTS.md] [--keep]

A moto S3 server runs in its own process (``python -m moto.server``) on 127.0.0.1. One
backup of the dataset is uploaded once, with ``cloudbackup backup``; then the two sides
run interleaved (ours, theirs, ours, ...), each from scratch into an empty directory:

* **ours**: ``cloudbackup restore bench --to OUT --from remote`` with an empty
  ``CLOUDBACKUP_LOCAL_DIR`` (a fresh machine), ``CLOUDBACKUP_HOST=bench``: LIST, GET the
  manifest, one streamed GET of the archive into a temp file (hashed on the way), verify,
  extract into a staging directory, count, rename into place, remove the temp file.
* **theirs**: ``aws s3 cp s3://BUCKET/KEY OUT/a.tar.zst`` (one GET: the AWS CLI's
  ``multipart_threshold`` is set to 10GB in a config file) ``&& sha256sum -c`` (against the
  manifest's digest) ``&& tar --zstd -xf a.tar.zst -C OUT/tree && rm a.tar.zst``.

Measured per command with ``os.wait4`` (see common.py): wall, CPU (user+sys of the
whole process tree), peak RSS (the largest single process). moto answers every GET
from memory on the same machine, so this measures the client side of a restore, not a
network. Linux only.
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
import time
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


def append_results(path: Path, text: str) -> None:
    common.append_under_heading(path, "Restore", text)


BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE = "bench"
HOST = "bench"
BUCKET = "cloudbackup-bench"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def base_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDBACKUP_", "AWS_"))}
    env.update(AWS_ENV)
    env.update(
        {
            "CLOUDBACKUP_HOST": HOST,
            "CLOUDBACKUP_S3_BUCKET": BUCKET,
            "CLOUDBACKUP_S3_ENDPOINT_URL": endpoint,
        }
    )
    return env


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


def upload_once(
    dataset: Path, work: Path, endpoint: str, ours: list[str], ours_env: dict[str, str]
) -> dict[str, Any]:
    """Create the bucket, back the dataset up into it once; return the remote manifest."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    local = work / "upload-local"
    cwd = work / "upload-cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    env = base_env(endpoint) | ours_env | {"CLOUDBACKUP_LOCAL_DIR": str(local)}
    log("backing the dataset up into the bucket once (untimed) ...")
    started = time.perf_counter()
    common.run_measured([*ours, "backup", f"{SOURCE}={dataset}"], env=env, cwd=cwd)
    log(f"... done in {time.perf_counter() - started:.1f} s")
    shutil.rmtree(local)  # the restores run on a "fresh machine"
    keys = [
        item["Key"]
        for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        if item["Key"].endswith(".manifest.json")
    ]
    (key,) = keys
    manifest: dict[str, Any] = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    manifest["archive_key"] = key.rsplit("/", 1)[0] + "/" + manifest["archive"]
    return manifest


def make_ours(
    work: Path, endpoint: str, ours: list[str], ours_env: dict[str, str], extra: dict[str, str]
) -> common.Contender:
    out = work / "ours-out"
    local = work / "ours-local"
    cwd = work / "ours-cwd"

    def prepare() -> None:
        for path in (out, local):
            shutil.rmtree(path, ignore_errors=True)
        local.mkdir(parents=True)  # empty: a fresh machine
        cwd.mkdir(parents=True, exist_ok=True)

    def command() -> tuple[list[str], dict[str, str], str]:
        env = base_env(endpoint) | ours_env | {"CLOUDBACKUP_LOCAL_DIR": str(local)} | extra
        return [*ours, "restore", SOURCE, "--to", str(out), "--from", "remote"], env, str(cwd)

    def output_bytes() -> int:
        files, total = tree_stats(out)
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
        if leftovers:
            raise common.CommandFailed(f"ours left {leftovers} in {work}")
        return total

    def cleanup() -> None:
        shutil.rmtree(out, ignore_errors=True)

    return common.Contender("ours", command, prepare, output_bytes, cleanup)


def make_theirs(work: Path, endpoint: str, manifest: dict[str, Any]) -> common.Contender:
    out = work / "theirs-out"
    config = work / "aws-config"
    config.write_text(
        "[default]\ns3 =\n  multipart_threshold = 10GB\n  max_concurrent_requests = 10\n"
    )
    archive = out / "a.tar.zst"
    tree = out / "tree"
    q = shlex.quote
    script = (
        f"{shlex.join(aws_command())} s3 cp --only-show-errors --endpoint-url {q(endpoint)} "
        f"s3://{BUCKET}/{q(manifest['archive_key'])} {q(str(archive))}"
        f" && echo {q(manifest['sha256'] + '  ' + str(archive))} | sha256sum -c --quiet"
        f" && tar --zstd -xf {q(str(archive))} -C {q(str(tree))}"
        f" && rm {q(str(archive))}"
    )

    def prepare() -> None:
        shutil.rmtree(out, ignore_errors=True)
        tree.mkdir(parents=True)

    def command() -> tuple[list[str], dict[str, str], str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENV)
        env["AWS_CONFIG_FILE"] = str(config)
        env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        return ["bash", "-o", "pipefail", "-c", script], env, str(work)

    def output_bytes() -> int:
        return tree_stats(tree)[1]

    def cleanup() -> None:
        shutil.rmtree(out, ignore_errors=True)

    return common.Contender("theirs", command, prepare, output_bytes, cleanup)


def restore_metrics(restored_bytes: int) -> dict[str, common.Metric]:
    return {
        "Wall time (s)": (lambda s: s.wall, 2),
        "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
        "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
        "Throughput (MB/s of restored data)": (lambda s: restored_bytes / common.MB / s.wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        type=Path,
        default=BENCH_ROOT / "ds-1g",
        help="dataset directory (default /tmp/cb-bench/ds-1g; generated with "
        "gen_dataset.py --size 1GiB --seed 1 when missing)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument("--cache", choices=("auto", "cold", "warm"), default="auto")
    parser.add_argument("--only", choices=("ours", "theirs"), help="run one side only")
    parser.add_argument("--ours-cmd", help="command for cloudbackup")
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for ours"
    )
    parser.add_argument("--port", type=int, help="moto server port (default: a free one)")
    parser.add_argument("--workdir", type=Path, default=BENCH_ROOT / "work")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--results", type=Path, help="append the report to this file")
    args = parser.parse_args(argv)
    extra = common.env_pairs(parser, args.ours_env)

    dataset: Path = args.dataset
    info = gen_dataset.read_info(dataset)
    if info is None:
        if dataset.exists():
            files, total = tree_stats(dataset)
            info = {"files": files, "bytes": total}
        else:
            log(f"generating {dataset} (1 GiB, seed 1) ...")
            info = gen_dataset.generate(dataset, gen_dataset.GiB, 1, force=True, quiet=True)
    cache_mode = common.resolve_cache_mode(args.cache)
    ours, ours_env = ours_base_command(args.ours_cmd)
    sides = [args.only] if args.only else ["ours", "theirs"]
    work = args.workdir / f"restore-{os.getpid()}"
    work.mkdir(parents=True)
    server = MotoServer(work, args.port)
    try:
        server.start()
        manifest = upload_once(dataset, work, server.url, ours, ours_env)
        log(
            f"archive {manifest['archive_key']}: {common.fmt_bytes(manifest['size'])}, "
            f"{manifest['file_count']} files, {common.fmt_bytes(manifest['uncompressed_bytes'])}"
        )
        contenders = []
        if "ours" in sides:
            contenders.append(make_ours(work, server.url, ours, ours_env, extra))
        if "theirs" in sides:
            contenders.append(make_theirs(work, server.url, manifest))
        samples = common.run_interleaved(contenders, args.runs, cache_mode)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    restored = manifest["uncompressed_bytes"]
    for name, runs in samples.items():
        for s in runs:
            if s.output_bytes != restored:
                raise SystemExit(
                    f"{name} restored {s.output_bytes} bytes, the manifest says {restored}"
                )
    env = common.environment()
    aws_version = common._first_line([*aws_command(), "--version"])
    report = [
        f"### Restore benchmark, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        f"- Tools: {env['tar']}; {env['zstd']}; {aws_version}; moto server (own process, 127.0.0.1)",
        f"- Dataset: `{dataset}`, {info['files']:,} files, {info['bytes']:,} bytes; archive "
        f"{manifest['size']:,} bytes ({manifest['compression']}), {manifest['file_count']:,} "
        f"members, {restored:,} bytes of file content",
        f"- ours: `cloudbackup restore {SOURCE} --to OUT --from remote` (empty "
        "`CLOUDBACKUP_LOCAL_DIR`, a fresh machine; one streamed GET into a temp file, "
        "SHA-256 on the way, then extract, count, rename into place)",
        "- theirs: `aws s3 cp s3://BUCKET/KEY a.tar.zst` (`multipart_threshold = 10GB`: one GET) "
        "`&& sha256sum -c && tar --zstd -xf a.tar.zst -C OUT && rm a.tar.zst`",
        f"- Page cache: **{cache_mode}**; {args.runs} runs per side, interleaved "
        f"({' → '.join(sides)} → ...), medians (min–max); MB = 10⁶ bytes; output dirs removed "
        "between runs (untimed)",
        "",
        common.comparison_table(samples, restored, metrics=restore_metrics(restored)),
        "",
        "<details><summary>All runs</summary>",
        "",
        common.runs_table(samples, None, output_label="Restored"),
        "",
        "</details>",
    ]
    if "ours" in samples:
        rto = statistics.median(s.wall for s in samples["ours"])
        report += [
            "",
            f"RTO for this dataset (ours, median wall time, client side): **{rto:.1f} s** "
            f"for {common.fmt_bytes(restored)} in {manifest['file_count']:,} files.",
        ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.results:
        append_results(args.results, text)
        log(f"appended to {args.results} under '## Restore'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
