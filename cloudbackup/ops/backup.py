"""``backup``: each source archived (the guards first), its manifest written last, and
handed to the uploader; the recovery of what a killed run left (``.partial`` files, an
unfinished streamed upload).

A failing source is recorded in its result and the others go on; results are returned as
values and reported through the logger and an injected progress factory. Nothing here
prints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cloudbackup import __version__
from cloudbackup.config import Settings
from cloudbackup.context import (
    Context,
)
from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    Interrupted,
    ShrinkGuardError,
    SourceError,
    UsageError,
)
from cloudbackup.core.model import (
    ENCRYPTION,
    UPLOAD_SUFFIX,
    BackupId,
    Manifest,
    UploadRecord,
    archive_name,
    format_time,
    index_name,
    key_for,
    manifest_name,
)
from cloudbackup.core.outcome import REPORTED, Outcome, worst
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.core.words import plural
from cloudbackup.fs.dirs import TEMP_PREFIX, Dir, NotFollowed
from cloudbackup.fs.walk import FileEntry
from cloudbackup.ops.chain import ChainStart
from cloudbackup.ops.chain import start as start_chain
from cloudbackup.ops.timing import phase
from cloudbackup.sources.base import Entries, EntryStream, Source, SourceContext
from cloudbackup.sources.registry import make_source
from cloudbackup.stream.hashing import ArchiveTail
from cloudbackup.stream.index import mark_unchanged
from cloudbackup.stream.pipeline import IndexFile, write_archive
from cloudbackup.stream.tarwriter import ArchiveStats

LOG = logging.getLogger("cloudbackup")


@dataclass
class SourceResult:
    """One source of a ``backup`` or ``run``: the one result model both report.

    ``archived``: its archive and manifest are in the local dir. ``error``: why it was not
    archived; ``upload_error``: why the archive, kept locally, is not offsite. Its words
    (:attr:`state`) are the same in every summary: ``ok``, ``ok (warnings)``, ``archived
    locally, upload failed``, ``FAILED``, or a dry run's ``would back up``.
    """

    source: str
    id: str | None = None
    archived: bool = False
    size: int | None = None
    seconds: float = 0.0
    uploaded: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    upload_error: str | None = None
    outcome: Outcome = Outcome.OK
    file_count: int | None = None
    shrink_stopped: bool = False
    pruned: list[str] = field(default_factory=list)
    dry_run: bool = False
    local_only: bool = False
    #: A dry run's plan: what the real run would write (None on a real run).
    plan: SourcePlan | None = None
    #: "full" or "incr" (tree sources chain: SPEC "Incremental archives"), and its parent.
    level: str | None = None
    parent: str | None = None
    #: What an incremental archived (changed or new files, their bytes); a full: everything.
    changed_files: int | None = None
    changed_bytes: int | None = None
    # The upload that ran while the archive was written; the uploader completes it.
    stream: ArchiveStream | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Backed up as intended: archived (or, on a dry run, planned) and, unless local
        only, offsite."""
        return (self.archived or self.plan is not None) and self.upload_error is None

    @property
    def state(self) -> str:
        """The one wording of this result, in every summary (``backup``, ``run``)."""
        if self.plan is not None:
            return "would back up"
        if not self.archived:
            return "FAILED"
        if self.upload_error is not None:
            return "archived locally, upload failed"
        return "ok" if self.outcome is Outcome.OK else "ok (warnings)"

    def fail_upload(self, reason: str, outcome: Outcome = Outcome.FAILED) -> None:
        """The archive is kept locally but did not go offsite: say why."""
        self.uploaded = False
        self.upload_error = reason
        self.outcome = worst([self.outcome, outcome])

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "source": self.source,
            "id": self.id,
            "ok": self.ok,
            "result": self.state,
            "archived": self.archived,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "uploaded": self.uploaded,
            "warnings": self.warnings,
            "error": self.error or self.upload_error,
            "file_count": self.file_count,
            "level": self.level,
            "parent": self.parent,
            "changed_files": self.changed_files,
            "changed_bytes": self.changed_bytes,
        }
        if self.plan is not None:
            document["plan"] = self.plan.to_dict()
        return document


@dataclass(frozen=True)
class SourcePlan:
    """What backing up one source would write, decided by the code the real run runs (the
    source's guards, id, archive name, codec; its entries walked where its kind can tell
    without running anything): ``backup --dry-run`` prints it."""

    source: str
    id: str
    kind: str
    archive: Path
    #: The key the archive would be uploaded to; None when it would not be.
    remote_key: str | None
    compression: str
    compression_level: int | None
    #: What the source holds now; None when only running it can tell (a database dump).
    files: int | None
    bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "archive": str(self.archive),
            "remote_key": self.remote_key,
            "compression": self.compression,
            "compression_level": self.compression_level,
            "files": self.files,
            "bytes": self.bytes,
        }


def cleanup_partials(ctx: Context) -> list[Path]:
    """Remove ``*.partial`` (and temp) files a killed run left behind (we hold the lock), and
    the multipart upload a killed streamed backup had started for an archive never
    finished. Only real directories are looked into: a symlink planted as a source's
    directory is never followed."""
    removed: list[Path] = []
    try:
        host_dir = ctx.local.directory(ctx.host)
    except (FileNotFoundError, NotFollowed):
        return removed
    with host_dir:
        for name, st in host_dir.entries():
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                source_dir = host_dir.sub(name)
            except OSError:
                continue
            with source_dir:
                removed += _cleanup_source_dir(ctx, source_dir, name)
    return removed


def _cleanup_source_dir(ctx: Context, source_dir: Dir, source: str) -> list[Path]:
    removed: list[Path] = []
    names = [name for name, _ in source_dir.entries()]
    for name in names:
        if not (name.endswith(".partial") or name.startswith(TEMP_PREFIX)):
            continue
        path = source_dir.path / name
        try:
            source_dir.unlink(name)
            removed.append(path)
            LOG.info("removed %s left by an interrupted run", path)
        except OSError as exc:
            LOG.warning("cannot remove stale %s: %s", path, exc.strerror)
    names = [name for name, _ in source_dir.entries()]  # what is left
    for name in names:
        if not name.endswith(UPLOAD_SUFFIX):
            continue
        stem = name[: -len(UPLOAD_SUFFIX)]
        if any(other != name and other.startswith(stem + ".") for other in names):
            continue  # its backup exists: a record of an upload, not a leftover
        try:
            record = ctx.local_catalog.upload_record(stem, source)
        except ValueError:
            continue  # not named after a backup id: not ours
        if _abort_stray_upload(ctx, record):
            source_dir.unlink(name)
            removed.append(source_dir.path / name)
    return removed


def _abort_stray_upload(ctx: Context, record: UploadRecord | None) -> bool:
    """Abort the multipart upload a record names whose archive was never completed.

    ``None`` (unreadable) or a record without an upload: nothing to resume from it."""
    if record is None or not record.upload_id:
        return True
    if ctx.remote is None:
        return False  # kept: a run with the bucket aborts it (or it is aborted after 7 days)
    try:
        ctx.remote.abort(record.key, record.upload_id)
    except CloudBackupError as exc:
        LOG.warning("cannot abort the unfinished upload of %s: %s", record.key, exc)
        return False
    LOG.info("aborted the upload of %s left by an interrupted backup", record.key)
    return True


# ---------------------------------------------------------------- backup


class ArchiveStream(Protocol):
    """An upload that follows an archive while it is written (``ops.upload.StreamedUpload``)."""

    tail: ArchiveTail

    def abandon(self) -> None:
        """The archive will not be kept: stop, and leave nothing behind in S3."""
        ...


# (ctx, source name, backup id, archive file name, previous manifest) → a stream, or None
Streamer = Callable[["Context", str, BackupId, str, Manifest | None], ArchiveStream | None]


class Uploaded(Protocol):
    """What the uploader says about one archive (an ``ops.upload.UploadResult``)."""

    @property
    def ok(self) -> bool: ...

    @property
    def detail(self) -> str: ...

    @property
    def outcome(self) -> Outcome: ...


# (ctx, source name, backup id, the stream that followed the archive) → what happened, or
# None when there was nothing to upload.
Uploader = Callable[[Context, str, str, ArchiveStream | None], Uploaded | None]


@dataclass
class BackupOptions:
    dry_run: bool = False
    allow_shrink: bool = False
    #: Make every tree source's backup full (``--full``).
    full: bool = False


def _skip_inodes(settings: Settings) -> frozenset[tuple[int, int]]:
    """The local dir, the log file and state files are never archived."""
    skip: set[tuple[int, int]] = set()
    for path in (settings.local_dir, settings.log_file, settings.env_file):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        skip.add((st.st_dev, st.st_ino))
    return frozenset(skip)


#: How many unreadable manifests ``previous_manifest`` skips before it gives up.
PREVIOUS_TRIES = 5


def previous_manifest(
    ctx: Context, source: str, problems: list[str] | None = None
) -> Manifest | None:
    """The manifest of the newest complete backup of this host and source, local (preferred)
    or remote. A manifest that fails to parse (damaged, or forged in the bucket) is skipped
    and reported in ``problems``: the guards then compare with the newest good one."""
    refs = ctx.local_catalog.listing(source).for_source(ctx.host, source)
    refs += ctx.remote_catalog.listing_or_empty().for_source(ctx.host, source)
    refs.sort(key=lambda r: (r.created_at, r.backup_id.seq, r.where == "local"), reverse=True)
    if not refs:
        return None
    reason = "none of the newest parses"
    for ref in refs[:PREVIOUS_TRIES]:
        try:
            if ref.where == "local":
                return ctx.local_catalog.manifest(ref)
            return ctx.remote_catalog.manifest(ref)
        except IntegrityError as exc:
            LOG.error("%s; the guards compare with an older backup", exc.message)
            if problems is not None:
                problems.append(exc.message)
        except CloudBackupError as exc:
            reason = str(exc)
            break
    LOG.warning(
        "cannot read the previous manifest of %s (%s); shrink guard skipped", source, reason
    )
    return None


def _new_id(ctx: Context, source: str, moment: datetime) -> BackupId:
    backup_id = BackupId.new(source, moment)
    try:
        with ctx.local.directory(f"{ctx.host}/{source}") as directory:
            names = [name for name, _ in directory.entries()]
    except (FileNotFoundError, NotFollowed):
        names = []  # a planted link is refused when the archive is written
    listing = ctx.remote_catalog.listing_or_empty()
    remote_ids = {r.id for r in listing.for_source(ctx.host, source)}
    remote_ids |= {r.id for r in listing.orphans if r.host == ctx.host}
    while True:
        stem = str(backup_id)
        taken = any(name.startswith(stem + ".") for name in names)
        if not taken and stem not in remote_ids:
            return backup_id
        backup_id = backup_id.next()


def shrink_check(
    source: Source,
    stats: ArchiveStats,
    previous: Manifest | None,
    guard: float | None,
) -> None:
    """Raise ShrinkGuardError for an empty source or one that fell by more than ``guard``
    (``stats``: the whole tree's files and bytes)."""
    if guard is None:
        return
    bytes_only = not source.counts_files
    if not bytes_only and stats.file_count == 0:
        raise ShrinkGuardError(
            f"source {source.name} is empty (0 files); refusing to back it up",
            "check that it is mounted, or pass --allow-shrink once",
        )
    if bytes_only and stats.uncompressed_bytes == 0:
        raise ShrinkGuardError(
            f"source {source.name} produced 0 bytes; refusing to back it up",
            "pass --allow-shrink once",
        )
    if previous is None:
        return
    floor = 1.0 - guard
    # The tree's totals (an incremental's archive holds only what changed).
    before_files, before_bytes = previous.total_files, previous.total_bytes
    if not bytes_only and before_files and stats.file_count < before_files * floor:
        raise ShrinkGuardError(
            f"source {source.name} shrank from {before_files} to {stats.file_count} files "
            f"(more than {guard:.0%}) since {previous.id}",
            "check the source; if this is intended, pass --allow-shrink once",
        )
    if before_bytes and stats.uncompressed_bytes < before_bytes * floor:
        raise ShrinkGuardError(
            f"source {source.name} shrank from {before_bytes} to "
            f"{stats.uncompressed_bytes} bytes (more than {guard:.0%}) since {previous.id}",
            "check the source; if this is intended, pass --allow-shrink once",
        )


def backup_source(
    ctx: Context, source: Source, options: BackupOptions, streamer: Streamer | None = None
) -> SourceResult:
    """Archive one source (the guards first), write its manifest, and say how it went: a
    failure is recorded in the result, never raised, so the next source is still backed up.
    ``streamer`` starts an upload that follows the archive while it is written."""
    result = SourceResult(source=source.name, dry_run=options.dry_run)
    started = time.monotonic()
    try:
        _back_up(ctx, source, options, streamer, result)
    except Exception as exc:
        _record_failure(result, source, exc)
    finally:
        result.seconds = time.monotonic() - started
    return result


def _back_up(
    ctx: Context,
    source: Source,
    options: BackupOptions,
    streamer: Streamer | None,
    result: SourceResult,
) -> None:
    assert ctx.machine_id is not None, "a backup needs a context made for writing"
    with phase(f"check {source.name}"):
        LOG.debug("%s: %s", source.name, source.check())
    manifest_problems: list[str] = []
    previous = previous_manifest(ctx, source.name, manifest_problems)
    _log_choices(ctx.settings.for_source(source.name), source, previous, options)
    moment = ctx.now()
    device = source.root_device()
    _guards(ctx.settings.for_source(source.name), source, options, previous, moment, device)
    backup_id = _new_id(ctx, source.name, moment)
    result.id = str(backup_id)
    if options.dry_run:
        uploading = streamer is not None  # an upload follows every archive, or none
        result.plan = _plan(ctx, source, backup_id, previous, options, uploading)
        result.file_count = result.plan.files or 0
        return
    with _source_dir(ctx, source.name) as directory:
        stats, final = _archive(
            ctx, source, directory, backup_id, previous, device, options, streamer, result
        )
    result.archived = True
    result.size = stats.size
    result.file_count = stats.file_count
    result.warnings = stats.warnings
    if stats.unreadable or stats.changed:
        # Completed with warnings: unreadable files, or files that changed size while
        # read (stored as GNU tar does, which also exits 1 for them).
        result.outcome = Outcome.WARNING
    if manifest_problems:  # backed up all the same; a bad manifest is still exit 3
        result.warnings = result.warnings + manifest_problems
        result.outcome = Outcome.INTEGRITY
    if result.level == "incr":
        LOG.info(
            "%s: incremental on %s: %s of %s changed (%s) → %s (%s)",
            source.name,
            result.parent,
            plural(result.changed_files or 0, "file"),
            plural(stats.file_count, "file"),
            plural(result.changed_bytes or 0, "byte"),
            final,
            plural(stats.size, "byte"),
        )
        return
    LOG.info(
        "%s: archived %s, %s → %s (%s)",
        source.name,
        plural(stats.file_count, "file"),
        plural(stats.uncompressed_bytes, "byte"),
        final,
        plural(stats.size, "byte"),
    )


def _log_choices(
    settings: Settings, source: Source, previous: Manifest | None, options: BackupOptions
) -> None:
    """``-v``: what this source's backup was decided from, and why."""
    if previous is None:
        LOG.debug("%s: no previous backup: the guards have nothing to compare with", source.name)
    else:
        LOG.debug(
            "%s: previous backup %s (%s, %s): the shrink guard compares with it",
            source.name,
            previous.id,
            plural(previous.file_count, "file"),
            plural(previous.uncompressed_bytes, "byte"),
        )
    guard = "off" if settings.shrink_guard is None else f"{settings.shrink_guard:.0%}"
    LOG.debug(
        "%s: %s level %s; excludes: %s; shrink guard %s%s%s",
        source.name,
        settings.compression,
        settings.compression_level,
        ", ".join(settings.exclude) or "none",
        guard,
        " (--allow-shrink: not applied)" if options.allow_shrink else "",
        " (--full)" if options.full else "",
    )


def _guards(
    settings: Settings,
    source: Source,
    options: BackupOptions,
    previous: Manifest | None,
    moment: datetime,
    device: int | None,
) -> None:
    """The clock guard (the newest backup is dated after now) and the shrink guard's
    filesystem check (the root moved to another device: unmounted?)."""
    if previous is not None and previous.created > moment:
        raise SourceError(
            f"source {source.name}: the newest backup {previous.id} is dated in the future "
            f"({format_time(previous.created)}; the clock says {format_time(moment)})",
            "if the clock was wrong when it was made, delete it with "
            f"`cloudbackup forget {previous.id} --where all`; if the clock is wrong now, "
            "fix it (NTP)",
        )
    if (
        not options.allow_shrink
        and settings.shrink_guard is not None
        and previous is not None
        and previous.root_device is not None
        and device is not None
        and device != previous.root_device
    ):
        raise ShrinkGuardError(
            f"source {source.name}: its root is on another filesystem than in {previous.id} "
            f"(device {previous.root_device} → {device}); is it unmounted?",
            "mount it, or pass --allow-shrink once if the move is intended",
        )


def _warner(name: str) -> Callable[[str, str], None]:
    def warn(category: str, message: str) -> None:
        log = LOG.info if category == "skipped" else LOG.warning
        log("%s: %s", name, message)

    return warn


def _source_dir(ctx: Context, name: str) -> Dir:
    """``<local>/<host>/<source>``, made as needed, never through a symlink: a link planted
    there fails this source (exit 1) in one line, and nothing is written where it points."""
    try:
        return ctx.local.directory(f"{ctx.host}/{name}", create=True)
    except NotFollowed as exc:
        raise SourceError(
            f"source {name}: {exc.filename} in the local dir is a symlink or not a directory",
            "nothing in the local dir is ever followed through a link; remove it",
        ) from None


def _archive(
    ctx: Context,
    source: Source,
    directory: Dir,
    backup_id: BackupId,
    previous: Manifest | None,
    device: int | None,
    options: BackupOptions,
    streamer: Streamer | None,
    result: SourceResult,
) -> tuple[ArchiveStats, str]:
    """Write the archive into ``directory`` (``.partial``, then published once the shrink
    guard passed), its index (tree sources: same pass) and its manifest, last; the stream
    that followed it is handed on in ``result.stream``. Returns the archive's stats (the
    whole tree's totals) and file name."""
    settings = ctx.settings.for_source(source.name)
    chain = start_chain(ctx, source, settings, full=options.full, moment=backup_id.created_at)
    try:
        return _write_backup(
            ctx, source, directory, backup_id, previous, device, options, streamer, result, chain
        )
    finally:
        if chain is not None:
            chain.close()


# Long: one backup's files in their order (archive, index, manifest), undone together.
def _write_backup(
    ctx: Context,
    source: Source,
    directory: Dir,
    backup_id: BackupId,
    previous: Manifest | None,
    device: int | None,
    options: BackupOptions,
    streamer: Streamer | None,
    result: SourceResult,
    chain: ChainStart | None,
) -> tuple[ArchiveStats, str]:
    settings = ctx.settings.for_source(source.name)
    recipients = settings.age_recipients
    final = archive_name(
        backup_id,
        settings.compression,
        incremental=chain is not None,
        encrypted=bool(recipients),
    )
    partial = final + ".partial"
    warn = _warner(source.name)
    walk_warnings: list[str] = []
    walk_unreadable = 0
    kinds: Counter[str] = Counter()  # warnings by kind: what an encrypted backup records

    def source_warn(category: str, message: str) -> None:
        nonlocal walk_unreadable
        walk_warnings.append(message)
        walk_unreadable += category == "unreadable"
        kinds[category] += 1
        warn(category, message)

    def archive_warn(category: str, message: str) -> None:
        kinds[category] += 1
        warn(category, message)

    def parent_invalid(problem: str) -> None:
        assert chain is not None
        LOG.warning(
            "%s: the index of %s is invalid (%s); the rest of the tree is archived again",
            source.name,
            chain.manifest.id,
            problem,
        )

    sctx = _source_context(ctx, source.name, backup_id, source_warn)
    progress, count_file = _archive_progress(ctx, source, previous)
    stream = streamer(ctx, source.name, backup_id, final, previous) if streamer else None
    index = None
    index_final = index_name(backup_id)
    sealed_final = index_name(backup_id, encrypted=True)
    started_ns = time.time_ns()
    found = source.entries(sctx)
    entries = EntryStream(_counted(found, count_file) if count_file is not None else found)
    walked: Iterable[FileEntry] = entries
    if chain is not None:
        walked = mark_unchanged(entries, chain.parent, parent_invalid)
    try:
        if source.chain_capable:
            index = IndexFile(
                directory,
                index_final + ".partial",
                str(backup_id),
                recipients=recipients,
                sealed_partial=sealed_final + ".partial",
            )
        with phase(f"archive {source.name}"):
            try:
                stats = write_archive(
                    walked,
                    directory,
                    partial,
                    compression=settings.compression,
                    level=settings.compression_level,
                    warn=archive_warn,
                    progress=progress,
                    tail=stream.tail if stream is not None else None,
                    prefetch=source.prefetch,
                    recipients=recipients,
                    index=index,
                )
            finally:
                getattr(progress, "close", lambda: None)()
        stats.warnings = walk_warnings + stats.warnings
        stats.unreadable += walk_unreadable
        tree = stats
        if index is not None:
            tree = ArchiveStats(
                file_count=index.writer.tree_files, uncompressed_bytes=index.writer.tree_bytes
            )
        try:
            if not options.allow_shrink:
                shrink_check(source, tree, previous, settings.shrink_guard)
        except ShrinkGuardError:
            directory.unlink(partial)
            raise
        directory.publish(partial, final)  # never over an existing archive
        facts = (
            index.publish(index_final, sealed_final if recipients else None)
            if index is not None
            else None
        )
        directory.fsync()
        manifest = _manifest(
            ctx, source, backup_id, final, stats, device, entries.members, kinds
        )
        if index is not None and facts is not None:
            manifest = dataclasses.replace(
                manifest,
                level=chain.level if chain is not None else 0,
                parent=chain.manifest.id if chain is not None else None,
                base=chain.base if chain is not None else str(backup_id),
                index=facts,
                tree_files=tree.file_count,
                tree_bytes=tree.uncompressed_bytes,
                walk_started_ns=started_ns,
            )
        directory.write_atomic(manifest_name(backup_id), manifest.to_json())
    except BaseException:
        if index is not None:
            index.discard()
        if stream is not None:
            stream.abandon()
        raise
    result.stream = stream
    if index is not None:
        result.level = "incr" if chain is not None else "full"
        result.parent = chain.manifest.id if chain is not None else None
    result.changed_files, result.changed_bytes = stats.file_count, stats.uncompressed_bytes
    stats.file_count, stats.uncompressed_bytes = tree.file_count, tree.uncompressed_bytes
    return stats, final


#: What a member adds to the tar stream besides its content, about: its header, the PAX
#: record of its mtime and the padding (for the progress estimate only).
_MEMBER_OVERHEAD = 1536


def _archive_progress(
    ctx: Context, source: Source, previous: Manifest | None
) -> tuple[Any, Callable[[], None] | None]:
    """The archive's progress, with the previous backup's totals as the estimate, and what
    counts a file into it. Files are counted only for a bar on a terminal: elsewhere (cron)
    the log line shows bytes, and the walk is not slowed by a step per member."""
    progress = ctx.progress(f"archive {source.name}", None)
    count_file = getattr(progress, "count_file", None) if getattr(progress, "tty", False) else None
    estimate = getattr(progress, "estimate", None)
    if previous is not None and estimate is not None:
        counted = source.counts_files and count_file is not None
        nbytes = previous.total_bytes + _MEMBER_OVERHEAD * previous.total_files
        estimate(files=previous.total_files if counted else None, nbytes=nbytes)
    return progress, count_file


def _counted(entries: Entries, count_file: Callable[[], None]) -> Entries:
    """``entries``, each member that is not a directory counted (as the manifest counts)
    as the writer takes it; the source's return value passed on."""
    try:
        while True:
            try:
                entry = next(entries)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if not stat.S_ISDIR(entry.st.st_mode):
                count_file()
            yield entry
    finally:
        entries.close()


def _source_context(
    ctx: Context, name: str, backup_id: BackupId, warn: Callable[[str, str], None]
) -> SourceContext:
    return SourceContext(
        spool_dir=ctx.local_catalog.source_dir(name),
        backup_id=str(backup_id),
        exclude=PathMatcher(ctx.settings.for_source(name).exclude),
        skip_inodes=_skip_inodes(ctx.settings),
        warn=warn,
        log=lambda m: LOG.info("%s", m),
    )


def _manifest(
    ctx: Context,
    source: Source,
    backup_id: BackupId,
    archive: str,
    stats: ArchiveStats,
    device: int | None,
    members: dict[str, Any] | None,
    kinds: Counter[str],
) -> Manifest:
    settings = ctx.settings.for_source(source.name)
    recipients = list(settings.age_recipients)
    assert ctx.machine_id is not None, "a backup needs a context made for writing"
    return Manifest(
        id=str(backup_id),
        host=ctx.host,
        source=source.name,
        kind=source.kind,
        spec=source.spec.redacted,
        created_at=format_time(backup_id.created_at),
        archive=archive,
        size=stats.size,
        sha256=stats.sha256,
        compression=settings.compression,
        compression_level=settings.compression_level,
        file_count=stats.file_count,
        uncompressed_bytes=stats.uncompressed_bytes,
        machine_id=ctx.machine_id,
        tool_version=__version__,
        # Encrypted: the manifest stays plaintext, so it names no file below the root.
        warnings=_warning_kinds(kinds) if recipients else stats.warnings,
        root_device=device,
        root=source.real_path,
        members=stats.members() | (members or {}),
        encryption=ENCRYPTION if recipients else None,
        recipients=recipients,
    )


def _warning_kinds(kinds: Counter[str]) -> list[str]:
    """The warnings of an encrypted backup as its plaintext manifest keeps them: each kind
    with its count, no file name (they are in the log of the run that made it)."""
    return [
        f"{kind}: {count} file{'' if count == 1 else 's'} (names not recorded: the backup is "
        "encrypted; see the log of the run)"
        for kind, count in sorted(kinds.items())
    ]


def _record_failure(result: SourceResult, source: Source, exc: Exception) -> None:
    """One line for the source that failed, and its outcome."""
    result.outcome = Outcome.FAILED
    if isinstance(exc, ShrinkGuardError):
        result.error = str(exc)
        result.shrink_stopped = True
        LOG.error("%s", exc, extra=REPORTED)
    elif isinstance(exc, CloudBackupError):
        result.error = str(exc)
        # A source refused (a usage error inside it) fails that source: exit 1, not 2.
        if exc.outcome is not Outcome.REFUSED:
            result.outcome = exc.outcome
        LOG.error("%s", exc, extra=REPORTED)
    elif isinstance(exc, OSError):
        result.error = (
            f"source {source.name}: {exc.strerror or exc} ({exc.filename or ''})".replace(" ()", "")
        )
        LOG.error("%s", result.error, extra=REPORTED)
        LOG.debug("details", exc_info=exc)
    else:
        # A bug or an exhausted resource (RecursionError, MemoryError) in one source fails
        # that source alone, in one line; the next sources are still backed up.
        detail = " ".join(str(exc).split())[:300]
        result.error = f"source {source.name} failed unexpectedly: {type(exc).__name__}" + (
            f" ({detail})" if detail else ""
        )
        LOG.error("%s; run with -v for details", result.error, extra=REPORTED)
        LOG.debug("details", exc_info=exc)


def _plan(
    ctx: Context,
    source: Source,
    backup_id: BackupId,
    previous: Manifest | None,
    options: BackupOptions,
    upload: bool,
) -> SourcePlan:
    """The dry run of one source: what the real run would write, nothing read or written
    but the walk of its entries (``Source.survey``), which the shrink guard then judges as
    it judges the real archive."""
    settings = ctx.settings.for_source(source.name)
    sctx = _source_context(ctx, source.name, backup_id, _warner(source.name))
    survey = source.survey(sctx)
    if survey is not None and not options.allow_shrink:
        found = ArchiveStats(file_count=survey[0], uncompressed_bytes=survey[1])
        shrink_check(source, found, previous, settings.shrink_guard)
    chain = start_chain(ctx, source, settings, full=options.full, moment=backup_id.created_at)
    if chain is not None:
        chain.close()
    name = archive_name(
        backup_id,
        settings.compression,
        incremental=chain is not None,
        encrypted=bool(settings.age_recipients),
    )
    plan = SourcePlan(
        source=source.name,
        id=str(backup_id),
        kind=source.kind,
        archive=ctx.local_catalog.source_dir(source.name) / name,
        remote_key=key_for(settings.s3_prefix, ctx.host, backup_id, name) if upload else None,
        compression=settings.compression,
        compression_level=settings.compression_level,
        files=survey[0] if survey is not None else None,
        bytes=survey[1] if survey is not None else None,
    )
    LOG.debug(  # the plan itself is the command's output
        "%s: would archive %s as %s%s",
        source.name,
        f"{plural(plan.files or 0, 'file')}, {plan.bytes} bytes"
        if survey is not None
        else source.spec.redacted,
        name,
        " (dry run: nothing written)",
    )
    return plan


def _record_upload(result: SourceResult, uploaded: Uploaded | None) -> None:
    if uploaded is None:
        return
    result.uploaded = uploaded.ok
    if not uploaded.ok:  # the offsite half failed: never summarised as a success
        result.fail_upload(uploaded.detail, uploaded.outcome)


def backup(
    ctx: Context,
    specs: Sequence[Any],
    options: BackupOptions,
    *,
    uploader: Uploader | None = None,
    streamer: Streamer | None = None,
    results: list[SourceResult] | None = None,
) -> list[SourceResult]:
    """Archive each source; one failing source does not stop the others.

    ``streamer`` starts an upload that follows each archive while it is written;
    ``uploader`` then completes (or performs) the upload of each archive kept. ``results``
    (returned) gets each source's result as soon as it is done, so that a backup stopped part
    way (a signal) still reports what finished: the sources it did not finish are added as
    failed before the signal's exception goes on.
    """
    if not specs:
        raise UsageError(
            "no sources to back up",
            "give SPEC arguments or set CLOUDBACKUP_SOURCES (e.g. CLOUDBACKUP_SOURCES=/srv/www)",
        )
    results = [] if results is None else results
    if not options.dry_run:
        cleanup_partials(ctx)
    LOG.debug(
        "backing up %s; upload: %s",
        ", ".join(spec.name for spec in specs),
        "none" if uploader is None else "streamed" if streamer is not None else "after",
    )
    try:
        for spec in specs:
            results.append(_back_up_one(ctx, spec, options, uploader, streamer))
    except (KeyboardInterrupt, Interrupted):
        finished = {r.source for r in results}
        results += [
            SourceResult(spec.name, error="not backed up: interrupted", outcome=Outcome.FAILED)
            for spec in specs
            if spec.name not in finished
        ]
        raise
    return results


def _back_up_one(
    ctx: Context,
    spec: Any,
    options: BackupOptions,
    uploader: Uploader | None,
    streamer: Streamer | None,
) -> SourceResult:
    try:
        source = make_source(spec, env=ctx.settings.child_env)
    except (ValueError, CloudBackupError) as exc:
        LOG.error("source %s: %s", spec.name, exc, extra=REPORTED)
        return SourceResult(source=spec.name, error=str(exc), outcome=Outcome.FAILED)
    result = backup_source(ctx, source, options, streamer)
    if result.archived and uploader is not None:
        assert result.id is not None
        stream, result.stream = result.stream, None
        _record_upload(result, uploader(ctx, result.source, result.id, stream))
    elif result.stream is not None:  # started but nobody will complete it
        result.stream.abandon()
        result.stream = None
    return result
