"""``run``: the nightly job. Recover, back up (uploading while archiving), upload what
earlier nights left, verify this run's uploads, prune; one report, whose outcome is the
worst of its parts. The one module that composes the other use cases.

:func:`nightly` owns what surrounds it (SPEC "Operations"): the healthchecks pings
(``/start`` once the lock is held, then success or ``/fail``), the hooks (before the run,
after it, on failure), the notification, and the record an interrupted run leaves — also
for a run refused before it started (a configuration error, no bucket, the lock held:
``/fail`` and the notification, as far as the targets could be read). ``run --dry-run``
prints the plan and tells nobody. The CLI only renders.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, Interrupted, UsageError
from cloudbackup.core.model import format_time
from cloudbackup.core.outcome import REPORTED, Outcome, words, worst
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.core.words import size
from cloudbackup.lock import DirLock
from cloudbackup.ops import backup as backing
from cloudbackup.ops import hooks as hooking
from cloudbackup.ops import notify, prune
from cloudbackup.ops import status as monitor
from cloudbackup.ops import upload as uploading
from cloudbackup.ops import verify as verifying
from cloudbackup.ops.backup import BackupOptions, SourceResult
from cloudbackup.ops.deletion import PruneResult
from cloudbackup.ops.timing import phase

LOG = logging.getLogger("cloudbackup")


@dataclass(frozen=True)
class RunOptions:
    """``run``'s options: ``sources`` (``--source``, repeatable) limits the run to those
    configured sources; ``full`` is passed on to the backup (``--full``)."""

    allow_shrink: bool = False
    deep: bool = False
    full: bool = False
    dry_run: bool = False
    sources: tuple[str, ...] = ()


@dataclass
class RunReport:
    results: list[SourceResult] = field(default_factory=list)
    uploads: list[uploading.UploadResult] = field(default_factory=list)
    verifies: list[verifying.VerifyResult] = field(default_factory=list)
    prunes: list[PruneResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a step that failed as a whole
    seconds: float = 0.0
    dry_run: bool = False
    #: A dry run: the backups of earlier nights that the run would upload.
    would_upload: list[str] = field(default_factory=list)
    hooks: list[hooking.HookResult] = field(default_factory=list)
    #: INTERRUPTED or TERMINATED when a signal stopped the run.
    interrupted: Outcome | None = None
    #: What went wrong without changing the outcome (an after-hook, a notification).
    notes: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        """The worst of every source, upload, verify and prune, of the steps that failed,
        and of the signal that stopped it."""
        return worst(
            [
                *(r.outcome for r in self.results),
                *(u.outcome for u in self.uploads),
                *(v.outcome for v in self.verifies),
                *(p.outcome for p in self.prunes),
                *(Outcome.FAILED for _ in self.errors),
                *([self.interrupted] if self.interrupted else []),
            ]
        )

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

    def to_dict(self) -> dict[str, Any]:
        document = {
            "results": [r.to_dict() | {"pruned": r.pruned} for r in self.results],
            "uploads": [u.to_dict() for u in self.uploads],
            "verify": [v.to_dict() for v in self.verifies],
            "prune": [p.to_dict() for p in self.prunes],
            "errors": self.errors,
            "result": words(self.outcome),
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "hooks": [
                {"hook": h.hook.label, "ok": h.ok, "exit_code": h.exit_code, "error": h.error}
                for h in self.hooks
            ],
            "interrupted": self.interrupted is not None,
            "notes": self.notes,
        }
        if self.dry_run:
            document["would_upload"] = self.would_upload
        return document


# ---------------------------------------------------------------- who is told


@dataclass(frozen=True)
class Alerts:
    """Who is told how a run went: the healthchecks URL and the notification targets."""

    host: str
    ping_url: str | None = None
    targets: tuple[str, ...] = ()
    notify_on: str = "failure"

    @classmethod
    def of(cls, settings: Settings) -> Alerts:
        return cls(settings.host, settings.ping_url, settings.notify, settings.notify_on)

    def start(self) -> None:
        monitor.ping(self.ping_url, "/start")

    def finish(self, report: RunReport, summary: str, logs: LogView) -> None:
        """Ping success or ``/fail`` with the summary; notify as ``notify_on`` asks."""
        if report.exit_code == 0:
            monitor.ping(self.ping_url)
        else:
            monitor.ping(self.ping_url, "/fail", body=summary)
        self.notify(report.outcome, report.exit_code, summary, logs)

    def refused(self, exc: BaseException, logs: LogView) -> None:
        """A run that stopped before or outside its report (refused, locked, a signal before
        the run began, a bug): ``/fail`` and the notification."""
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted(signal.SIGINT)
        if isinstance(exc, CloudBackupError | Interrupted):
            what, outcome = str(exc), exc.outcome
        else:
            what, outcome = _unexpected(exc), Outcome.FAILED
        if isinstance(exc, Interrupted):
            what = f"interrupted by {exc.signal_name} before the run began"
        summary = f"cloudbackup run on {self.host}: {what}"
        monitor.ping(self.ping_url, "/fail", body=summary)
        self.notify(outcome, code_of(outcome), summary, logs)

    def notify(self, outcome: Outcome, exit_code: int, summary: str, logs: LogView) -> None:
        result = notify.classify(exit_code, failed=words(outcome) == "failed")
        if not self.targets or not notify.should_notify(result, notify.NotifyOn(self.notify_on)):
            return
        message = notify.compose(
            self.host, result, exit_code, summary, logs.tail(), redact=logs.redact
        )
        for warning in notify.send(self.targets, message):
            LOG.warning("%s (the run itself is not affected)", warning)


def _unexpected(exc: BaseException) -> str:
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _same(text: str) -> str:
    return text


@dataclass(frozen=True)
class LogView:
    """The command's log as a notification and the hooks see it: its last lines (already
    redacted) and the redaction itself."""

    tail: Callable[[], Sequence[str]] = tuple
    redact: Callable[[str], str] = _same


# ---------------------------------------------------------------- the protocol


def nightly(
    load: Callable[[], Settings],
    open_context: Callable[[Settings], Context],
    *,
    describe: Callable[[RunReport], str],
    fallback: Callable[[], Alerts],
    logs: LogView | None = None,
    options: RunOptions | None = None,
) -> RunReport:
    """``run`` with everything around it: ``load`` the settings (``fallback`` finds who to
    tell when they are invalid), check the notification targets and refuse (exit 2) a run
    without a bucket or sources, take the lock, ping ``/start``, the before-hook, :func:`run`,
    record the run, the after-hooks, then ping and notify with ``describe(report)``.
    A signal (SIGINT, SIGTERM) ends the run as ``interrupted``: recorded, hooks, ``/fail``
    and the notification, then its report (exit 130/143). Whatever else stops it is pinged
    to ``/fail``, notified and raised. A dry run plans and tells nobody."""
    logs = logs or LogView()
    options = options or RunOptions()
    try:
        settings = load()
    except CloudBackupError as exc:
        if not options.dry_run:
            fallback().refused(exc, logs)
        raise
    alerts = Alerts.of(settings) if not options.dry_run else Alerts(settings.host)
    try:
        if not options.dry_run:
            with phase("check notification targets"):
                notify.validate(settings.notify)
    except CloudBackupError as exc:
        dataclasses.replace(alerts, targets=()).refused(exc, logs)
        raise
    try:
        settings = _chosen(settings, options.sources)
        _check_runnable(settings, options)
        with DirLock(settings.local_dir):
            if options.dry_run:
                return dry_run(open_context(settings), options)
            alerts.start()
            report = _guarded(settings, open_context, options, logs)
    except (Exception, KeyboardInterrupt, Interrupted) as exc:  # refused, locked, a bug...
        alerts.refused(exc, logs)
        raise
    alerts.finish(report, describe(report), logs)
    return report


def _guarded(
    settings: Settings,
    open_context: Callable[[Settings], Context],
    options: RunOptions,
    logs: LogView,
) -> RunReport:
    """Under the lock: the before-hook, the run, the record of it and the after-hooks. A
    signal stops whichever is running: the rest still happens, and the report says so."""
    hooks = hooking.Hooks.from_settings(settings)
    report = RunReport()
    started = time.monotonic()
    ctx = open_context(settings)
    try:
        if hooks.before_run and not _hook(settings, hooks, report, logs, hooking.Hook.BEFORE_RUN):
            # Stopped before anything was backed up: a failure, pinged and notified.
            report.errors.append(report.hooks[-1].message + "; nothing was backed up")
        else:
            run(ctx, options, report)
    except (KeyboardInterrupt, Interrupted) as exc:
        _interrupted(report, exc)
    report.seconds = time.monotonic() - started
    monitor.write_last_run(ctx, _last_run(ctx, report, options))
    try:
        _after_hooks(settings, hooks, report, logs)
    except (KeyboardInterrupt, Interrupted) as exc:
        _interrupted(report, exc)
    return report


def _interrupted(report: RunReport, exc: BaseException) -> None:
    stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)  # Ctrl-C
    report.interrupted = worst([stop.outcome, report.interrupted or Outcome.OK])
    message = f"interrupted by {stop.signal_name}: the run stopped where it was"
    report.errors.append(message)
    LOG.error("%s", message, extra=REPORTED)


def _hook(
    settings: Settings,
    hooks: hooking.Hooks,
    report: RunReport,
    logs: LogView,
    hook: hooking.Hook,
    extra: dict[str, str] | None = None,
) -> bool:
    command = hooks.command(hook)
    assert command is not None
    result = hooking.run_hook(
        hook,
        command,
        base_env=settings.child_env,
        extra_env=extra,
        timeout=hooks.timeout,
        redact=logs.redact,
    )
    report.hooks.append(result)
    return result.ok


def _after_hooks(
    settings: Settings, hooks: hooking.Hooks, report: RunReport, logs: LogView
) -> None:
    """``AFTER_RUN`` always, then ``ON_FAILURE`` on a failed run, with the result in their
    environment; a failing one is a warning and changes no exit code."""
    outcome = words(report.outcome)
    chosen = hooking.after_hooks(hooks, outcome)
    if not chosen:
        return
    with hooking.summary_file(report.to_dict()) as summary:
        extra = hooking.result_env(outcome, report.exit_code, summary)
        for hook, _command in chosen:
            if not _hook(settings, hooks, report, logs, hook, extra):
                report.notes.append(report.hooks[-1].message)


def _chosen(settings: Settings, names: Sequence[str]) -> Settings:
    """``run --source NAME...``: only these configured sources (an unknown one is exit 2)."""
    if not names:
        return settings
    LOG.debug("run --source: %s of %d configured", ", ".join(names), len(settings.sources))
    return settings.only(names)


def _check_runnable(settings: Settings, options: RunOptions) -> None:
    if options.deep and settings.age_recipients and settings.age_identity_file is None:
        raise UsageError(
            "`run --deep` reads back and decrypts what it uploaded: it needs "
            "CLOUDBACKUP_AGE_IDENTITY_FILE, which a host that only backs up should not hold",
            "drop --deep (the HEAD verify needs no key), or run `verify --deep` where the "
            "identity is",
        )
    if not settings.remote_configured and not settings.local_only:
        raise UsageError(
            "`run` needs a bucket for the offsite copy",
            "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST), or CLOUDBACKUP_LOCAL_ONLY=1 if no "
            "offsite copy is intended",
        )
    if not settings.sources:
        raise UsageError("no sources to back up", "set CLOUDBACKUP_SOURCES")


# ---------------------------------------------------------------- the run


def _free_space_check(ctx: Context, results: dict[str, SourceResult]) -> set[str]:
    """Fail early, per source, when the last archive's size would not fit any more."""
    blocked: set[str] = set()
    local_dir = ctx.settings.local_dir
    try:
        free = shutil.disk_usage(local_dir).free
    except OSError:
        return blocked
    for spec in ctx.settings.sources:
        last = ctx.local_catalog.newest_archive_size(spec.name)
        if last and free < last * 1.1:
            message = (
                f"source {spec.name}: only {size(free)} free in {local_dir}, its last archive "
                f"took {size(last)}"
            )
            LOG.error("%s: free some space or move CLOUDBACKUP_LOCAL_DIR", message, extra=REPORTED)
            results[spec.name] = SourceResult(
                source=spec.name, error=message + "; free some space", outcome=Outcome.FAILED
            )
            blocked.add(spec.name)
        elif last:
            LOG.debug("%s: %s free, its last archive took %s", spec.name, size(free), size(last))
    return blocked


def run(ctx: Context, options: RunOptions | None = None, report: RunReport | None = None) -> RunReport:
    """Recover, back up, upload (incl. earlier failures), verify, prune, into ``report``
    (filled as it goes: an interrupted run still has what it did)."""
    options = options or RunOptions()
    report = report if report is not None else RunReport()
    started = time.monotonic()
    with phase("recover"):
        backing.cleanup_partials(ctx)
        ctx, offline = _recover_remote(ctx, report)
    if ctx.remote is not None and not options.dry_run:
        # Pending uploads oldest first: what earlier nights left goes before tonight's
        # backups (an incremental's manifest only after its parent's).
        with phase("upload pending"):
            _upload_pending(ctx, report, options)
    with phase("backup"):
        _back_up(ctx, options, offline, report)
    if ctx.remote is not None:
        with phase("upload and verify"):
            _upload_and_verify(ctx, report, options)
    with phase("prune"):
        try:
            report.prunes = prune.prune_for_run(ctx, options.sources)
        except CloudBackupError as exc:
            report.errors.append(f"prune failed: {exc}")
            LOG.error("prune failed: %s", exc, extra=REPORTED)
    for pr in report.prunes:
        for result in report.results:
            if result.source == pr.source and pr.host == ctx.host:
                result.pruned += [f"{pr.where}:{i}" for i in pr.deleted]
    report.seconds = time.monotonic() - started
    return report


def dry_run(ctx: Context, options: RunOptions) -> RunReport:
    """What the run would archive, upload and prune: the backup's plan per source, the
    backups of earlier nights not yet offsite, and the prune plan; nothing is written."""
    report = RunReport(dry_run=True)
    started = time.monotonic()
    if ctx.remote is not None:
        try:
            ctx.remote_catalog.refresh()
        except CloudBackupError as exc:
            report.errors.append(f"the bucket cannot be listed: {exc}")
            ctx = dataclasses.replace(ctx, remote=None)
    _back_up(ctx, dataclasses.replace(options, dry_run=True), None, report)
    if ctx.remote is not None:
        pending = _per_source(options.sources, lambda s: uploading.pending_uploads(ctx, s))
        report.would_upload = [ref.id for ref in pending]
    report.prunes = prune.prune_for_run(ctx, options.sources, dry_run=True)
    report.seconds = time.monotonic() - started
    return report


def _per_source(sources: Sequence[str], each: Callable[[str | None], list[Any]]) -> list[Any]:
    """``each(None)`` for every source, or ``each(name)`` for the chosen ones."""
    if not sources:
        return each(None)
    return [item for name in sources for item in each(name)]


def _recover_remote(ctx: Context, report: RunReport) -> tuple[Context, str | None]:
    """List the bucket (kept for the guards, the ids and prune) and abort stale uploads.
    A bucket that cannot be listed: tonight's backups are still made, locally only (SPEC:
    local archives are kept, exit 1), and each says its upload failed; they stay pinned and
    `upload` sends them later. Returns the context and why it is offline (None: it is not)."""
    if ctx.remote is None:
        return ctx, None
    try:
        ctx.remote_catalog.refresh()
    except CloudBackupError as exc:
        message = (
            f"the bucket cannot be listed: {exc}; backups are kept locally only "
            "(`cloudbackup upload` sends them once it is reachable)"
        )
        LOG.error("%s", message, extra=REPORTED)
        report.errors.append(message)
        return dataclasses.replace(ctx, remote=None), f"not uploaded: the bucket cannot be listed ({exc})"
    try:
        uploading.abort_stale_uploads(ctx)
    except CloudBackupError as exc:
        LOG.warning("could not clean up stale multipart uploads: %s", exc)
    return ctx, None


def _back_up(ctx: Context, options: RunOptions, offline: str | None, report: RunReport) -> None:
    """Every configured source, in order (those without room fail at once), each uploaded
    (streamed while archived) when there is a bucket; ``offline``: why there is none now.
    Into ``report.results``, also when a signal stops it (what finished, and the sources it
    did not finish as failed)."""
    early: dict[str, SourceResult] = {}
    blocked = _free_space_check(ctx, early)
    uploader = uploading.upload_after_backup if ctx.remote is not None else None
    specs = [s for s in ctx.settings.sources if s.name not in blocked]
    chosen = BackupOptions(
        dry_run=options.dry_run, allow_shrink=options.allow_shrink, full=options.full
    )
    done: list[SourceResult] = []
    try:
        if specs:
            backing.backup(
                ctx,
                specs,
                chosen,
                uploader=uploader if not options.dry_run else None,
                streamer=uploading.start_stream if uploader is not None else None,
                results=done,
            )
    finally:
        by_name = {r.source: r for r in done} | early
        ordered = [by_name[s.name] for s in ctx.settings.sources if s.name in by_name]
        for result in ordered:
            # The summary says "local-only" only when that is intended, not when S3 is down.
            result.local_only = not ctx.settings.remote_configured
            if offline and result.archived:
                result.fail_upload(offline)
        report.results = ordered


def _upload_and_verify(ctx: Context, report: RunReport, options: RunOptions) -> None:
    """Upload what earlier nights left behind, then verify (without downloading, unless
    ``deep``) everything this run uploaded."""
    uploaded_now = {r.id for r in report.results if r.uploaded and r.id}
    _upload_pending(ctx, report, options)
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
        report.verifies.append(verifying.verify_remote_ref(ctx, ref, deep=options.deep))


def _upload_pending(ctx: Context, report: RunReport, options: RunOptions) -> None:
    try:
        report.uploads += _per_source(
            options.sources, lambda source: uploading.upload_pending(ctx, source)
        )
    except CloudBackupError as exc:
        report.errors.append(f"upload of pending backups failed: {exc}")


def _last_run(ctx: Context, report: RunReport, options: RunOptions) -> dict[str, Any]:
    """The state file `status` reads (``.state/<host>.last-run.json``). A run of some
    sources (``--source``) keeps what the last run said of the others."""
    results = {
        r.source: {
            "source": r.source,
            "id": r.id,
            "ok": r.ok,
            "exit_code": r.exit_code,
            "error": r.error or r.upload_error,
            "shrink_stopped": r.shrink_stopped,
            "warnings": len(r.warnings),
        }
        for r in report.results
    }
    if options.sources:
        before = monitor.read_last_run(ctx.settings.local_dir, ctx.host) or {}
        for old in before.get("results", []):
            if isinstance(old, dict) and old.get("source") not in results:
                results[str(old.get("source"))] = old
    document: dict[str, Any] = {
        "finished_at": format_time(ctx.now()),
        "exit_code": report.exit_code,
        "results": list(results.values()),
    }
    if report.interrupted is not None:
        document["interrupted"] = "SIGTERM" if report.interrupted is Outcome.TERMINATED else "SIGINT"
    return document
