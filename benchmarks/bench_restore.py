#!/usr/bin/env python3
"""Benchmark ``cloudbackup restore`` against ``aws s3 cp && sha256sum -c && tar -x`` (or ``tar -x``).

    python benchmarks/bench_restore.py [--dataset /tmp/cb-bench/ds-1g] [--runs 5]
                                       [--dataset-kind mixed|small] [--files N]
                                       [--from remote|local] [--scratch disk|tmpfs]
                                       [--chain N [--churn 0.01]]
                                       [--cache auto|cold|warm] [--only ours|theirs]
                                       [--results benchmarks/RESULTS.md] [--keep]

One backup of the dataset is made once (untimed) with ``cloudbackup backup``; then the
two sides run interleaved (ours, theirs, ours, ...), each from scratch into an empty
directory, on the workdir's disk or, with ``--scratch tmpfs``, on a tmpfs that the
harness mounts for the run (restore targets, ours' local dir, theirs' download):

``--from remote`` (default): a moto S3 server runs in its own process on 127.0.0.1 and
holds the backup.

* **ours**: ``cloudbackup restore bench --to OUT --from remote --json`` with an empty
  ``CLOUDBACKUP_LOCAL_DIR`` (a fresh machine), ``CLOUDBACKUP_HOST=bench``.
* **theirs**: ``aws s3 cp s3://BUCKET/KEY OUT/a.tar.zst`` (one GET: the AWS CLI's
  ``multipart_threshold`` is set to 10GB in a config file) ``&& sha256sum -c`` (against the
  manifest's digest) ``&& tar --zstd -xf a.tar.zst -C OUT/tree && rm a.tar.zst``.

``--from local``: no S3; the backup stays in a local dir (on the scratch filesystem).

* **ours**: ``cloudbackup restore bench --to OUT --from local --json``.
* **theirs**: ``tar --zstd -xf ARCHIVE -C OUT`` of the very same archive file.

``--chain N`` (incremental chains): the backup is a chain: a full, then N-1 backups each
after one night of ~1 % churn (``churn.py``) of a copy of the dataset, made with
``CLOUDBACKUP_FULL_EVERY=N`` (``--ours-env`` can override it); then one full backup of the
final tree (source ``bench-full``, ``CLOUDBACKUP_FULL_EVERY=0``). The two contenders are
both ours: **chain** restores the newest backup of ``bench`` (the head of the chain) and
**full** restores ``bench-full``. A version without incremental backups makes every backup
full; the mode still runs and says so.

When ours' ``restore --json`` output carries stage timings (``{"stages": {"read": s,
"hash": s, "decrypt": s, "decompress": s, "extract": s, "count": s, "install": s}}``, every
key optional; older versions said ``download``), the report has a table of their medians;
otherwise it says "not reported". The stages overlap (one streaming pass): their sum may
exceed the wall time.

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

import churn  # noqa: E402
import common  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
log = common.log
free_port = common.free_port
MotoServer = common.MotoServer
ours_base_command = common.ours_base_command
aws_command = common.aws_command
tree_stats = common.tree_stats


def append_results(path: Path, text: str) -> None:
    common.append_under_heading(path, "Restore", text)


BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE = "bench"
FULL_SOURCE = "bench-full"
HOST = "bench"
BUCKET = "cloudbackup-bench"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Bars of the issues, each for the setting it was stated for.
REMOTE_BAR = 0.55  # 1 GiB from moto, tmpfs scratch: ours <= 0.55x GET + sha256sum -c + tar -x
LOCAL_SMALL_BAR = 2.0  # restore of the small-file tree (tmpfs): ours <= 2x tar --zstd -xf
CHAIN_BAR = 1.3  # restore of a 7-link chain <= 1.3x the restore of one full archive


def base_env(endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDBACKUP_", "AWS_"))}
    env.update(AWS_ENV)
    env["CLOUDBACKUP_HOST"] = HOST
    if endpoint is not None:
        env.update({"CLOUDBACKUP_S3_BUCKET": BUCKET, "CLOUDBACKUP_S3_ENDPOINT_URL": endpoint})
    return env


def s3_client(endpoint: str) -> Any:
    return common.Buckets(endpoint).client


class Backups:
    """Makes the backups the restores read (untimed), in the bucket or in a local dir."""

    def __init__(
        self,
        endpoint: str | None,
        local: Path,
        cwd: Path,
        ours: list[str],
        ours_env: dict[str, str],
        extra: dict[str, str],
    ) -> None:
        self.endpoint = endpoint
        self.local = local
        self.cwd = cwd
        self.ours = ours
        self.ours_env = ours_env
        self.extra = extra
        cwd.mkdir(parents=True, exist_ok=True)
        if endpoint is not None:
            s3_client(endpoint).create_bucket(Bucket=BUCKET)

    def backup(self, spec: str, overrides: dict[str, str] | None = None) -> None:
        env = base_env(self.endpoint) | self.ours_env | {"CLOUDBACKUP_LOCAL_DIR": str(self.local)}
        env |= self.extra | (overrides or {})
        args = [*self.ours, "backup", spec]
        if self.endpoint is None:
            args.insert(len(self.ours) + 1, "--no-upload")
        started = time.perf_counter()
        common.run_measured(args, env=env, cwd=self.cwd)
        log(f"... backup {spec.split('=')[0]} done in {time.perf_counter() - started:.1f} s")

    def names(self, source: str) -> list[str]:
        """File names of ``source``'s backups (archives, manifests, indexes), sorted."""
        if self.endpoint is not None:
            client = s3_client(self.endpoint)
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
            return sorted(k.rsplit("/", 1)[1] for k in keys if f"/{HOST}/{source}/" in k)
        directory = self.local / HOST / source
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def only_manifest(self, source: str) -> dict[str, Any]:
        """The manifest of ``source``'s one backup (with where its archive is)."""
        names = [n for n in self.names(source) if n.endswith(".manifest.json")]
        if len(names) != 1:
            raise SystemExit(f"expected one backup of {source}, found manifests {names}")
        name = names[0]
        if self.endpoint is not None:
            client = s3_client(self.endpoint)
            prefix = next(
                o["Key"].rsplit("/", 1)[0]
                for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
                if o["Key"].endswith("/" + name)
            )
            body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()
            manifest: dict[str, Any] = json.loads(body)
            manifest["archive_key"] = f"{prefix}/{manifest['archive']}"
        else:
            manifest = json.loads((self.local / HOST / source / name).read_text())
            manifest["archive_path"] = str(self.local / HOST / source / manifest["archive"])
        return manifest

    def forget_local(self) -> None:
        """A remote restore runs on a "fresh machine": drop the local dir of the backups."""
        if self.endpoint is not None:
            shutil.rmtree(self.local, ignore_errors=True)


def make_ours(
    name: str,
    source: str,
    scratch: Path,
    endpoint: str | None,
    backups_local: Path,
    ours: list[str],
    ours_env: dict[str, str],
    extra: dict[str, str],
) -> common.Contender:
    out = scratch / f"{name}-out"
    remote = endpoint is not None
    local = scratch / f"{name}-local" if remote else backups_local
    cwd = scratch.parent / f"{name}-cwd"

    def prepare() -> None:
        shutil.rmtree(out, ignore_errors=True)
        if remote:
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)  # empty: a fresh machine
        cwd.mkdir(parents=True, exist_ok=True)

    def command() -> tuple[list[str], dict[str, str], str]:
        env = base_env(endpoint) | ours_env | {"CLOUDBACKUP_LOCAL_DIR": str(local)} | extra
        where = "remote" if remote else "local"
        return (
            [*ours, "restore", source, "--to", str(out), "--from", where, "--json"],
            env,
            str(cwd),
        )

    def output_bytes() -> int:
        files, total = tree_stats(out)
        leftovers = [p.name for p in scratch.iterdir() if p.name.startswith(".")]
        if leftovers:
            raise common.CommandFailed(f"{name} left {leftovers} in {scratch}")
        files_seen[name].append(files)
        return total

    def cleanup() -> None:
        shutil.rmtree(out, ignore_errors=True)

    files_seen.setdefault(name, [])
    return common.Contender(name, command, prepare, output_bytes, cleanup)


files_seen: dict[str, list[int]] = {}  # restored entries per run, per contender


def _theirs(
    work: Path, out: Path, tree: Path, script: str, env: dict[str, str] | None
) -> common.Contender:
    """The reference: ``bash -o pipefail -c SCRIPT`` restoring into ``tree`` (inside ``out``)."""

    def prepare() -> None:
        shutil.rmtree(out, ignore_errors=True)
        tree.mkdir(parents=True)

    def command() -> tuple[list[str], dict[str, str] | None, str]:
        return ["bash", "-o", "pipefail", "-c", script], env, str(work)

    def output_bytes() -> int:
        files, total = tree_stats(tree)
        files_seen["theirs"].append(files)
        return total

    def cleanup() -> None:
        shutil.rmtree(out, ignore_errors=True)

    files_seen.setdefault("theirs", [])
    return common.Contender("theirs", command, prepare, output_bytes, cleanup)


def make_theirs_remote(
    work: Path, scratch: Path, endpoint: str, manifest: dict[str, Any]
) -> common.Contender:
    """One GET (``aws s3 cp``) + ``sha256sum -c`` + ``tar --zstd -xf`` + ``rm``."""
    out = scratch / "theirs-out"
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENV)
    env["AWS_CONFIG_FILE"] = str(config)
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return _theirs(work, out, tree, script, env)


def make_theirs_local(work: Path, scratch: Path, manifest: dict[str, Any]) -> common.Contender:
    """``tar --zstd -xf`` of ours' very archive file."""
    archive = Path(manifest["archive_path"])
    if not archive.name.endswith(".tar.zst"):
        raise SystemExit(
            f"--from local: the reference `tar --zstd -xf` cannot read {archive.name} "
            "(not a plain .tar.zst: encrypted or another codec); run with --only ours"
        )
    out = scratch / "theirs-out"
    script = f"tar --zstd -xf {shlex.quote(str(archive))} -C {shlex.quote(str(out))}"
    return _theirs(work, out, out, script, None)


def restore_metrics(restored_bytes: int) -> dict[str, common.Metric]:
    return {
        "Wall time (s)": (lambda s: s.wall, 2),
        "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
        "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
        "Throughput (MB/s of restored data)": (lambda s: restored_bytes / common.MB / s.wall, 1),
    }


def prepare_chain(
    backups: Backups, dataset: Path, tree: Path, links: int, seed: int, rate: float
) -> tuple[list[str], list[str]]:
    """The chain (night 1 + N-1 churned nights), then one full of the final tree; return
    the chain's churn lines and a description of what the bucket (or local dir) holds."""
    log(f"copying {dataset} to {tree} (the chain's working tree) ...")
    common.copy_tree(dataset, tree)
    chain_env = {"CLOUDBACKUP_FULL_EVERY": str(links)}
    chain_env |= {k: v for k, v in backups.extra.items() if k == "CLOUDBACKUP_FULL_EVERY"}
    churned: list[str] = []
    for night in range(1, links + 1):
        if night > 1:
            stats = churn.apply_churn(tree, night, seed, rate)
            churned.append(stats.line())
            log(stats.line())
        backups.backup(f"{SOURCE}={tree}", chain_env)
    backups.backup(f"{FULL_SOURCE}={tree}", {"CLOUDBACKUP_FULL_EVERY": "0"})
    names = backups.names(SOURCE)
    archives = [n for n in names if ".tar" in n and not n.endswith((".json", ".partial"))]
    incr = [n for n in archives if ".incr.tar" in n]
    full = [n for n in archives if ".incr.tar" not in n]
    facts = [
        f"`{SOURCE}` holds {len(archives)} archives: {len(full)} full, {len(incr)} incremental "
        f"(`CLOUDBACKUP_FULL_EVERY={chain_env['CLOUDBACKUP_FULL_EVERY']}`)"
    ]
    if not incr:
        facts.append(
            "this version made every backup full: **chain** restores one full archive "
            "(the comparison is full vs full until incremental backups exist)"
        )
    return churned, facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_dataset_args(
        parser,
        "dataset directory (default /tmp/cb-bench/ds-1g, or ds-small for --dataset-kind small; "
        "generated when missing)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument("--only", choices=("ours", "theirs"), help="run one side only")
    parser.add_argument(
        "--from",
        dest="where",
        choices=("remote", "local"),
        default="remote",
        help="remote (default): from moto, vs GET + sha256sum -c + tar -x; "
        "local: from the local dir, vs tar --zstd -xf of the same archive",
    )
    common.add_scratch_args(parser)
    parser.add_argument(
        "--chain",
        type=int,
        metavar="N",
        help="restore the head of an N-link chain vs one full archive of the same tree",
    )
    parser.add_argument(
        "--churn",
        type=float,
        default=0.01,
        help="share of files changed per night in the chain (default 0.01)",
    )
    common.add_harness_args(parser, BENCH_ROOT)
    args = parser.parse_args(argv)
    common.check_dataset_args(parser, args)
    if args.chain is not None:
        if args.chain < 2:
            parser.error("--chain needs at least 2 links")
        if args.only:
            parser.error("--chain compares two restores of ours; --only does not apply")
    if args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")
    extra = common.env_pairs(parser, args.ours_env)

    datasets = common.Datasets(args.seed, keep=True)  # generated datasets are kept for next time
    cache_mode = common.resolve_cache_mode(args.cache)
    ours, ours_env = ours_base_command(args.ours_cmd)
    remote = args.where == "remote"
    if args.chain is not None:
        sides = ["chain", "full"]
    else:
        sides = [args.only] if args.only else ["ours", "theirs"]
    work = args.workdir / f"restore-{os.getpid()}"
    work.mkdir(parents=True)
    server = MotoServer(work, args.port) if remote else None
    scratch = common.Scratch(args.scratch, work / "scratch", args.tmpfs_size)
    chain_facts: list[str] = []
    churned: list[str] = []
    try:
        scratch_dir = scratch.__enter__()  # first: a tmpfs that cannot be mounted fails at once
        dataset, info = datasets.get(
            args.size, args.dataset, kind=args.dataset_kind, files=args.files
        )
        if server is not None:
            server.start()
        endpoint = server.url if server is not None else None
        backups = Backups(
            endpoint, scratch_dir / "backups-local", work / "backup-cwd", ours, ours_env, extra
        )
        if args.chain is not None:
            tree = work / "tree"
            churned, chain_facts = prepare_chain(
                backups, dataset, tree, args.chain, args.seed, args.churn
            )
            manifest = backups.only_manifest(FULL_SOURCE)
            expected_files, restored = tree_stats(tree)
        else:
            log("backing the dataset up once (untimed) ...")
            backups.backup(f"{SOURCE}={dataset}")
            manifest = backups.only_manifest(SOURCE)
            restored = int(manifest.get("tree_bytes", manifest["uncompressed_bytes"]))
            expected_files = None
        backups.forget_local()
        log(
            f"archive {manifest['archive']}: {common.fmt_bytes(manifest['size'])}, "
            f"{manifest['file_count']} files, {common.fmt_bytes(manifest['uncompressed_bytes'])}"
        )
        contenders = []
        if args.chain is not None:
            for name, source in (("chain", SOURCE), ("full", FULL_SOURCE)):
                contenders.append(
                    make_ours(
                        name, source, scratch_dir, endpoint, backups.local, ours, ours_env, extra
                    )
                )
        else:
            if "ours" in sides:
                contenders.append(
                    make_ours(
                        "ours", SOURCE, scratch_dir, endpoint, backups.local, ours, ours_env, extra
                    )
                )
            if "theirs" in sides:
                contenders.append(
                    make_theirs_remote(work, scratch_dir, endpoint, manifest)
                    if endpoint is not None
                    else make_theirs_local(work, scratch_dir, manifest)
                )
        samples = common.run_interleaved(contenders, args.runs, cache_mode)
    finally:
        if server is not None:
            server.stop()
        scratch.unmount()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    for name, runs in samples.items():
        for s in runs:
            if s.output_bytes != restored:
                raise SystemExit(
                    f"{name} restored {s.output_bytes} bytes, expected {restored} "
                    "(the manifest's, or the source tree's for --chain)"
                )
        if expected_files is not None and any(f != expected_files for f in files_seen[name]):
            raise SystemExit(
                f"{name} restored {files_seen[name]} entries, the source tree has {expected_files}"
            )
    env = common.environment()
    aws_version = common._first_line([*aws_command(), "--version"]) if remote else ""
    title = "Restore benchmark" + (f", {args.chain}-link chain" if args.chain else "")
    if not remote:
        title += ", from the local dir"
    pair = ("chain", "full") if args.chain is not None else ("ours", "theirs")
    ours_sides = [n for n in sides if n != "theirs"]
    report = [
        f"### {title}, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        f"- Tools: {env['tar']}; {env['zstd']}"
        + (f"; {aws_version}; moto server (own process, 127.0.0.1)" if remote else ""),
        f"- Dataset: `{dataset}`, {info['files']:,} files, {info['bytes']:,} bytes, "
        f"stored on {common.storage_of(dataset)}; "
        + ("full archive of the final tree " if args.chain else "archive ")
        + f"{manifest['size']:,} bytes ({manifest['compression']}), {manifest['file_count']:,} "
        f"members, {restored:,} bytes of file content",
    ]
    if args.chain is not None:
        report += [
            f"- Chain: a copy of the dataset, backed up {args.chain} times; before each backup "
            f"after the first, one night of churn (`churn.py`, {args.churn:.0%} of the files, "
            f"seed {args.seed}); then one full backup of the final tree (`{FULL_SOURCE}`, "
            "`CLOUDBACKUP_FULL_EVERY=0`)",
            *(f"  - {line}" for line in churned),
            *(f"- {fact}" for fact in chain_facts),
            f"- chain: `cloudbackup restore {SOURCE} --to OUT --from {args.where} --json` (the head "
            f"of the chain); full: `cloudbackup restore {FULL_SOURCE} --to OUT --from {args.where} "
            "--json`" + (" (empty `CLOUDBACKUP_LOCAL_DIR`: a fresh machine)" if remote else ""),
        ]
    elif remote:
        report += [
            f"- ours: `cloudbackup restore {SOURCE} --to OUT --from remote --json` (empty "
            "`CLOUDBACKUP_LOCAL_DIR`, a fresh machine)",
            "- theirs: `aws s3 cp s3://BUCKET/KEY a.tar.zst` (`multipart_threshold = 10GB`: one GET) "
            "`&& sha256sum -c && tar --zstd -xf a.tar.zst -C OUT && rm a.tar.zst`",
        ]
    else:
        report += [
            f"- ours: `cloudbackup restore {SOURCE} --to OUT --from local --json` (the backup's "
            "local dir is on the scratch filesystem)",
            "- theirs: `tar --zstd -xf ARCHIVE -C OUT`, ARCHIVE being ours' very archive file",
        ]
    if extra:
        report.append(f"- ours' extra environment: `{' '.join(args.ours_env)}`")
    report += [
        "- Scratch (restore targets, "
        + (
            "the backup's local dir"
            if not remote
            else "ours' empty local dirs"
            if args.chain
            else "ours' empty local dir, theirs' download"
        )
        + f"): {scratch.describe()}",
        f"- Page cache: **{cache_mode}**; {args.runs} runs per side, interleaved "
        f"({' → '.join(sides)} → ...), medians (min–max); MB = 10⁶ bytes; output dirs removed "
        "between runs (untimed)",
        "",
        common.comparison_table(
            samples, restored, ours=pair[0], theirs=pair[1], metrics=restore_metrics(restored)
        ),
        "",
        *([common.stages_table(samples, ours_sides), ""] if ours_sides else []),
        *verdicts(args, samples, sides),
        "",
        "<details><summary>All runs</summary>",
        "",
        common.runs_table(samples, None, output_label="Restored"),
        "",
        "</details>",
    ]
    if args.chain is None and "ours" in samples:
        rto = statistics.median(s.wall for s in samples["ours"])
        report += [
            "",
            f"RTO for this dataset (ours, median wall time, client side): **{rto:.1f} s** "
            f"for {common.fmt_bytes(restored)} in {manifest['file_count']:,} files.",
        ]
    common.emit_report("\n".join(report) + "\n", args.results, "Restore")
    return 0


def verdicts(
    args: argparse.Namespace, samples: dict[str, list[common.Sample]], sides: list[str]
) -> list[str]:
    """The issues' bars, each with the setting it was stated for (a different one is said)."""
    if len(sides) < 2 or not all(samples.get(n) for n in sides):
        return []
    ratio = statistics.median(s.wall for s in samples[sides[0]]) / statistics.median(
        s.wall for s in samples[sides[1]]
    )
    tmpfs = "" if args.scratch == "tmpfs" else "; the bar is stated for tmpfs scratch"
    if args.chain is not None:
        note = (
            ""
            if args.chain == 7
            else f"; the bar is stated for a 7-link chain, this is {args.chain}"
        )
        return [
            common.bar_line(f"Wall time chain/full ({args.chain} links{note})", ratio, CHAIN_BAR)
        ]
    if args.where == "remote":
        return [
            common.bar_line(
                f"Wall time ours/theirs, restore from moto ({args.dataset_kind} tree{tmpfs})",
                ratio,
                REMOTE_BAR,
            )
        ]
    kind = "" if args.dataset_kind == "small" else "; the bar is stated for the small-file tree"
    label = f"Wall time ours/theirs, local restore vs `tar --zstd -xf` ({args.dataset_kind} tree"
    return [common.bar_line(f"{label}{tmpfs}{kind})", ratio, LOCAL_SMALL_BAR)]


if __name__ == "__main__":
    sys.exit(main())
