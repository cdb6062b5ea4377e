"""Which backup to restore (a source's newest, at or before ``--at``, or an id), found by
LIST alone locally and remotely, and which copy of it (local when it re-hashes to its
manifest, else remote)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path

from cloudbackup.context import Context
from cloudbackup.core.errors import ConfigError, IntegrityError, StorageError, UsageError
from cloudbackup.core.model import BackupId, BackupRef, Listing, Manifest, valid_name

_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"
LOG = logging.getLogger("cloudbackup")

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_at(text: str) -> datetime:
    """RFC 3339 with ``Z`` or an offset, or a bare date meaning the end of that day (UTC)."""
    value = text.strip()
    if _DATE_RE.match(value):
        try:
            day = datetime.strptime(value, "%Y-%m-%d").date()
        except ValueError:
            raise ConfigError(
                f"--at {text!r} is not a valid date", "use YYYY-MM-DD or 2026-11-01T00:00:00Z"
            ) from None
        return datetime.combine(day, dtime(23, 59, 59), tzinfo=UTC)
    normalized = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        moment = datetime.fromisoformat(normalized.replace("t", "T", 1))
    except ValueError:
        moment = None
    if moment is None or "T" not in normalized.upper():
        raise ConfigError(
            f"--at {text!r} is not an RFC 3339 time",
            "use 2026-11-01T00:00:00Z, 2026-11-01T02:00:00+01:00 or a date (end of that day, UTC)",
        )
    if moment.tzinfo is None:
        raise ConfigError(
            f"--at {text!r} has no time zone",
            f"add Z for UTC ({value}Z) or an offset such as +01:00",
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-23:59 is after the last UTC instant
        raise ConfigError(
            f"--at {text!r} is outside the calendar once converted to UTC",
            "give a time between 0001-01-02 and 9999-12-30",
        ) from None


@dataclass
class Candidate:
    """One backup with the copies of it that were listed."""

    backup_id: BackupId
    host: str
    local: BackupRef | None = None
    remote: BackupRef | None = None

    @property
    def id(self) -> str:
        return str(self.backup_id)


def _order(candidate: Candidate) -> tuple[datetime, int]:
    return candidate.backup_id.created_at, candidate.backup_id.seq


def _listings(ctx: Context, from_: str | None) -> tuple[Listing, Listing]:
    local = ctx.local_catalog.listing() if from_ != "remote" else Listing()
    remote = Listing()
    if from_ != "local" and ctx.remote is not None:
        try:
            # Every host: a DR machine has a new hostname, and the error lists who has it.
            try:
                remote = ctx.remote_catalog.listing(all_hosts=True)
            except StorageError:
                remote = (
                    ctx.remote_catalog.listing()
                )  # a host-scoped role may list only its own prefix
        except StorageError as exc:
            if from_ == "remote":
                raise
            LOG.warning("cannot list the bucket (%s); choosing among local backups only", exc)
    return local, remote


def find_backup(
    ctx: Context,
    what: str,
    *,
    host: str,
    at: datetime | None = None,
    from_: str | None = None,
) -> Candidate:
    """The backup to restore: ``what`` is a backup id or a source name (its newest backup
    at or before ``at``), under ``host``. Found by LIST alone, locally and remotely."""
    if not valid_name(what):
        raise UsageError(f"{what!r} is not a source name or backup id", "see `cloudbackup list`")
    if from_ == "remote" and ctx.remote is None:
        raise UsageError("--from remote needs a bucket", "set CLOUDBACKUP_S3_BUCKET")
    try:
        wanted_id: BackupId | None = BackupId.parse(what)
    except ValueError:
        wanted_id = None
    source = wanted_id.source if wanted_id else what
    local, remote = _listings(ctx, from_)
    candidates: dict[tuple[str, str], Candidate] = {}
    hosts_with_it: set[str] = set()
    for listing in (local, remote):
        for ref in listing.refs:
            if ref.source != source or (wanted_id and ref.backup_id != wanted_id):
                continue
            hosts_with_it.add(ref.host)
            if ref.host != host:
                continue
            cand = candidates.setdefault((ref.host, ref.id), Candidate(ref.backup_id, ref.host))
            if ref.where == "local":
                cand.local = ref
            else:
                cand.remote = ref
    thing = f"backup {what}" if wanted_id else f"source {what}"
    if not candidates:
        where = _where_words(ctx, from_)
        if hosts_with_it:
            raise UsageError(
                f"{thing} not found for host {host}; hosts with it: "
                f"{', '.join(sorted(hosts_with_it))} — pass --host",
                None,
            )
        hint = "see `cloudbackup list --all-hosts`"
        if ctx.remote is None and from_ != "local":
            hint = "no bucket is configured: set CLOUDBACKUP_S3_BUCKET to look in the bucket"
        raise UsageError(f"{thing} not found ({where})", hint)
    chosen = sorted(candidates.values(), key=_order)
    if at is not None:
        before = [c for c in chosen if c.backup_id.created_at <= at]
        if not before:
            raise UsageError(
                f"no backup of {source} for host {host} at or before "
                f"{at.strftime('%Y-%m-%dT%H:%M:%SZ')}; the oldest is {chosen[0].id}",
                "pick a later --at (see `cloudbackup list`)",
            )
        chosen = before
    return chosen[-1]


def _where_words(ctx: Context, from_: str | None) -> str:
    places = []
    if from_ != "remote":
        places.append(f"local dir {ctx.settings.local_dir}")
    if from_ != "local" and ctx.remote is not None:
        places.append(ctx.settings.remote_name)
    return " or ".join(places) or "nowhere to look"


@dataclass
class Copy:
    where: str  # "local" | "remote"
    manifest: Manifest
    ref: BackupRef
    local_path: Path | None = None  # a local archive (checked while it is read)


def peek_manifest(ctx: Context, cand: Candidate, from_: str | None) -> Copy:
    """The parsed manifest of the copy to try first (no archive read), to plan the target.

    A local manifest that does not parse (the local dir is untrusted) falls back to the
    remote copy unless ``--from local``, as a local archive that fails its checksum does."""
    if from_ == "local" and cand.local is None:
        raise UsageError(
            f"backup {cand.id} is not in the local dir {ctx.settings.local_dir}",
            "restore it --from remote",
        )
    if from_ == "remote" and cand.remote is None:
        raise UsageError(f"backup {cand.id} is not in the bucket", "restore it --from local")
    remote_usable = from_ != "local" and cand.remote is not None and ctx.remote is not None
    if from_ != "remote" and cand.local is not None:
        try:
            return Copy("local", ctx.local_catalog.manifest(cand.local), cand.local)
        except IntegrityError as exc:
            if not remote_usable:
                raise
            LOG.warning("%s; restoring from remote", exc.message)
    assert cand.remote is not None
    return Copy("remote", ctx.remote_catalog.manifest(cand.remote), cand.remote)


def choose_copy(ctx: Context, cand: Candidate, from_: str | None, peeked: Copy) -> Copy:
    """The copy to read: the local one when its archive is there with the size its manifest
    names (its checksum is checked while it is restored: see ``remote_fallback``), unless
    ``--from remote``; else the remote one. ``peeked`` is what ``peek_manifest`` read."""
    if peeked.where == "local":
        problem = _local_copy_problem(ctx, peeked.ref, peeked.manifest)
        if problem is None:
            assert peeked.ref.archive_key
            return Copy(
                "local", peeked.manifest, peeked.ref, ctx.local.path(peeked.ref.archive_key)
            )
        if from_ == "local" or cand.remote is None or ctx.remote is None:
            raise IntegrityError(
                f"{cand.id}: the local copy is not usable: {problem}", _INTEGRITY_HINT
            )
        LOG.warning(
            "%s: the local copy is not usable (%s); restoring from remote", cand.id, problem
        )
        peeked = remote_copy(ctx, cand, peeked.manifest.kind)
    manifest = peeked.manifest
    if peeked.ref.archive_size is not None and peeked.ref.archive_size != manifest.size:
        raise IntegrityError(
            f"{cand.id}: the remote archive has {peeked.ref.archive_size} bytes, "
            f"its manifest says {manifest.size}",
            _INTEGRITY_HINT,
        )
    return peeked


def _local_copy_problem(ctx: Context, ref: BackupRef, manifest: Manifest) -> str | None:
    """None when the local archive is a regular file of the manifest's size (what can be
    known without reading it), else what is wrong."""
    assert ref.archive_key
    path = ctx.local.path(ref.archive_key)
    try:
        head = ctx.local.head(ref.archive_key)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if head is None:
        return f"{path} is missing (or not a regular file)"
    if head.size != manifest.size:
        return f"{path} has {head.size} bytes, the manifest says {manifest.size}"
    return None


def can_fall_back(ctx: Context, cand: Candidate, from_: str | None, copy: Copy) -> bool:
    """Whether a local copy that fails its checksum while restored may be replaced by the
    remote one (not with ``--from local``)."""
    return (
        copy.where == "local"
        and from_ != "local"
        and cand.remote is not None
        and ctx.remote is not None
    )


def remote_copy(ctx: Context, cand: Candidate, kind: str) -> Copy:
    """The remote copy of ``cand`` (its manifest read and parsed), which must be a backup of
    ``kind`` (the target was planned for it)."""
    assert cand.remote is not None
    manifest = ctx.remote_catalog.manifest(cand.remote)
    if manifest.kind != kind:
        raise IntegrityError(
            f"{cand.id}: the remote manifest says a {manifest.kind} backup, the local one "
            f"a {kind} backup",
            _INTEGRITY_HINT,
        )
    return Copy("remote", manifest, cand.remote)
