"""The nightly job (`run`) and the pre-flight `check`."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudbackup import monitor, operations, transfer
from cloudbackup.errors import CloudBackupError, PermanentStorageError, SourceError
from cloudbackup.model import format_time
from cloudbackup.operations import BackupOptions, Context, SourceResult
from cloudbackup.sources import make_source

LOG = logging.getLogger("cloudbackup")


@dataclass
class RunReport:
    results: list[SourceResult] = field(default_factory=list)
    uploads: list[transfer.UploadResult] = field(default_factory=list)
    verifies: list[operations.VerifyResult] = field(default_factory=list)
    prunes: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    exit_code: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() | {"pruned": r.pruned} for r in self.results],
            "uploads": [u.to_dict() for u in self.uploads],
            "verify": [v.to_dict() for v in self.verifies],
            "prune": [p.to_dict() for p in self.prunes],
            "errors": self.errors,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
        }


def _free_space_check(ctx: Context, results: dict[str, SourceResult]) -> set[str]:
    """Fail early, per source, when the last archive's size would not fit any more."""
    blocked: set[str] = set()
    local_dir = ctx.settings.local_dir
    try:
        free = shutil.disk_usage(local_dir).free
    except OSError:
        return blocked
    for spec in ctx.settings.sources:
        size = monitor.newest_archive_size(ctx, spec.name)
        if size and free < size * 1.1:
            message = f"source {spec.name}: only {free} bytes free in {local_dir}, its last archive took {size}"
            LOG.error("%s: free some space or move CLOUDBACKUP_LOCAL_DIR", message)
            results[spec.name] = SourceResult(
                source=spec.name, error=message + "; free some space", exit_code=1
            )
            blocked.add(spec.name)
    return blocked


def run(ctx: Context, *, allow_shrink: bool = False, deep: bool = False) -> RunReport:
    """Recover, back up, upload (incl. earlier failures), verify, prune; one report."""
    started = time.monotonic()
    report = RunReport()
    operations.cleanup_partials(ctx)
    if ctx.remote is not None:
        try:
            ctx.remote_listing(refresh=True)  # cached for the shrink guard, ids and prune
        except CloudBackupError as exc:
            # S3 down or the bucket gone: still make tonight's local backups (SPEC: local
            # archives are kept, exit 1); they stay pinned locally and `upload` sends them later.
            message = (
                f"the bucket cannot be listed: {exc}; backups are kept locally only "
                "(`cloudbackup upload` sends them once it is reachable)"
            )
            LOG.error("%s", message)
            report.errors.append(message)
            ctx = dataclasses.replace(ctx, remote=None, _remote_listing=None)
    if ctx.remote is not None:
        try:
            transfer.abort_stale_uploads(ctx)
        except CloudBackupError as exc:
            LOG.warning("could not clean up stale multipart uploads: %s", exc)
    early: dict[str, SourceResult] = {}
    blocked = _free_space_check(ctx, early)
    uploader = transfer.upload_after_backup if ctx.remote is not None else None
    specs = [s for s in ctx.settings.sources if s.name not in blocked]
    results = (
        operations.backup(
            ctx,
            specs,
            BackupOptions(upload=uploader is not None, allow_shrink=allow_shrink),
            uploader=uploader,
            streamer=transfer.start_stream if uploader is not None else None,
        )
        if specs
        else []
    )
    by_name = {r.source: r for r in results} | early
    report.results = [by_name[s.name] for s in ctx.settings.sources if s.name in by_name]
    for result in report.results:
        # The summary says "local-only" only when that is intended, not when S3 is down.
        result.local_only = ctx.settings.s3_bucket is None
    uploaded_now = {r.id for r in report.results if r.uploaded and r.id}
    if ctx.remote is not None:
        # Earlier nights' backups that never made it offsite.
        try:
            report.uploads = transfer.upload_pending(ctx)
        except CloudBackupError as exc:
            report.errors.append(f"upload of pending backups failed: {exc}")
        for upload in report.uploads:
            if upload.ok:
                uploaded_now.add(upload.id)
        try:
            listing = ctx.remote_listing(refresh=True)
        except CloudBackupError as exc:
            report.errors.append(f"cannot list the bucket to verify this run's uploads: {exc}")
            uploaded_now = set()
        for backup_id in sorted(uploaded_now):
            ref = listing.find(backup_id, ctx.host)
            if ref is None:
                report.verifies.append(
                    operations.VerifyResult(backup_id, "remote", False, "not listed after upload")
                )
                continue
            report.verifies.append(transfer.verify_remote_ref(ctx, ref, deep=deep))
    try:
        from cloudbackup import prune

        report.prunes = prune.prune_for_run(ctx)
    except CloudBackupError as exc:
        report.errors.append(f"prune failed: {exc}")
        LOG.error("prune failed: %s", exc)
    for pr in report.prunes:
        for result in report.results:
            if result.source == pr.source and pr.host == ctx.host:
                result.pruned += [f"{pr.where}:{i}" for i in pr.deleted]
    codes = [r.exit_code for r in report.results]
    codes += [u.exit_code for u in report.uploads]
    codes += [operations.verify_exit([v]) for v in report.verifies]
    codes += [1 for p in report.prunes if p.errors]
    codes += [1 for _ in report.errors]
    report.exit_code = operations.worst_exit(codes)
    report.seconds = time.monotonic() - started
    monitor.write_last_run(
        ctx,
        {
            "finished_at": format_time(ctx.now()),
            "exit_code": report.exit_code,
            "results": [
                {
                    "source": r.source,
                    "id": r.id,
                    "ok": r.ok,
                    "exit_code": r.exit_code,
                    "error": r.error,
                    "shrink_stopped": r.shrink_stopped,
                    "warnings": len(r.warnings),
                }
                for r in report.results
            ],
        },
    )
    return report


# ---------------------------------------------------------------- check


@dataclass
class CheckLine:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "warning": self.warning, "detail": self.detail}


def check(ctx: Context) -> list[CheckLine]:
    settings = ctx.settings
    lines = [
        CheckLine("configuration", True, f"host {settings.host}, {len(settings.sources)} source(s)")
    ]
    for warning in settings.warnings:
        lines.append(CheckLine("configuration", True, warning, warning=True))
    if settings.env_file is not None:
        try:
            mode = os.stat(settings.env_file).st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                lines.append(
                    CheckLine(
                        "env file",
                        True,
                        f"{settings.env_file} is readable by other users: chmod 600 {settings.env_file}",
                        warning=True,
                    )
                )
        except OSError:
            pass
    if not settings.sources:
        lines.append(CheckLine("sources", False, "no sources configured: set CLOUDBACKUP_SOURCES"))
    for spec in settings.sources:
        try:
            detail = make_source(spec, env=settings.child_env).check()
            lines.append(CheckLine(f"source {spec.name}", True, detail))
        except (SourceError, CloudBackupError, ValueError) as exc:
            lines.append(CheckLine(f"source {spec.name}", False, str(exc)))
    lines.append(_check_local_dir(settings.local_dir))
    if ctx.remote is None:
        if settings.local_only:
            lines.append(
                CheckLine("bucket", True, "local-only (CLOUDBACKUP_LOCAL_ONLY=1): no offsite copy")
            )
        else:
            lines.append(
                CheckLine(
                    "bucket",
                    False,
                    "no bucket: set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_LOCAL_ONLY=1)",
                )
            )
        return lines
    lines += _check_bucket(ctx)
    return lines


def _check_local_dir(path: Any) -> CheckLine:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if path.exists() and not path.is_dir():
        return CheckLine("local dir", False, f"{path} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return CheckLine(
            "local dir",
            False,
            f"{path} is not writable (nor creatable): fix permissions or CLOUDBACKUP_LOCAL_DIR",
        )
    free = shutil.disk_usage(probe).free
    what = "writable" if path.exists() else "creatable"
    return CheckLine("local dir", True, f"{path} is {what}, {free // (1024**2)} MiB free")


def _check_bucket(ctx: Context) -> list[CheckLine]:
    settings = ctx.settings
    store = ctx.remote
    bucket = settings.s3_bucket
    host_prefix = "/".join([p for p in settings.s3_prefix.split("/") if p] + [settings.host]) + "/"
    lines: list[CheckLine] = []
    try:
        # ListObjectsV2 (MaxKeys=1) rather than HeadBucket: works with prefix-scoped roles.
        next(iter(store.list(host_prefix)), None)
        lines.append(CheckLine("bucket list", True, f"s3://{bucket}/{host_prefix} can be listed"))
    except CloudBackupError as exc:
        lines.append(CheckLine("bucket list", False, str(exc)))
        return lines
    probe_key = f"{host_prefix}.cloudbackup-check-{operations.new_token()}"
    try:
        from cloudbackup.storage.s3 import UploadSpec

        refused = store.probe_write(
            probe_key,
            UploadSpec(
                tags=[("cloudbackup:kind", "check")],
                storage_class=settings.s3_storage_class,
            ),
        )
        if refused:
            lines.append(
                CheckLine(
                    "bucket features",
                    False,
                    "the store rejects uploads carrying "
                    + ", ".join(refused)
                    + ": set CLOUDBACKUP_S3_COMPAT=1 (checksums only when required, no tagging)",
                )
            )
        else:
            features = "tagging, SHA-256 checksums" if not settings.s3_compat else "compat mode"
            lines.append(
                CheckLine(
                    "bucket features",
                    True,
                    f"the store accepts {features}, {settings.s3_storage_class}",
                )
            )
        lines.append(
            CheckLine(
                "bucket write",
                True,
                "can write (multipart upload created and aborted; nothing left behind)",
            )
        )
    except CloudBackupError as exc:
        lines.append(CheckLine("bucket write", False, str(exc)))
    try:
        transfer_claim = store.head(transfer.host_claim_key(ctx))
        if transfer_claim is not None:
            owner = transfer_claim.metadata.get("machine-id")
            mine = _own_machine_id(ctx)
            if owner and owner != mine:
                lines.append(
                    CheckLine(
                        "host claim",
                        False,
                        f"{host_prefix} is claimed by another machine ({owner[:12]}…, this one is "
                        f"{(mine or 'not yet identified')[:12]}…): set a unique CLOUDBACKUP_HOST",
                    )
                )
            else:
                lines.append(
                    CheckLine("host claim", True, f"{host_prefix} belongs to this machine")
                )
        else:
            lines.append(
                CheckLine(
                    "host claim", True, f"{host_prefix} is unclaimed; the first upload claims it"
                )
            )
    except PermanentStorageError as exc:
        lines.append(
            CheckLine(
                "host claim",
                True,
                f"cannot read the claim ({exc.code}); checked again at upload",
                warning=True,
            )
        )
    if settings.remote_retention is not None:
        lines.append(
            CheckLine(
                "remote prune",
                True,
                f"CLOUDBACKUP_REMOTE_RETENTION={settings.remote_retention}: `run` deletes in S3, which needs "
                "the pruner role (s3:DeleteObject; not probed)",
                warning=True,
            )
        )
    else:
        lines.append(
            CheckLine(
                "remote prune",
                True,
                "off (CLOUDBACKUP_REMOTE_RETENTION unset): the writer role is enough; prune S3 from a "
                "pruner job or with lifecycle rules",
            )
        )
    return lines


def _own_machine_id(ctx: Context) -> str | None:
    """This machine's id as `run` would use it, without creating one (`check` writes
    nothing locally; the CLI builds its context with a placeholder id)."""
    if ctx.machine_id and ctx.machine_id != "unknown":
        return ctx.machine_id
    return operations.read_machine_id(ctx.settings.local_dir)


def check_exit(lines: Sequence[CheckLine]) -> int:
    return 0 if all(line.ok for line in lines) else 1
