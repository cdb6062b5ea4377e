"""``run``: the nightly job. Recover, back up (uploading while archiving), upload what
earlier nights left, verify this run's uploads, prune; one report, whose outcome is the
worst of its parts. The one module that composes the other use cases.

:func:`nightly` owns the ping protocol around it (healthchecks.io: ``/start`` once the lock
is held, then success or ``/fail``), including the ``/fail`` of a run refused before it
started (a configuration error, no bucket, the lock held); the CLI only renders.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, UsageError
from cloudbackup.core.model import format_time
from cloudbackup.core.outcome import Outcome, worst
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.lock import DirLock
from cloudbackup.ops import backup as backing
from cloudbackup.ops import prune
from cloudbackup.ops import status as monitor
from cloudbackup.ops import upload as uploading
from cloudbackup.ops import verify as verifying
from cloudbackup.ops.backup import BackupOptions, SourceResult
from cloudbackup.ops.deletion import PruneResult

LOG = logging.getLogger("cloudbackup")


@dataclass
class RunReport:
    results: list[SourceResult] = field(default_factory=list)
    uploads: list[uploading.UploadResult] = field(default_factory=list)
    verifies: list[verifying.VerifyResult] = field(default_factory=list)
    prunes: list[PruneResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a step that failed as a whole
    seconds: float = 0.0

    @property
    def outcome(self) -> Outcome:
        """The worst of every source, upload, verify and prune, and of the steps that failed."""
        return worst(
            [
                *(r.outcome for r in self.results),
                *(u.outcome for u in self.uploads),
                *(v.outcome for v in self.verifies),
                *(p.outcome for p in self.prunes),
                *(Outcome.FAILED for _ in self.errors),
            ]
        )

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

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


def nightly(
    load: Callable[[], Settings],
    open_context: Callable[[Settings], Context],
    *,
    describe: Callable[[RunReport], str],
    fallback_ping_url: Callable[[], str | None],
    allow_shrink: bool = False,
    full: bool = False,
    deep: bool = False,
) -> RunReport:
    """``run`` with its pings: ``load`` the settings, refuse (exit 2) a run without a bucket
    or sources, take the lock, ping ``/start``, :func:`run`, then ping success, or ``/fail``
    with ``describe(report)``. Whatever stops it first is pinged to ``/fail`` and raised;
    when the settings themselves are invalid, ``fallback_ping_url`` finds the URL."""
    try:
        settings = load()
    except CloudBackupError as exc:
        monitor.ping(fallback_ping_url(), "/fail", body=f"cloudbackup run: {exc}")
        raise
    url, on = settings.ping_url, f"cloudbackup run on {settings.host}"
    try:
        _check_runnable(settings)
        with DirLock(settings.local_dir):
            monitor.ping(url, "/start")
            report = run(
                open_context(settings), allow_shrink=allow_shrink, deep=deep, full=full
            )
    except CloudBackupError as exc:
        monitor.ping(url, "/fail", body=f"{on}: {exc}")
        raise
    except Exception as exc:  # a bug or an OSError: /start was pinged, so /fail must follow
        monitor.ping(url, "/fail", body=f"{on}: unexpected error: {type(exc).__name__}: {exc}")
        raise
    if report.exit_code == 0:
        monitor.ping(url)
    else:
        monitor.ping(url, "/fail", body=describe(report))
    return report


def _check_runnable(settings: Settings) -> None:
    if not settings.remote_configured and not settings.local_only:
        raise UsageError(
            "`run` needs a bucket for the offsite copy",
            "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST), or CLOUDBACKUP_LOCAL_ONLY=1 if no "
            "offsite copy is intended",
        )
    if not settings.sources:
        raise UsageError("no sources to back up", "set CLOUDBACKUP_SOURCES")


def _free_space_check(ctx: Context, results: dict[str, SourceResult]) -> set[str]:
    """Fail early, per source, when the last archive's size would not fit any more."""
    blocked: set[str] = set()
    local_dir = ctx.settings.local_dir
    try:
        free = shutil.disk_usage(local_dir).free
    except OSError:
        return blocked
    for spec in ctx.settings.sources:
        size = ctx.local_catalog.newest_archive_size(spec.name)
        if size and free < size * 1.1:
            message = f"source {spec.name}: only {free} bytes free in {local_dir}, its last archive took {size}"
            LOG.error("%s: free some space or move CLOUDBACKUP_LOCAL_DIR", message)
            results[spec.name] = SourceResult(
                source=spec.name, error=message + "; free some space", outcome=Outcome.FAILED
            )
            blocked.add(spec.name)
    return blocked


def run(
    ctx: Context, *, allow_shrink: bool = False, deep: bool = False, full: bool = False
) -> RunReport:
    """Recover, back up, upload (incl. earlier failures), verify, prune; one report."""
    started = time.monotonic()
    report = RunReport()
    backing.cleanup_partials(ctx)
    ctx = _recover_remote(ctx, report)
    if ctx.remote is not None:
        # Pending uploads oldest first: what earlier nights left goes before tonight's
        # backups (an incremental's manifest only after its parent's).
        _upload_pending(ctx, report)
    report.results = _back_up(ctx, allow_shrink, full)
    if ctx.remote is not None:
        _upload_and_verify(ctx, report, deep)
    try:
        report.prunes = prune.prune_for_run(ctx)
    except CloudBackupError as exc:
        report.errors.append(f"prune failed: {exc}")
        LOG.error("prune failed: %s", exc)
    for pr in report.prunes:
        for result in report.results:
            if result.source == pr.source and pr.host == ctx.host:
                result.pruned += [f"{pr.where}:{i}" for i in pr.deleted]
    report.seconds = time.monotonic() - started
    monitor.write_last_run(ctx, _last_run(ctx, report))
    return report


def _recover_remote(ctx: Context, report: RunReport) -> Context:
    """List the bucket (kept for the guards, the ids and prune) and abort stale uploads.
    A bucket that cannot be listed: tonight's backups are still made, locally only (SPEC:
    local archives are kept, exit 1); they stay pinned and `upload` sends them later."""
    if ctx.remote is None:
        return ctx
    try:
        ctx.remote_catalog.refresh()
    except CloudBackupError as exc:
        message = (
            f"the bucket cannot be listed: {exc}; backups are kept locally only "
            "(`cloudbackup upload` sends them once it is reachable)"
        )
        LOG.error("%s", message)
        report.errors.append(message)
        return dataclasses.replace(ctx, remote=None)
    try:
        uploading.abort_stale_uploads(ctx)
    except CloudBackupError as exc:
        LOG.warning("could not clean up stale multipart uploads: %s", exc)
    return ctx


def _back_up(ctx: Context, allow_shrink: bool, full: bool = False) -> list[SourceResult]:
    """Every configured source, in order (those without room fail at once), each uploaded
    (streamed while archived) when there is a bucket."""
    early: dict[str, SourceResult] = {}
    blocked = _free_space_check(ctx, early)
    uploader = uploading.upload_after_backup if ctx.remote is not None else None
    specs = [s for s in ctx.settings.sources if s.name not in blocked]
    results = (
        backing.backup(
            ctx,
            specs,
            BackupOptions(allow_shrink=allow_shrink, full=full),
            uploader=uploader,
            streamer=uploading.start_stream if uploader is not None else None,
        )
        if specs
        else []
    )
    by_name = {r.source: r for r in results} | early
    ordered = [by_name[s.name] for s in ctx.settings.sources if s.name in by_name]
    for result in ordered:
        # The summary says "local-only" only when that is intended, not when S3 is down.
        result.local_only = not ctx.settings.remote_configured
    return ordered


def _upload_and_verify(ctx: Context, report: RunReport, deep: bool) -> None:
    """Upload what earlier nights left behind, then verify (without downloading, unless
    ``deep``) everything this run uploaded."""
    uploaded_now = {r.id for r in report.results if r.uploaded and r.id}
    _upload_pending(ctx, report)
    uploaded_now |= {upload.id for upload in report.uploads if upload.ok}
    try:
        listing = ctx.remote_catalog.refresh()
    except CloudBackupError as exc:
        report.errors.append(f"cannot list the bucket to verify this run's uploads: {exc}")
        return
    for backup_id in sorted(uploaded_now):
        ref = listing.find(backup_id, ctx.host)
        if ref is None:
            missing = verifying.VerifyResult(backup_id, "remote", "not listed after upload")
            report.verifies.append(missing)
            continue
        report.verifies.append(verifying.verify_remote_ref(ctx, ref, deep=deep))


def _upload_pending(ctx: Context, report: RunReport) -> None:
    try:
        report.uploads += uploading.upload_pending(ctx)
    except CloudBackupError as exc:
        report.errors.append(f"upload of pending backups failed: {exc}")


def _last_run(ctx: Context, report: RunReport) -> dict[str, Any]:
    """The state file `status` reads (``.state/<host>.last-run.json``)."""
    return {
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
    }
