"""Everything the user sees: logging (with secret redaction), progress, and the rendering of
every result, human (tables, result lines, summaries) or JSON. Commands hand results here;
nothing else prints."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from cloudbackup.core.outcome import Outcome

if TYPE_CHECKING:
    from cloudbackup.ops.backup import SourceResult
    from cloudbackup.ops.check import CheckLine
    from cloudbackup.ops.deletion import PruneResult
    from cloudbackup.ops.list import ListedBackup
    from cloudbackup.ops.run import RunReport
    from cloudbackup.ops.status import StatusReport
    from cloudbackup.ops.upload import UploadResult
    from cloudbackup.ops.verify import VerifyResult

LOG = logging.getLogger("cloudbackup")


class RedactingFilter(logging.Filter):
    """Replaces every known secret (raw and URL-encoded) in log records with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            record.msg = self.redact(message)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def setup_logging(
    *,
    level: str = "INFO",
    verbose: bool = False,
    quiet: bool = False,
    log_file: Path | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> RedactingFilter:
    root = LOG
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    redactor = RedactingFilter(secrets)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(_StderrFormatter("%(message)s"))
    console.setLevel(
        logging.DEBUG if verbose else logging.ERROR if quiet else getattr(logging, level)
    )
    console.addFilter(redactor)
    root.addHandler(console)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                log_file,
                maxBytes=10 * 1024 * 1024,
                backupCount=5,
                encoding="utf-8",
                errors="backslashreplace",
            )
        except OSError as exc:
            LOG.warning(
                "cannot open log file %s (%s); logging to stderr only", log_file, exc.strerror
            )
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
            )
            handler.setLevel(logging.DEBUG if verbose else getattr(logging, level))
            handler.addFilter(redactor)
            root.addHandler(handler)
    return redactor


def human_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"


class Progress:
    """A progress bar on a terminal; an INFO line every few seconds otherwise (cron logs)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        tty: bool,
        stream: TextIO | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.tty = label, total, tty
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.interval = 0.2 if tty else interval
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        if self.total:
            pct = min(self.done / self.total, 1.0)
            eta = (self.total - self.done) / rate if rate else 0
            text = (
                f"{self.label}: {human_size(self.done)} / {human_size(self.total)} "
                f"({pct:4.0%}) {human_size(rate)}/s ETA {human_duration(eta)}"
            )
        else:
            text = f"{self.label}: {human_size(self.done)} {human_size(rate)}/s"
        if self.tty:
            width = 24
            filled = int(width * (self.done / self.total)) if self.total else 0
            bar = "#" * min(filled, width) + "-" * (width - min(filled, width))
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            self.stream.flush()
        else:
            LOG.info("%s", text)

    def close(self) -> None:
        if self.tty and self.done:
            self._show(self.clock())
            self.stream.write("\n")
            self.stream.flush()


def print_json(document: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(
        json.dumps(document, indent=2, sort_keys=False, ensure_ascii=True, default=str) + "\n"
    )


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [
        [("-" if c is None else str(c)) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- results


def show(as_json: bool, document: Any, text: Callable[[], str]) -> None:
    """One result on stdout: ``document`` as JSON, or the human ``text``."""
    if as_json:
        print_json(document)
    else:
        click.echo(text())


def _mark(ok: bool) -> str:
    return "ok  " if ok else "FAIL"


def result_row(r: SourceResult, *, local_only: bool) -> list[str]:
    """source, id, result, size, time, uploaded, notes: one row of a backup or run summary."""
    state = "ok" if r.ok and r.outcome is Outcome.OK else ("ok (warnings)" if r.ok else "FAILED")
    return [
        r.source,
        r.id or "-",
        state,
        human_size(r.size) if r.size is not None else "-",
        f"{r.seconds:.1f}s",
        "yes" if r.uploaded else ("local-only" if local_only else "no"),
        r.error or "; ".join(filter(None, [_level_note(r), _warnings_note(r)])),
    ]


def _warnings_note(r: SourceResult) -> str:
    return f"{len(r.warnings)} warning(s)" if r.warnings else ""


def _level_note(r: SourceResult) -> str:
    """``full`` or ``incr: 3 files changed (1.2 KiB)`` for a tree source's backup."""
    if r.level is None or r.dry_run:
        return ""
    if r.level == "full":
        return "full"
    files = r.changed_files or 0
    return (
        f"incr: {files} file{'' if files == 1 else 's'} changed ({human_size(r.changed_bytes)})"
    )


def backup_summary(
    results: Sequence[SourceResult],
    *,
    local_only: bool,
    dry_run: bool,
    remote_url: Callable[[str], str],
) -> str:
    """The table of sources, a dry run's plan per source, and the one-line summary."""
    rows = [result_row(r, local_only=local_only) for r in results]
    lines = [table(rows, ["source", "id", "result", "size", "time", "uploaded", "notes"])]
    for r in results:
        if r.plan is not None:
            lines.append(plan_line(r, remote_url))
    failed = [r.source for r in results if not r.ok]
    done = len(results) - len(failed)
    summary = f"{done} of {len(results)} source(s) backed up"
    if dry_run:
        summary = f"dry run: {done} of {len(results)} source(s) would be backed up; nothing written"
    if failed:
        summary += "; failed: " + ", ".join(failed)
    if local_only and not dry_run:
        summary += " (local-only: no bucket configured, nothing uploaded)"
    return "\n".join([*lines, summary])


def plan_line(r: SourceResult, remote_url: Callable[[str], str]) -> str:
    """What a dry run found the real run would do for one source."""
    plan = r.plan
    assert plan is not None
    level = f" {plan.compression_level}" if plan.compression_level is not None else ""
    what = f"the {plan.kind} source (its size is known only when it runs)"
    if plan.files is not None:
        what = f"{plan.files} file{'' if plan.files == 1 else 's'}, {human_size(plan.bytes)}"
    line = f"  {plan.source}: would archive {what} into {plan.archive} ({plan.compression}{level})"
    if plan.remote_key is not None:
        line += f", then upload it to {remote_url(plan.remote_key)}"
    return line


def run_summary(report: RunReport) -> str:
    rows = []
    for r in report.results:
        *cells, notes = result_row(r, local_only=r.local_only)
        rows.append([*cells, str(len(r.pruned)), notes])
    lines = [
        table(rows, ["source", "id", "result", "size", "time", "uploaded", "pruned", "errors"])
    ]
    for u in report.uploads:
        lines.append(f"upload {u.id}: {'ok' if u.ok else 'FAILED'} {u.detail}")
    for v in report.verifies:
        lines.append(f"verify {v.id}: {'ok' if v.ok else 'FAILED'} {v.detail}")
    for p in report.prunes:
        if p.errors:
            lines.append(f"prune {p.where} {p.source}: " + "; ".join(p.errors))
    lines += [f"error: {e}" for e in report.errors]
    verdict = {
        0: "run succeeded",
        1: "run completed with failures or warnings",
        3: "run found an integrity failure",
    }
    lines.append(
        f"{verdict.get(report.exit_code, 'run failed')} in {report.seconds:.1f}s "
        f"(exit {report.exit_code})"
    )
    return "\n".join(lines)


def backup_list(backups: Sequence[ListedBackup]) -> str:
    if not backups:
        return "no backups found"
    rows = [
        [
            b.id,
            b.host,
            b.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            b.kind,
            human_size(b.size),
            "both" if b.local and b.remote else ("local" if b.local else "remote"),
            "yes" if b.verified else "no",
        ]
        for b in backups
    ]
    return table(
        rows, ["id", "host", "created (UTC)", "type", "size", "where", "verified offsite"]
    )


def verify_lines(results: Sequence[VerifyResult]) -> str:
    if not results:
        return "nothing to verify"
    return "\n".join(f"{_mark(r.ok)} {r.where:6} {r.id}: {r.detail}" for r in results)


def upload_lines(results: Sequence[UploadResult]) -> str:
    if not results:
        return "nothing to upload: every local backup is verified offsite"
    return "\n".join(f"{_mark(r.ok)} {r.id}: {r.detail}" for r in results)


def check_lines(lines: Sequence[CheckLine]) -> str:
    def mark(line: CheckLine) -> str:
        return "ok  " if line.ok and not line.warning else ("warn" if line.ok else "FAIL")

    return "\n".join(f"{mark(line)} {line.name}: {line.detail}" for line in lines)


def status_table(report: StatusReport, state_names: dict[int, str]) -> str:
    rows = [
        [
            host,
            s.source,
            state_names[s.state],
            f"{s.newest} ({s.newest_level})" if s.newest and s.newest_level else s.newest or "-",
            human_duration(s.age_seconds),
            f"{s.local_count}/{s.remote_count}",
            human_size(s.local_bytes + s.remote_bytes),
            "; ".join(s.reasons),
        ]
        for host, sources in sorted(report.hosts.items())
        for s in sources
    ]
    headers = ["host", "source", "state", "newest", "age", "local/remote", "bytes", "why"]
    lines = [table(rows, headers), *report.detail, f"status: {state_names[report.state]}"]
    return "\n".join(lines)


def prune_lines(results: Sequence[PruneResult], *, dry_run: bool) -> list[str]:
    """Human lines per group: kept (with reasons), pinned, deleted or would-delete, orphans."""
    if not results:
        return ["nothing to prune: no backups found"]
    lines: list[str] = []
    for r in results:
        lines += _prune_group_lines(r, dry_run)
    planned = sum(len(r.delete) for r in results)
    orphans = sum(len(r.orphans) for r in results)
    kept = sum(len(r.keep) for r in results)
    pinned = sum(len(r.pinned) for r in results)
    if dry_run:
        summary = (
            f"dry run: would delete {planned} backup(s) and {orphans} orphan(s), keep {kept} "
            f"({pinned} pinned); nothing deleted"
        )
    else:
        deleted = sum(len(r.deleted) for r in results)
        swept = sum(len(r.orphans_deleted) for r in results)
        summary = (
            f"deleted {deleted} backup(s) and {swept} orphan(s), kept {kept} ({pinned} pinned)"
        )
    failed = [f"{r.where} {r.host}/{r.source}" for r in results if r.errors]
    if failed:
        summary += "; failed: " + ", ".join(failed)
    lines.append(summary)
    return lines


def _prune_group_lines(r: PruneResult, dry_run: bool) -> list[str]:
    lines = [f"{r.where} {r.host}/{r.source}  policy: {r.policy or '(no rules)'}"]
    if r.policy_empty:
        lines.append("  policy has no rules: nothing deleted")
    for ident, reasons in r.keep:
        label = "pinned" if ident in r.pinned else "keep"
        lines.append(f"  {label:<13} {ident}  ({', '.join(reasons)})")
    retained = dict(r.retained)
    for ident in r.delete:
        if dry_run:
            lines.append(f"  {'would delete':<13} {ident}")
        elif ident in r.deleted:
            lines.append(f"  {'deleted':<13} {ident}")
        elif ident in retained:
            lines.append(f"  {'retained':<13} {ident}  ({retained[ident]})")
        else:
            lines.append(f"  {'not deleted':<13} {ident}")
    for ident in r.orphans:
        if dry_run:
            state = "would delete"
        elif ident in r.orphans_deleted:
            state = "deleted"
        else:
            state = retained.get(ident, "not deleted")
        lines.append(f"  {'orphan':<13} {ident}  (archive without manifest: {state})")
    for ident, why in r.orphans_kept:
        lines.append(f"  {'orphan kept':<13} {ident}  ({why})")
    lines += [f"  FAILED: {error}" for error in r.errors]
    return lines


def forget_lines(results: Sequence[PruneResult], *, dry_run: bool) -> list[str]:
    """Human lines: per backup and place, deleted / would delete (with its objects)."""
    lines: list[str] = []
    for r in results:
        retained = dict(r.retained)
        for ident in reversed(r.delete):
            if dry_run:
                state = "would delete"
            elif ident in r.deleted:
                state = "deleted"
            elif ident in retained:
                state = f"retained ({retained[ident]})"
            else:
                state = "not deleted"
            lines.append(f"{r.where:<6} {ident}  {state}")
        if dry_run:
            lines += [f"         {key}" for key in r.deleted_keys]
        lines += [f"  FAILED: {error}" for error in r.errors]
    done = sum(len(r.delete) if dry_run else len(r.deleted) for r in results)
    verb = "would delete" if dry_run else "deleted"
    summary = f"{verb} {done} backup cop{'y' if done == 1 else 'ies'}"
    if dry_run:
        summary = f"dry run: {summary}; nothing deleted"
    failed = [f"{r.where} {r.host}/{r.source}" for r in results if r.errors or r.retained]
    if failed:
        summary += "; not all deleted: " + ", ".join(failed)
    lines.append(summary)
    return lines
