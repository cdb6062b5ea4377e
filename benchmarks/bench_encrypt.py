#!/usr/bin/env python3
"""Benchmark the cost of age encryption: cloudbackup with and without ``CLOUDBACKUP_AGE_RECIPIENTS``.

    python benchmarks/bench_encrypt.py [--dataset /tmp/cb-bench/ds-1g] [--runs 5]
                                       [--part backup|restore|both] [--scratch tmpfs|disk]
                                       [--cache auto|cold|warm] [--ours-env KEY=VALUE]...
                                       [--results benchmarks/RESULTS.md] [--keep]

The harness makes an age identity for the run (``age-keygen`` when it is on PATH, else the
``pyrage`` module), in the workdir, mode 0600. A moto S3 server runs in its own process
on 127.0.0.1. Both contenders are ours; they differ only in the encryption settings:

* **backup** (``--part backup``): ``cloudbackup backup --json bench=DATASET`` (archive +
  upload), **plain** without and **age** with ``CLOUDBACKUP_AGE_RECIPIENTS=<the recipient>``,
  interleaved (plain, age, plain, ...), each into a fresh bucket and an emptied
  ``CLOUDBACKUP_LOCAL_DIR`` on the workdir's disk (as a server has it).
* **restore** (``--part restore``): the dataset is backed up once as source ``plain`` and
  once, encrypted, as source ``age`` (untimed); then ``cloudbackup restore SOURCE --to OUT
  --from remote --json`` with an empty local dir (a fresh machine), the **age** side with
  ``CLOUDBACKUP_AGE_IDENTITY_FILE=<the identity file>``; restore targets and local dirs on
  a tmpfs mounted by the harness (``--scratch tmpfs``, the default here).

Bars (issue "Client-side encryption with age"): backup + upload with encryption ≤ 1.10×
the wall time without, peak RSS at most 10 MiB above; restore with decryption ≤ 1.15×
without. Whether the version under test encrypted at all is read from the bucket (``.age``
objects); a version that does not know the variables warns about them, backs up in
plaintext, and the script still runs and says so. Linux only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_restore  # noqa: E402
import common  # noqa: E402

log = common.log
BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE = "bench"
HOST = "bench"
WALL_BAR = 1.10  # backup + upload with encryption, at most 1.10x without
RSS_BAR_MIB = 10.0  # peak RSS at most 10 MiB above the unencrypted run
RESTORE_BAR = 1.15  # restore with decryption, at most 1.15x without (tmpfs scratch)


@dataclass
class Identity:
    path: Path
    recipient: str
    made_with: str


def make_identity(directory: Path) -> Identity:
    """A fresh age identity (``age-keygen``, else ``pyrage``); the secret stays in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "age-identity.txt"
    keygen = shutil.which("age-keygen")
    if keygen:
        subprocess.run([keygen, "-o", str(path)], check=True, capture_output=True)
        recipient = subprocess.run(
            [keygen, "-y", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        os.chmod(path, 0o600)
        version = common._first_line([keygen, "--version"])
        return Identity(path, recipient, f"`age-keygen` {version}")
    try:
        from pyrage import x25519  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit(
            "an age identity is needed: install age (age-keygen) or the pyrage module"
        ) from None
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"# public key: {recipient}\n{identity}\n")
    return Identity(path, recipient, "`pyrage`")


@dataclass
class Side:
    """What one contender's runs left behind: were its objects encrypted, what it warned."""

    encrypted: list[bool] = field(default_factory=list)
    remote_bytes: list[int] = field(default_factory=list)


def encrypted_objects(keys: list[str]) -> bool:
    return any(k.endswith(".age") for k in keys)


def make_backup_side(
    name: str,
    dataset: Path,
    work: Path,
    endpoint: str,
    buckets: common.Buckets,
    base: list[str],
    base_env: dict[str, str],
    env_extra: dict[str, str],
) -> tuple[common.Contender, Side]:
    local = work / f"{name}-local"
    cwd = work / f"{name}-cwd"
    side = Side()
    bucket = [""]

    def prepare() -> None:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        cwd.mkdir(parents=True, exist_ok=True)
        bucket[0] = buckets.create(name)

    def command() -> tuple[list[str], dict[str, str], str]:
        env = common.clean_env() | base_env
        env |= {
            "CLOUDBACKUP_LOCAL_DIR": str(local),
            "CLOUDBACKUP_HOST": HOST,
            "CLOUDBACKUP_S3_BUCKET": bucket[0],
            "CLOUDBACKUP_S3_ENDPOINT_URL": endpoint,
        }
        env |= env_extra
        return [*base, "backup", "--json", f"{SOURCE}={dataset}"], env, str(cwd)

    def output_bytes() -> int:
        objects = buckets.objects(bucket[0])
        if not any(".tar" in o["Key"] for o in objects):
            raise common.CommandFailed(f"{name} uploaded no archive to {bucket[0]}")
        side.encrypted.append(encrypted_objects([o["Key"] for o in objects]))
        side.remote_bytes.append(sum(int(o["Size"]) for o in objects))
        return side.remote_bytes[-1]

    def cleanup() -> None:
        buckets.remove(bucket[0])

    return common.Contender(name, command, prepare, output_bytes, cleanup), side


def encryption_note(encrypted: list[bool], what: str) -> str:
    if encrypted and all(encrypted):
        return f"- {what}: **encrypted** (`.age` objects in the bucket)"
    if any(encrypted):
        return f"- {what}: encrypted in {sum(encrypted)} of {len(encrypted)} runs (!)"
    return (
        f"- {what}: **not encrypted**: no `.age` object in the bucket; this version ignores "
        "`CLOUDBACKUP_AGE_RECIPIENTS`, so both sides did the same plaintext work"
    )


def backup_metrics(input_bytes: int) -> dict[str, common.Metric]:
    return {
        "Wall time (s)": (lambda s: s.wall, 2),
        "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
        "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
        "Stored in the bucket (MiB)": (lambda s: (s.output_bytes or 0) / common.MiB, 1),
        "Throughput (MB/s of input)": (lambda s: input_bytes / common.MB / s.wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_dataset_args(
        parser,
        "dataset directory (default /tmp/cb-bench/ds-1g, or ds-small for --dataset-kind small; "
        "generated when missing)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument(
        "--part",
        choices=("backup", "restore", "both"),
        default="both",
        help="backup + upload, restore, or both (default)",
    )
    common.add_scratch_args(parser, default="tmpfs")
    common.add_harness_args(parser, BENCH_ROOT)  # --ours-env: for both sides
    args = parser.parse_args(argv)
    common.check_dataset_args(parser, args)
    if args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")
    extra = common.env_pairs(parser, args.ours_env)

    datasets = common.Datasets(args.seed, keep=True)
    cache_mode = common.resolve_cache_mode(args.cache)
    ours, ours_env = common.ours_base_command(args.ours_cmd)
    work = args.workdir / f"encrypt-{os.getpid()}"
    work.mkdir(parents=True)
    server = common.MotoServer(work, args.port)
    scratch = common.Scratch(args.scratch, work / "scratch", args.tmpfs_size)
    backup_samples: dict[str, list[common.Sample]] = {}
    restore_samples: dict[str, list[common.Sample]] = {}
    backup_sides: dict[str, Side] = {}
    restore_encrypted: list[bool] = []
    try:
        if args.part in ("restore", "both"):
            scratch_dir = scratch.__enter__()  # first: a tmpfs that cannot be mounted fails at once
        dataset, info = datasets.get(
            args.size, args.dataset, kind=args.dataset_kind, files=args.files
        )
        input_bytes = int(info["bytes"])  # type: ignore[call-overload]
        identity = make_identity(work / "keys")
        log(f"age identity made with {identity.made_with}; recipient {identity.recipient}")
        age_backup_env = extra | {"CLOUDBACKUP_AGE_RECIPIENTS": identity.recipient}
        age_restore_env = extra | {"CLOUDBACKUP_AGE_IDENTITY_FILE": str(identity.path)}
        server.start()
        buckets = common.Buckets(server.url)
        log("reading the dataset once, untimed ...")
        common.warm_cache(dataset)
        if args.part in ("backup", "both"):
            contenders = []
            for name, env_extra in (("plain", extra), ("age", age_backup_env)):
                contender, side = make_backup_side(
                    name, dataset, work, server.url, buckets, ours, ours_env, env_extra
                )
                contenders.append(contender)
                backup_sides[name] = side
            backup_samples = common.run_interleaved(contenders, args.runs, cache_mode)
        if args.part in ("restore", "both"):
            backups = bench_restore.Backups(
                server.url, work / "upload-local", work / "upload-cwd", ours, ours_env, extra
            )
            for source, overrides in (("plain", {}), ("age", age_backup_env)):
                log(f"backing the dataset up once as source {source} (untimed) ...")
                backups.backup(f"{source}={dataset}", overrides)
            backups.forget_local()  # the restores run on a "fresh machine"
            restore_encrypted = [encrypted_objects(backups.names("age"))]
            contenders = [
                bench_restore.make_ours(
                    name, name, scratch_dir, server.url, backups.local, ours, ours_env, env_extra
                )
                for name, env_extra in (("plain", extra), ("age", age_restore_env))
            ]
            restore_samples = common.run_interleaved(contenders, args.runs, cache_mode)
    finally:
        server.stop()
        scratch.unmount()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    restored = common.regular_files(dataset)[1]
    for name, runs in restore_samples.items():
        for s in runs:
            if s.output_bytes != restored:
                raise SystemExit(
                    f"{name} restored {s.output_bytes} bytes, the dataset has {restored}"
                )

    env = common.environment()
    report = [
        f"### Encryption benchmark, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        f"- Tools: moto server in its own process on 127.0.0.1; age identity made by the harness "
        f"with {identity.made_with}",
        common.dataset_description(dataset, info),
        f"- Both sides: `{shlex.join(ours)}`; **age** adds `CLOUDBACKUP_AGE_RECIPIENTS=age1...` "
        "(backup) or `CLOUDBACKUP_AGE_IDENTITY_FILE=FILE` (restore)"
        + (f"; extra environment for both: `{' '.join(args.ours_env)}`" if args.ours_env else ""),
        f"- Page cache: **{cache_mode}**; {args.runs} runs per side, interleaved (plain → age → ...), "
        "medians (min–max)",
    ]
    if backup_samples:
        report += [
            "",
            "#### Backup + upload",
            "",
            "- `cloudbackup backup --json bench=DATASET`, fresh bucket and local dir (on "
            f"{common.storage_of(work)}) per run",
            encryption_note(backup_sides["age"].encrypted, "age side's archives"),
            "",
            common.comparison_table(
                backup_samples,
                input_bytes,
                ours="age",
                theirs="plain",
                metrics=backup_metrics(input_bytes),
            ),
            "",
        ]
        if backup_samples.get("age") and backup_samples.get("plain"):
            wall = statistics.median(s.wall for s in backup_samples["age"]) / statistics.median(
                s.wall for s in backup_samples["plain"]
            )
            rss = statistics.median(
                s.maxrss_mib for s in backup_samples["age"]
            ) - statistics.median(s.maxrss_mib for s in backup_samples["plain"])
            caveat = "" if all(backup_sides["age"].encrypted) else " (nothing was encrypted)"
            report += [
                common.bar_line(f"Wall time age/plain, backup + upload{caveat}", wall, WALL_BAR),
                common.bar_line(
                    f"Peak RSS age − plain (medians){caveat}",
                    rss,
                    RSS_BAR_MIB,
                    unit=" MiB",
                    digits=1,
                    sign="+",
                ),
            ]
        report += [
            "",
            "<details><summary>All runs (backup + upload)</summary>",
            "",
            common.runs_table(backup_samples, input_bytes, output_label="Stored"),
            "",
            "</details>",
        ]
    if restore_samples:
        report += [
            "",
            "#### Restore from moto",
            "",
            "- `cloudbackup restore SOURCE --to OUT --from remote --json`, empty local dir (a fresh "
            f"machine); restore targets and local dirs on {scratch.describe()}",
            encryption_note(restore_encrypted, "source `age` in the bucket"),
            "",
            common.comparison_table(
                restore_samples,
                restored,
                ours="age",
                theirs="plain",
                metrics={
                    "Wall time (s)": (lambda s: s.wall, 2),
                    "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
                    "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
                    "Throughput (MB/s of restored data)": (
                        lambda s: restored / common.MB / s.wall,
                        1,
                    ),
                },
            ),
            "",
            common.stages_table(restore_samples, ["plain", "age"]),
            "",
        ]
        if restore_samples.get("age") and restore_samples.get("plain"):
            ratio = statistics.median(s.wall for s in restore_samples["age"]) / statistics.median(
                s.wall for s in restore_samples["plain"]
            )
            note = "" if args.scratch == "tmpfs" else " (the bar is stated for tmpfs scratch)"
            if not all(restore_encrypted):
                note += " (nothing was encrypted)"
            report.append(
                common.bar_line(f"Wall time age/plain, restore{note}", ratio, RESTORE_BAR)
            )
        report += [
            "",
            "<details><summary>All runs (restore)</summary>",
            "",
            common.runs_table(restore_samples, None, output_label="Restored"),
            "",
            "</details>",
        ]
    common.emit_report("\n".join(report) + "\n", args.results, "Encryption")
    return 0


if __name__ == "__main__":
    sys.exit(main())
