#!/usr/bin/env python3
"""Benchmark nightly backups of a tree that barely changes: cloudbackup (to S3) vs restic (local repo).

    python benchmarks/bench_incremental.py [--dataset-kind mixed|small] [--files N] [--size 1GiB]
                                           [--part unchanged|nights|both] [--runs 5]
                                           [--nights 14] [--churn 0.01] [--full-every 7]
                                           [--cache auto|cold|warm] [--only ours|restic]
                                           [--ours-env KEY=VALUE]... [--results benchmarks/RESULTS.md]

A moto S3 server runs in its own process on 127.0.0.1 (as in bench_upload.py); restic
writes to a local repository on the workdir's disk (``RESTIC_PASSWORD`` set by the
harness, its cache in the workdir: the cache is used, as restic does by default).

* **(a) unchanged tree** (``--part unchanged``): each side makes one first backup of the
  dataset (untimed); then ``--runs`` timed second backups, interleaved (ours, restic,
  ours, ...): ``cloudbackup backup --json bench=DATASET`` (archive + upload) vs ``restic
  backup --host bench DATASET``. Before every timed run the state that the first backup
  left is put back (untimed): ours' local dir is copied back from a snapshot taken after
  the first backup, and every bucket object added since is deleted; restic's repository
  and cache are copied back from their snapshots. So every timed run is the second
  backup after the same first one, and leaves nothing that the next run could profit
  from. Reported: wall, CPU, peak RSS, and the bytes the run stored (the bucket's size
  delta from a LIST for ours, index and manifests included; the repository's growth for
  restic).
* **(b) nights** (``--part nights``): a copy of the dataset is backed up ``--nights``
  times by both sides (ours then restic, each night); before every night after the
  first, one night of churn (``churn.py``: ``--churn`` of the files modified, deleted or
  added, deterministic by seed) is applied. Ours runs with
  ``CLOUDBACKUP_FULL_EVERY=--full-every`` (the count form: a full after every N-1
  incrementals); ``cloudbackup backup`` never prunes and no remote retention is set, so the
  bucket keeps every backup; restic never runs ``forget``. Reported: per night and at the
  end, the bucket's total size vs the restic repository's size.

Bars (issue "Incremental archives"): (a) ours' wall ≤ 2.0× restic's, and ≤ 1 % of the
tree's size uploaded; (b) bucket bytes ≤ 2.5× the restic repository. A version without
incremental backups makes every backup full; the script still runs and says so.
Linux only.
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import churn  # noqa: E402
import common  # noqa: E402

log = common.log
BENCH_ROOT = Path("/tmp/cb-bench")
SOURCE = "bench"
HOST = "bench"
RESTIC_PASSWORD = "cloudbackup-bench-restic"
WALL_BAR = 2.0  # (a) ours' second backup at most 2x restic's re-run
UPLOAD_BAR = 0.01  # (a) at most 1 % of the tree's size stored by the second backup
SIZE_BAR = 2.5  # (b) bucket bytes at most 2.5x the restic repository


# ---------------------------------------------------------------- the two tools


@dataclass
class Ours:
    """cloudbackup with its own local dir and bucket on the moto server."""

    base: list[str]
    base_env: dict[str, str]
    extra_env: dict[str, str]
    endpoint: str
    buckets: common.Buckets
    local: Path
    cwd: Path
    bucket: str = ""

    def setup(self, label: str) -> None:
        self.bucket = self.buckets.create(label)
        self.local.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)

    def command(
        self, tree: Path, overrides: dict[str, str] | None = None
    ) -> tuple[list[str], dict[str, str], str]:
        env = common.clean_env()
        env.update(self.base_env)
        env.update(
            {
                "CLOUDBACKUP_LOCAL_DIR": str(self.local),
                "CLOUDBACKUP_HOST": HOST,
                "CLOUDBACKUP_S3_BUCKET": self.bucket,
                "CLOUDBACKUP_S3_ENDPOINT_URL": self.endpoint,
            }
        )
        env.update(overrides or {})
        env.update(self.extra_env)
        return [*self.base, "backup", "--json", f"{SOURCE}={tree}"], env, str(self.cwd)

    def keys(self) -> dict[str, int]:
        return {o["Key"]: int(o["Size"]) for o in self.buckets.objects(self.bucket)}


def archive_kind(new_keys: list[str]) -> str:
    """``incr``/``full`` from the names of the archive objects a backup added."""
    archives = [k for k in new_keys if ".tar" in k.rsplit("/", 1)[-1] and not k.endswith(".json")]
    if not archives:
        return "none"
    return "incr" if all(".incr.tar" in k for k in archives) else "full"


def check_ours(sample: common.Sample) -> None:
    doc = common.json_document(sample)
    results = doc.get("results") if doc else None
    if not isinstance(results, list) or not results or not all(r.get("ok") for r in results):
        raise common.CommandFailed(f"ours' backup did not succeed: {sample.stdout[-500:]}")


@dataclass
class Restic:
    """restic with a local repository and cache in the workdir."""

    exe: str
    repo: Path
    cache: Path
    cwd: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RESTIC_", "AWS_"))}
        env.update(
            {
                "RESTIC_REPOSITORY": str(self.repo),
                "RESTIC_PASSWORD": RESTIC_PASSWORD,
                "RESTIC_CACHE_DIR": str(self.cache),
            }
        )
        return env

    def init(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        common.run_measured([self.exe, "init"], env=self.env(), cwd=self.cwd)

    def command(self, tree: Path) -> tuple[list[str], dict[str, str], str]:
        return [self.exe, "backup", "--host", HOST, str(tree)], self.env(), str(self.cwd)

    def repo_bytes(self) -> int:
        return common.dir_bytes(self.repo)

    def repo_version(self) -> str:
        try:
            config = json.loads(
                common.run_measured(
                    [self.exe, "cat", "config"], env=self.env(), cwd=self.cwd
                ).stdout
            )
            return str(config.get("version", "?"))
        except (common.CommandFailed, ValueError):
            return "?"


def restic_exe(given: str | None) -> str:
    exe = given or shutil.which("restic")
    if not exe:
        raise SystemExit("restic is needed (apt-get install restic, or --restic PATH)")
    return exe


def restore_dir(snapshot: Path, live: Path) -> None:
    """Put ``live`` back to ``snapshot`` (a copy taken earlier), untimed."""
    shutil.rmtree(live, ignore_errors=True)
    common.copy_tree(snapshot, live)


# ---------------------------------------------------------------- (a) unchanged tree


@dataclass
class Unchanged:
    samples: dict[str, list[common.Sample]]
    first: dict[str, common.Sample]
    kinds: list[str] = field(default_factory=list)
    local_growth: list[int] = field(default_factory=list)


def part_unchanged(
    dataset: Path,
    work: Path,
    ours: Ours | None,
    restic: Restic | None,
    runs: int,
    cache_mode: str,
) -> Unchanged:
    contenders: list[common.Contender] = []
    first: dict[str, common.Sample] = {}
    result = Unchanged({}, first)
    if ours is not None:
        ours.setup("unchanged")
        log("ours: first backup + upload (untimed) ...")
        argv, env, cwd = ours.command(dataset)
        first["ours"] = common.run_measured(argv, name="ours", env=env, cwd=cwd)
        check_ours(first["ours"])
        log(f"... {first['ours'].wall:.1f} s")
        local_snapshot = work / "ours-local.first"
        common.copy_tree(ours.local, local_snapshot)
        base_keys = ours.keys()
        base_local = common.dir_bytes(local_snapshot)
        o = ours

        def ours_prepare() -> None:
            restore_dir(local_snapshot, o.local)
            o.buckets.roll_back(o.bucket, set(base_keys))

        def ours_command() -> tuple[list[str], dict[str, str], str]:
            return o.command(dataset)

        def ours_output() -> int:
            now = o.keys()
            new = [k for k in now if k not in base_keys]
            result.kinds.append(archive_kind(new))
            result.local_growth.append(common.dir_bytes(o.local) - base_local)
            return sum(now.values()) - sum(base_keys.values())

        contenders.append(common.Contender("ours", ours_command, ours_prepare, ours_output))
    if restic is not None:
        restic.init()
        log("restic: first backup (untimed) ...")
        argv, env, cwd = restic.command(dataset)
        first["restic"] = common.run_measured(argv, name="restic", env=env, cwd=cwd)
        log(f"... {first['restic'].wall:.1f} s")
        repo_snapshot, cache_snapshot = work / "restic-repo.first", work / "restic-cache.first"
        common.copy_tree(restic.repo, repo_snapshot)
        common.copy_tree(restic.cache, cache_snapshot)
        base_repo = restic.repo_bytes()
        r = restic

        def restic_prepare() -> None:
            restore_dir(repo_snapshot, r.repo)
            restore_dir(cache_snapshot, r.cache)

        contenders.append(
            common.Contender(
                "restic",
                lambda: r.command(dataset),
                restic_prepare,
                lambda: r.repo_bytes() - base_repo,
            )
        )
    result.samples = common.run_interleaved(contenders, runs, cache_mode)
    for sample in result.samples.get("ours", []):
        check_ours(sample)
    return result


def unchanged_report(res: Unchanged, tree_bytes: int, runs: int, sides: list[str]) -> list[str]:
    metrics: dict[str, common.Metric] = {
        "Wall time (s)": (lambda s: s.wall, 2),
        "CPU time, user+sys (s)": (lambda s: s.cpu, 2),
        "Peak RSS (MiB)": (lambda s: s.maxrss_mib, 1),
        "Stored by the run (KiB)": (lambda s: (s.output_bytes or 0) / 1024, 1),
        "Stored / tree size (%)": (lambda s: 100 * (s.output_bytes or 0) / tree_bytes, 3),
    }
    lines = [
        "#### (a) Unchanged tree: the second backup",
        "",
        "- First backups (untimed): "
        + ", ".join(f"{n} {s.wall:.1f} s" for n, s in res.first.items()),
        f"- {runs} timed second backups per side, interleaved ({' → '.join(sides)} → ...), each "
        "after the first backup's state was put back ("
        + "; ".join(
            {
                "ours": "ours: local dir copied back, objects added to the bucket since deleted",
                "restic": "restic: repository and cache copied back",
            }[n]
            for n in sides
        )
        + "); medians (min–max)",
    ]
    if res.kinds:
        kinds = ", ".join(res.kinds)
        lines.append(f"- ours' second backups were: {kinds}")
        if "incr" not in res.kinds:
            lines.append(
                "- this version made the second backup **full**: it archives and uploads the "
                "whole tree again (no incremental backups yet)"
            )
        lines.append(
            "- ours' local dir grew by "
            + common.fmt_bytes(statistics.median(res.local_growth))
            + " per second backup (median)"
        )
    lines += [
        "",
        common.comparison_table(
            res.samples, tree_bytes, ours="ours", theirs="restic", metrics=metrics
        ),
        "",
    ]
    if res.samples.get("ours") and res.samples.get("restic"):
        ratio = statistics.median(s.wall for s in res.samples["ours"]) / statistics.median(
            s.wall for s in res.samples["restic"]
        )
        caveat = "" if "incr" in res.kinds else " (the second backup was full)"
        lines.append(common.bar_line(f"Wall time ours/restic{caveat}", ratio, WALL_BAR))
    if res.samples.get("ours"):
        stored = statistics.median(s.output_bytes or 0 for s in res.samples["ours"])
        lines.append(
            common.bar_line(
                f"Bytes uploaded by ours' second backup ({common.fmt_bytes(stored)}), "
                "share of the tree's size",
                100 * stored / tree_bytes,
                100 * UPLOAD_BAR,
                unit=" %",
                digits=3,
            )
        )
    lines += [
        "",
        "<details><summary>All runs (a)</summary>",
        "",
        common.runs_table(res.samples, None, output_label="Stored"),
        "",
        "</details>",
    ]
    return lines


# ---------------------------------------------------------------- (b) nights with churn


@dataclass
class Night:
    night: int
    churn: str
    samples: dict[str, common.Sample] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)  # total after the night
    kind: str = ""


def part_nights(
    dataset: Path,
    work: Path,
    ours: Ours | None,
    restic: Restic | None,
    nights: int,
    rate: float,
    seed: int,
    full_every: str,
    cache_mode: str,
) -> list[Night]:
    tree = work / "tree"
    log(f"copying {dataset} to {tree} (the nights' working tree) ...")
    common.copy_tree(dataset, tree)
    overrides = {"CLOUDBACKUP_FULL_EVERY": full_every}
    contenders: list[common.Contender] = []
    done: list[Night] = []
    if ours is not None:
        ours.setup("nights")
        o = ours
        seen: dict[str, int] = {}

        def ours_output() -> int:
            now = o.keys()
            done[-1].kind = archive_kind([k for k in now if k not in seen])
            seen.update(now)
            return sum(now.values())

        contenders.append(
            common.Contender("ours", lambda: o.command(tree, overrides), output_bytes=ours_output)
        )
    if restic is not None:
        restic.init()
        r = restic
        contenders.append(
            common.Contender("restic", lambda: r.command(tree), output_bytes=r.repo_bytes)
        )
    for night in range(1, nights + 1):
        line = "as generated"
        if night > 1:
            stats = churn.apply_churn(tree, night, seed, rate)
            line = f"{stats.modified} modified, {stats.deleted} deleted, {stats.added} added"
        done.append(Night(night, line))
        for contender in contenders:
            sample = common.measure_once(contender, cache_mode)
            if contender.name == "ours":
                check_ours(sample)
            done[-1].samples[contender.name] = sample
            done[-1].stored[contender.name] = sample.output_bytes or 0
            log(
                f"night {night:2d} {contender.name:>6}: wall {sample.wall:6.2f} s  CPU {sample.cpu:6.2f} s  "
                f"peak RSS {sample.maxrss_mib:6.1f} MiB  stored in all {common.fmt_bytes(sample.output_bytes or 0)}"
                + (f" ({done[-1].kind})" if contender.name == "ours" else "")
            )
    return done


def nights_report(
    done: list[Night], tree_bytes: int, rate: float, full_every: str, sides: list[str]
) -> list[str]:
    lines = [
        f"#### (b) {len(done)} nights at {rate:.0%} churn",
        "",
        f"- A copy of the dataset, backed up once per night by each side ({' → '.join(sides)}); "
        f"before each night after the first, one night of `churn.py` ({rate:.0%} of the files: "
        "60 % of them modified, 20 % deleted, as many added)",
    ]
    if "ours" in sides:
        lines.append(
            f"- ours: `CLOUDBACKUP_FULL_EVERY={full_every}`; retention not applied (`cloudbackup "
            "backup` never prunes, `CLOUDBACKUP_REMOTE_RETENTION` unset): the bucket keeps every "
            "backup; stored = the bucket's total size from a LIST (archives, indexes, manifests, "
            "host claim)"
        )
    if "restic" in sides:
        lines.append("- restic: no `forget`, no `prune`; stored = the repository directory's size")
    lines.append("")
    header = "| Night | Churn |"
    rule = "|---:|---|"
    if "ours" in sides:
        header += " ours | ours wall (s) | ours stored (MiB) | ours night (MiB) |"
        rule += "---|---:|---:|---:|"
    if "restic" in sides:
        header += " restic wall (s) | restic stored (MiB) | restic night (MiB) |"
        rule += "---:|---:|---:|"
    lines += [header, rule]
    previous = {n: 0 for n in sides}
    for night in done:
        row = f"| {night.night} | {night.churn} |"
        for name in sides:
            s, stored = night.samples[name], night.stored[name]
            if name == "ours":
                row += f" {night.kind} |"
            row += f" {s.wall:.2f} | {stored / common.MiB:.1f} | {(stored - previous[name]) / common.MiB:.2f} |"
            previous[name] = stored
        lines.append(row)
    lines.append("")
    if "ours" in sides and not any(n.kind == "incr" for n in done):
        lines.append(
            "- this version made every night's backup **full** (no incremental backups yet): "
            "the bucket holds one full archive per night"
        )
    later = done[1:]
    for name in sides:
        if later:
            wall = statistics.median(n.samples[name].wall for n in later)
            rss = max(n.samples[name].maxrss_mib for n in done)
            lines.append(
                f"- {name}: median wall of nights 2–{len(done)} {wall:.2f} s; highest peak RSS "
                f"{rss:.1f} MiB; stored after night {len(done)}: "
                f"{common.fmt_bytes(done[-1].stored[name])}"
            )
    if len(sides) == 2:
        ratio = done[-1].stored["ours"] / max(1, done[-1].stored["restic"])
        stated = (len(done), rate, full_every) == (14, 0.01, "7")
        note = "" if stated else "; the bar is stated for 14 nights, 1 % churn, a full every 7"
        lines.append(
            common.bar_line(
                f"Bucket bytes / restic repository after night {len(done)}{note}", ratio, SIZE_BAR
            )
        )
    return lines


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_dataset_args(
        parser,
        "dataset directory (default /tmp/cb-bench/ds-1g, or ds-small for --dataset-kind small; "
        "generated when missing; never changed: part (b) churns a copy)",
    )
    parser.add_argument(
        "--part",
        choices=("unchanged", "nights", "both"),
        default="both",
        help="(a) unchanged tree, (b) nights with churn, or both (default)",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per side in (a) (default 5)"
    )
    parser.add_argument("--nights", type=int, default=14, help="nights in (b) (default 14)")
    parser.add_argument(
        "--churn", type=float, default=0.01, help="share of files changed per night (default 0.01)"
    )
    parser.add_argument(
        "--full-every",
        default="7",
        help="CLOUDBACKUP_FULL_EVERY for ours in (b) (default 7: a full after every 6 "
        "incrementals); an --ours-env CLOUDBACKUP_FULL_EVERY=... wins",
    )
    parser.add_argument("--only", choices=("ours", "restic"), help="run one side only")
    parser.add_argument("--restic", help="restic binary (default: restic on PATH)")
    common.add_harness_args(parser, BENCH_ROOT)
    args = parser.parse_args(argv)
    common.check_dataset_args(parser, args)
    if args.part != "nights" and args.runs < 5:
        log(f"note: --runs {args.runs} is below the 5 the method asks for; medians will be noisy")
    if args.nights < 1:
        parser.error("--nights must be at least 1")
    if not 0 < args.churn <= 1:
        parser.error("--churn must be in (0, 1]")
    extra = common.env_pairs(parser, args.ours_env)
    full_every = extra.get("CLOUDBACKUP_FULL_EVERY", args.full_every)
    sides = [args.only] if args.only else ["ours", "restic"]
    exe = restic_exe(args.restic) if "restic" in sides else ""

    datasets = common.Datasets(args.seed, keep=True)
    dataset, info = datasets.get(args.size, args.dataset, kind=args.dataset_kind, files=args.files)
    tree_bytes = int(info["bytes"])  # type: ignore[call-overload]
    cache_mode = common.resolve_cache_mode(args.cache)
    ours_cmd, ours_env = common.ours_base_command(args.ours_cmd)
    work = args.workdir / f"incremental-{os.getpid()}"
    work.mkdir(parents=True)
    server = common.MotoServer(work, args.port)
    unchanged: Unchanged | None = None
    nights: list[Night] = []
    restic_version = repo_version = "?"
    try:
        server.start()
        buckets = common.Buckets(server.url)
        log("reading the dataset once, untimed ...")
        common.warm_cache(dataset)

        def make(part: str) -> tuple[Ours | None, Restic | None]:
            ours = (
                Ours(
                    ours_cmd,
                    ours_env,
                    extra,
                    server.url,
                    buckets,
                    work / part / "ours-local",
                    work / part / "ours-cwd",
                )
                if "ours" in sides
                else None
            )
            restic = (
                Restic(exe, work / part / "restic-repo", work / part / "restic-cache", work / part)
                if "restic" in sides
                else None
            )
            return ours, restic

        if args.part in ("unchanged", "both"):
            ours, restic = make("a")
            unchanged = part_unchanged(dataset, work / "a", ours, restic, args.runs, cache_mode)
            if restic is not None:
                repo_version = restic.repo_version()
        if args.part in ("nights", "both"):
            ours, restic = make("b")
            nights = part_nights(
                dataset,
                work / "b",
                ours,
                restic,
                args.nights,
                args.churn,
                args.seed,
                full_every,
                cache_mode,
            )
            if restic is not None:
                repo_version = restic.repo_version()
        if exe:
            restic_version = common._first_line([exe, "version"])
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    env = common.environment()
    kind = "small-file" if args.dataset_kind == "small" else "mixed"
    report = [
        f"### Incremental benchmark, {kind} tree, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- Machine: {env['cpu']}, {env['memory']} RAM, Linux {env['kernel']}, Python {env['python']}",
        "- Tools: moto server in its own process on 127.0.0.1 (its CPU is not counted, but it "
        "shares the cores)"
        + (f"; {restic_version} (repository version {repo_version})" if exe else ""),
        common.dataset_description(dataset, info),
    ]
    if "ours" in sides:
        report.append(
            f"- ours: `{shlex.join(ours_cmd)} backup --json {SOURCE}=TREE` (archive + upload to "
            "a bucket on moto; `CLOUDBACKUP_HOST=bench`, own local dir on the workdir's disk, "
            "run from an empty directory)"
            + (f"; extra environment `{' '.join(args.ours_env)}`" if args.ours_env else "")
        )
    if "restic" in sides:
        report.append(
            f"- restic: `restic backup --host {HOST} TREE` to a local repository on the workdir's "
            f"disk ({common.storage_of(args.workdir)}); `RESTIC_PASSWORD` from the harness; "
            "cache in the workdir (used: `--no-cache` not given)"
        )
    report.append(
        f"- Page cache: **{cache_mode}**"
        + (
            " (`sync; echo 3 > /proc/sys/vm/drop_caches` before every timed run)"
            if cache_mode == "cold"
            else ""
        )
    )
    if unchanged is not None:
        report += ["", *unchanged_report(unchanged, tree_bytes, args.runs, sides)]
    if nights:
        report += ["", *nights_report(nights, tree_bytes, args.churn, full_every, sides)]
    common.emit_report("\n".join(report) + "\n", args.results, "Incremental")
    return 0


if __name__ == "__main__":
    sys.exit(main())
