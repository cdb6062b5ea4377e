"""Everything the user sees: logging (with secret redaction), progress, and the rendering of
every result, human (tables, result lines, summaries) or JSON. Commands hand results here;
nothing else prints."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from cloudbackup.core import words
from cloudbackup.core.outcome import REPORTED, Outcome
from cloudbackup.core.words import one_line, plural
from cloudbackup.ops.notify import LogTail

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
REPORTED_FLAG = next(iter(REPORTED))


class RedactingFilter(logging.Filter):
    """Replaces every known secret (raw and URL-encoded) in log records with ``***``, and
    makes each record's message one line (:func:`words.one_line`: a file name holding a
    newline cannot forge a log entry)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = words.one_line(self.redact(message))
        record.args = None
        if self.secrets and record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


#: syslog priorities of the log levels, for journald's ``<N>`` line prefix (sd-daemon(3)).
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


class ConsoleFormatter(logging.Formatter):
    """One human line per record on stderr, ``error: ...``/``warning: ...`` for the levels
    that need attention. ``style``: ``terminal`` or ``bare`` (just that), ``plain`` (cron, a
    pipe, a file: a timestamp first), ``journal`` (systemd's journal, which timestamps every
    line itself: the ``<N>`` priority prefix journald reads instead)."""

    def __init__(self, style: str = "terminal") -> None:
        super().__init__("%(message)s", _TIME_FORMAT)
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if self.style == "journal":
            level = max((n for n in _PRIORITIES if n <= record.levelno), default=logging.DEBUG)
            return f"<{_PRIORITIES[level]}>{text}"
        if self.style == "plain":
            return f"{self.formatTime(record, self.datefmt)} {text}"
        return text


class JsonFormatter(logging.Formatter):
    """``--log-json``: one JSON object per line (time, level, message, and the traceback
    when there is one), for log shippers. Records are redacted before they get here."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, _TIME_FORMAT),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            document["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(document, ensure_ascii=False)


def console_style(stream: TextIO, environ: Mapping[str, str]) -> str:
    """How stderr shows log lines: ``terminal`` on a TTY; ``journal`` when systemd connected
    stderr to the journal (``JOURNAL_STREAM`` names its device and inode); ``plain`` else,
    with a timestamp, except under any systemd service (``INVOCATION_ID``), which
    timestamps what it captures."""
    try:
        if stream.isatty():
            return "terminal"
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (tests)
        st = None
    journal = environ.get("JOURNAL_STREAM", "")
    if st is not None and journal == f"{st.st_dev}:{st.st_ino}":
        return "journal"
    return "bare" if environ.get("INVOCATION_ID") else "plain"


class _Reported(logging.Filter):
    """Leaves out records whose event the command's result shows to people (REPORTED)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, REPORTED_FLAG, False)


class HeldLines(logging.Handler):
    """``-q``: the console's lines held back until the outcome is known; :meth:`write_out`
    writes them only when the command did not succeed (a quiet good night prints nothing)."""

    def __init__(self, stream: TextIO, level: int) -> None:
        super().__init__(level)
        self.stream = stream
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def write_out(self, exit_code: int) -> None:
        lines, self.lines = self.lines, []
        if exit_code != 0 and lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


@dataclass
class Logs:
    """What :func:`setup_logging` set up: the redaction (for notifications and hooks), the
    tail of the log (a notification's body) and, with ``-q``, the held console lines."""

    redactor: RedactingFilter
    tail: LogTail
    held: HeldLines | None = None


_current: Logs | None = None


def setup_logging(
    *,
    level: str = "INFO",
    verbose: bool = False,
    quiet: bool = False,
    log_file: Path | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    log_json: bool = False,
    human_report: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Logs:
    """Bind the ``cloudbackup`` logger: stderr (formatted for where it goes; ``-q``: held
    until the outcome is known, errors only; a record the human report repeats left out),
    the rotating log file, and the in-memory tail a notification carries. Every handler
    redacts ``secrets``."""
    global _current
    root = LOG
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    redactor = RedactingFilter(secrets)
    out = stream or sys.stderr
    threshold = logging.DEBUG if verbose else logging.ERROR if quiet else getattr(logging, level)
    console: logging.Handler
    held = None
    if quiet:
        console = held = HeldLines(out, threshold)
    else:
        console = logging.StreamHandler(out)
        console.setLevel(threshold)
    console.addFilter(redactor)
    if log_json:
        console.setFormatter(JsonFormatter())
    else:
        style = console_style(out, environ or {})
        console.setFormatter(ConsoleFormatter(style))
        if human_report and style == "terminal":
            # On a terminal each event is shown once: in the report that follows. Elsewhere
            # (cron mail, the journal) the log keeps its lines and the summary comes on top.
            console.addFilter(_Reported())
    root.addHandler(console)
    tail = LogTail(redact=redactor.redact)
    root.addHandler(tail)
    if log_file is not None:
        _add_log_file(log_file, level, verbose, redactor, log_json)
    _current = Logs(redactor, tail, held)
    return _current


def _add_log_file(
    log_file: Path, level: str, verbose: bool, redactor: RedactingFilter, log_json: bool
) -> None:
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
        LOG.warning("cannot open log file %s (%s); logging to stderr only", log_file, exc.strerror)
        return
    if log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", _TIME_FORMAT)
        )
    handler.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    handler.addFilter(redactor)
    LOG.addHandler(handler)


def current_logs() -> Logs | None:
    """The logging of the command running (None before :func:`setup_logging`)."""
    return _current


def finish_logging(exit_code: int) -> None:
    """At exit: with ``-q``, write the held lines unless the command succeeded."""
    if _current is not None and _current.held is not None:
        _current.held.write_out(exit_code)


human_size = words.size


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


class ProgressLine:
    """The one status line of a terminal: every bar in progress shown side by side (an
    archive and the upload streaming it), redrawn by whichever advances."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bars: list[Progress] = []
        self.guard = threading.RLock()

    def draw(self, now: float) -> None:
        with self.guard:
            text = " | ".join(bar.text(now) for bar in self.bars)
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self.stream.flush()

    def add(self, bar: Progress) -> None:
        with self.guard:
            self.bars.append(bar)

    def remove(self, bar: Progress, now: float) -> None:
        with self.guard:
            if bar.done or bar.files:  # its final count; an idle bar just goes
                self.draw(now)
            self.bars.remove(bar)
            if not self.bars:
                self.stream.write("\n")
                self.stream.flush()


class Progress:
    """A progress bar on a terminal (shared with the others on its :class:`ProgressLine`);
    an INFO line every few seconds otherwise (cron logs).

    ``total`` bytes, and with :meth:`estimate` files, may be estimates (an archive's, from
    the previous backup of its source): they are then shown with ``~`` and the bar stops at
    99% until the work is done. Called from several threads (upload parts)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        tty: bool,
        stream: TextIO | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        line: ProgressLine | None = None,
    ) -> None:
        self.label, self.total, self.tty = label, total, tty
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.interval = 0.2 if tty else interval
        self.done = 0
        self.files = 0
        self.total_files: int | None = None
        self.estimated = False
        self.guard = threading.Lock()
        self.line = (line or ProgressLine(self.stream)) if tty else None
        if self.line is not None:
            self.line.add(self)

    def estimate(self, *, files: int | None = None, nbytes: int | None = None) -> None:
        """Totals known only roughly (the previous backup's): shown as estimates."""
        self.total_files, self.estimated = files, True
        if nbytes is not None:
            self.total = nbytes

    def count_file(self) -> None:
        """One more file done (an archive member)."""
        self.files += 1

    def __call__(self, n: int) -> None:
        with self.guard:
            self.done += n
            now = self.clock()
            if now - self.last < self.interval:
                return
            self.last = now
        self._show(now)

    def fraction(self) -> float | None:
        """How far along, 0..1 (None without a total): the mean of files and bytes (a tree
        of small files moves by files, one large file by bytes), held under 100% while the
        totals are estimates."""
        parts = []
        if self.total:
            parts.append(self.done / self.total)
        if self.total_files:
            parts.append(self.files / self.total_files)
        if not parts:
            return None
        return min(sum(parts) / len(parts), 0.99 if self.estimated else 1.0)

    def text(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        about = "~" if self.estimated else ""
        counts = []
        if self.files or self.total_files:
            of = f" of {about}{self.total_files:,}" if self.total_files else ""
            counts.append(f"{self.files:,}{of} file{'' if self.files == 1 else 's'}")
        of = f" of {about}{human_size(self.total)}" if self.total else ""
        counts.append(f"{human_size(self.done)}{of}")
        text = f"{self.label}: {', '.join(counts)}"
        fraction = self.fraction()
        if fraction is not None:
            remaining = (1 - fraction) * elapsed / fraction if fraction > 0 else 0
            text += f" ({fraction:4.0%}) {human_size(rate)}/s ETA {human_duration(remaining)}"
            if self.tty:
                filled = int(12 * fraction)
                text = f"[{'#' * filled}{'-' * (12 - filled)}] {text}"
        else:
            text += f" {human_size(rate)}/s"
        return text

    def _show(self, now: float) -> None:
        if self.line is not None:
            self.line.draw(now)
        else:
            LOG.info("%s", self.text(now))

    def close(self) -> None:
        if self.line is not None:
            line, self.line = self.line, None
            # Done: what was counted is the total now.
            self.total, self.total_files, self.estimated = self.done, self.files or None, False
            line.remove(self, self.clock())


def print_json(document: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(
        json.dumps(document, indent=2, sort_keys=False, ensure_ascii=True, default=str) + "\n"
    )


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns padded to their widths; each cell one line (:func:`one_line`: an error message
    from a remote store or a child process may hold a newline)."""
    cells = [[str(h) for h in headers]] + [
        [("-" if c is None else one_line(str(c))) for c in row] for row in rows
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
    """source, id, result, size, time, uploaded, notes: one row of a backup or run summary,
    in the one wording of :attr:`SourceResult.state`."""
    if r.plan is not None:
        uploaded = "would" if r.plan.remote_key else ("local-only" if local_only else "no")
    else:
        uploaded = "yes" if r.uploaded else ("local-only" if local_only else "no")
    notes = r.error or r.upload_error or "; ".join(
        filter(None, [_level_note(r), plural(len(r.warnings), "warning") if r.warnings else ""])
    )
    return [
        r.source,
        r.id or "-",
        r.state,
        human_size(r.size) if r.size is not None else "-",
        f"{r.seconds:.1f}s",
        uploaded,
        notes,
    ]


def _sources_summary(results: Sequence[SourceResult], *, dry_run: bool) -> str:
    """``N of M source(s) backed up``, then which were archived but not uploaded, and which
    failed: the same words for ``backup`` and ``run``."""
    done = sum(1 for r in results if r.ok)
    if dry_run:
        summary = f"dry run: {done} of {len(results)} source(s) would be backed up; nothing written"
    else:
        summary = f"{done} of {len(results)} source(s) backed up"
    kept = [r.source for r in results if r.archived and r.upload_error is not None]
    if kept:
        summary += "; archived locally, upload failed: " + ", ".join(kept)
    failed = [r.source for r in results if not r.archived and r.plan is None]
    if failed:
        summary += "; failed: " + ", ".join(failed)
    return summary


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
    summary = _sources_summary(results, dry_run=dry_run)
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
        what = f"{plural(plan.files, 'file')}, {human_size(plan.bytes)}"
    line = f"  {plan.source}: would archive {what} into {plan.archive} ({plan.compression}{level})"
    if plan.remote_key is not None:
        line += f", then upload it to {remote_url(plan.remote_key)}"
    return line


_VERDICTS = {
    Outcome.OK: "run succeeded",
    Outcome.WARNING: "run completed with warnings",
    Outcome.FAILED: "run completed with failures",
    Outcome.INTEGRITY: "run found an integrity failure",
    Outcome.INTERRUPTED: "run interrupted",
    Outcome.TERMINATED: "run interrupted",
}


def run_summary(report: RunReport, remote_url: Callable[[str], str] | None = None) -> str:
    """``run``'s one summary: the sources (as ``backup`` shows them), the uploads and
    verifies (as ``upload`` and ``verify`` show them), prune failures, the run's own errors
    and notes, and the verdict. A dry run shows its plan instead."""
    rows = []
    for r in report.results:
        *cells, notes = result_row(r, local_only=r.local_only)
        rows.append([*cells, str(len(r.pruned)), notes])
    lines = [
        table(rows, ["source", "id", "result", "size", "time", "uploaded", "pruned", "errors"])
    ]
    if report.dry_run:
        return _dry_run_summary(report, lines, remote_url or (lambda key: key))
    lines += [upload_line(u) for u in report.uploads]
    lines += [verify_line(v) for v in report.verifies]
    for p in report.prunes:
        if p.errors:
            lines.append(f"prune {p.where} {p.source}: " + one_line("; ".join(p.errors)))
    lines += [f"error: {one_line(e)}" for e in report.errors]
    lines += [f"warning: {one_line(note)}" for note in report.notes]
    lines.append(_sources_summary(report.results, dry_run=False))
    verdict = _VERDICTS.get(report.outcome, "run failed")
    lines.append(f"{verdict} in {report.seconds:.1f}s (exit {report.exit_code})")
    return "\n".join(lines)


def _dry_run_summary(
    report: RunReport, lines: list[str], remote_url: Callable[[str], str]
) -> str:
    lines += [plan_line(r, remote_url) for r in report.results if r.plan is not None]
    if report.would_upload:
        lines.append("would upload (not yet offsite): " + ", ".join(report.would_upload))
    lines += prune_lines(report.prunes, dry_run=True)[:-1] if report.prunes else []
    lines += [f"error: {one_line(e)}" for e in report.errors]
    lines.append(
        _sources_summary(report.results, dry_run=True)
        + f" (exit {report.exit_code}); no hooks, pings or notifications"
    )
    return "\n".join(lines)


def backup_list(
    backups: Sequence[ListedBackup], host: str | None = None, other_hosts: Sequence[str] = ()
) -> str:
    if not backups:
        text = f"no backups found for host {host}" if host else "no backups found"
        if other_hosts:
            text += (
                f"; the bucket has backups of {', '.join(other_hosts)}: pass --host NAME "
                "(or --all-hosts)"
            )
        return text
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


def verify_line(r: VerifyResult) -> str:
    """One verified copy, as ``verify`` and ``run`` both show it."""
    return f"{_mark(r.ok)} {r.where:6} {r.id}: {one_line(r.detail)}"


def verify_lines(results: Sequence[VerifyResult]) -> str:
    if not results:
        return "nothing to verify"
    return "\n".join(verify_line(r) for r in results)


def upload_line(r: UploadResult) -> str:
    """One upload, as ``upload`` and ``run`` both show it."""
    return f"{_mark(r.ok)} {r.id}: {one_line(r.detail)}"


def upload_lines(results: Sequence[UploadResult]) -> str:
    if not results:
        return "nothing to upload: every local backup is verified offsite"
    return "\n".join(upload_line(r) for r in results)


def check_lines(lines: Sequence[CheckLine]) -> str:
    def mark(line: CheckLine) -> str:
        return "ok  " if line.ok and not line.warning else ("warn" if line.ok else "FAIL")

    def detail(line: CheckLine) -> str:
        # A source's own message names it already ("source www: ..."): say it once.
        return one_line(line.detail.removeprefix(f"{line.name}: "))

    return "\n".join(f"{mark(line)} {line.name}: {detail(line)}" for line in lines)


def status_table(report: StatusReport, state_names: dict[int, str]) -> str:
    rows = [
        [
            host,
            s.source,
            state_names[s.state],
            f"{s.newest} ({s.newest_level})" if s.newest and s.newest_level else s.newest or "-",
            human_duration(s.age_seconds),
            f"{s.local_count}/{s.remote_count}",
            human_size(s.local_bytes),
            human_size(s.remote_bytes),
            "; ".join(s.reasons),
        ]
        for host, sources in sorted(report.hosts.items())
        for s in sources
    ]
    headers = [
        "host", "source", "state", "newest", "age", "local/remote", "local size",
        "remote size", "why",
    ]  # fmt: skip
    details = [one_line(d) for d in report.detail]
    lines = [table(rows, headers), *details, f"status: {state_names[report.state]}"]
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
    space = _space(
        sum(r.kept_bytes for r in results), sum(r.freed_bytes for r in results), dry_run
    )
    if dry_run:
        summary = (
            f"dry run: would delete {planned} backup(s) and {orphans} orphan(s), keep {kept} "
            f"({pinned} pinned); {space}; nothing deleted"
        )
    else:
        deleted = sum(len(r.deleted) for r in results)
        swept = sum(len(r.orphans_deleted) for r in results)
        summary = (
            f"deleted {deleted} backup(s) and {swept} orphan(s), kept {kept} ({pinned} pinned); "
            f"{space}"
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
    lines += [f"  FAILED: {one_line(error)}" for error in r.errors]
    lines.append(f"  {'space':<13} {_space(r.kept_bytes, r.freed_bytes, dry_run)}")
    return lines


def _space(kept: int, freed: int, dry_run: bool) -> str:
    """Bytes kept and freed (or, on a dry run, that would be)."""
    verb = "would be freed" if dry_run else "freed"
    return f"{human_size(kept)} kept, {human_size(freed)} {verb}"


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
        lines += [f"  FAILED: {one_line(error)}" for error in r.errors]
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
