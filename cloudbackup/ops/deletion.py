"""The deletion plan and its one executor, shared by prune and forget: what deleting a
backup removes (manifest first, then archive, and locally the upload record), how a refusal
by Object Lock is told from a missing permission, and the record of what was planned and done.

Plans are values: prune and forget fill a :class:`PruneResult` (what to keep, with reasons
and pins; what to delete) and :func:`plan_deletions` adds each deletion's keys in the order
they go. :func:`carry_out` then ends every plan the same way: a dry run records exactly the
keys the plan names, a real run deletes exactly them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, PermanentStorageError
from cloudbackup.core.model import BackupRef, Listing, format_time, key_for, upload_name
from cloudbackup.core.outcome import REPORTED, Outcome

LOG = logging.getLogger("cloudbackup")

DELETE_PERMISSION = (
    "s3:DeleteObject — remote prune needs the pruner role, "
    "see `cloudbackup iam render --role pruner`"
)


_LOCK_WORDS = ("object lock", "objectlock", "worm", "retention", "legal hold")


@dataclass(frozen=True)
class Deletion:
    """One backup (or orphan archive) a plan deletes, and its keys in the order they go."""

    ref: BackupRef
    keys: tuple[str, ...]
    orphan: bool = False


@dataclass
class PruneResult:
    """The plan for one (where, host, source) group and what was done about it.

    ``delete`` is the plan; ``deleted`` what was actually deleted (empty on a dry run).
    """

    where: str
    host: str
    source: str
    policy: str
    keep: list[tuple[str, list[str]]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pinned: dict[str, list[str]] = field(default_factory=dict)  # id -> pin reasons
    orphans: list[str] = field(default_factory=list)  # orphan archives the sweep removes
    orphans_deleted: list[str] = field(default_factory=list)
    orphans_kept: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    retained: list[tuple[str, str]] = field(default_factory=list)  # delete refused by the lock
    dry_run: bool = False
    policy_empty: bool = False
    #: Every key deleted (or, on a dry run, that would have been), in order.
    deleted_keys: list[str] = field(default_factory=list)
    #: The backups were named (forget), not chosen by a policy (prune).
    named: bool = False
    #: The deletions of the plan, in the order they run (:func:`plan_deletions`).
    plan: list[Deletion] = field(default_factory=list, repr=False)
    #: id -> archive size (from the listing) of every backup and orphan of the group.
    sizes: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def kept_bytes(self) -> int:
        """The space the backups kept take."""
        return sum(self.sizes.get(ident, 0) for ident, _reasons in self.keep)

    @property
    def freed_bytes(self) -> int:
        """The space freed: what was deleted, or on a dry run what would be."""
        gone = [*self.delete, *self.orphans] if self.dry_run else [
            *self.deleted, *self.orphans_deleted
        ]
        return sum(self.sizes.get(ident, 0) for ident in gone)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def outcome(self) -> Outcome:
        """FAILED when a deletion failed, or when a backup named to be forgotten was kept by
        Object Lock (for prune, a lock keeping a backup is a retention, not a failure)."""
        if self.errors or (self.named and self.retained):
            return Outcome.FAILED
        return Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "host": self.host,
            "source": self.source,
            "policy": self.policy,
            "keep": [{"id": ident, "reasons": list(reasons)} for ident, reasons in self.keep],
            "delete": list(self.delete),
            "deleted": list(self.deleted),
            "errors": list(self.errors),
            "pinned": [{"id": ident, "reasons": list(r)} for ident, r in self.pinned.items()],
            "orphans": list(self.orphans),
            "orphans_deleted": list(self.orphans_deleted),
            "orphans_kept": [{"id": ident, "reason": why} for ident, why in self.orphans_kept],
            "retained": [{"id": ident, "reason": why} for ident, why in self.retained],
            "kept_bytes": self.kept_bytes,
            "freed_bytes": self.freed_bytes,
        }


def local_keys(listing: Listing) -> Callable[[BackupRef], list[str]]:
    """What deleting a local backup removes: manifest first, then archive, then the upload
    record (when ``listing`` has one)."""
    upload_keys = set(listing.upload_keys.values())

    def keys(ref: BackupRef) -> list[str]:
        upload_key = key_for("", ref.host, ref.backup_id, upload_name(ref.backup_id))
        found = [ref.manifest_key, ref.archive_key, ref.index_key, ref.plain_index_key]
        return [k for k in found if k] + ([upload_key] if upload_key in upload_keys else [])

    return keys


def remote_keys(ref: BackupRef) -> list[str]:
    """What deleting a remote backup removes: manifest first, then archive, then index."""
    return [
        k for k in (ref.manifest_key, ref.archive_key, ref.index_key, ref.plain_index_key) if k
    ]


def lock_until(settings: Settings, ref: BackupRef, now: datetime) -> datetime | None:
    """When the configured Object Lock on ``ref``'s objects ends, if after ``now``."""
    lock = settings.s3_object_lock
    if lock is None:
        return None
    until = ref.created_at + timedelta(days=lock.days)
    return until if until > now else None


def _refused_by_lock(exc: PermanentStorageError, lock_configured: bool) -> bool:
    """A delete refused because of Object Lock (AWS: AccessDenied naming the lock; MinIO:
    "WORM protected"; some stores: InvalidRequest), as opposed to a missing permission."""
    text = exc.message.lower()
    if exc.code in ("ObjectLocked", "ObjectLockedException"):
        return True
    mentions_lock = any(word in text for word in _LOCK_WORDS)
    if exc.code == "InvalidRequest":
        return mentions_lock or lock_configured
    return exc.code == "AccessDenied" and mentions_lock


def _lock_until_text(ctx: Context, store: Any, ref: BackupRef, key: str) -> str:
    lock = ctx.settings.s3_object_lock
    if lock is not None:
        return format_time(ref.created_at + timedelta(days=lock.days))
    try:  # not configured here (another writer's setting): ask S3, one HEAD
        head = store.head(key)
    except CloudBackupError:
        head = None
    if head is not None and head.lock_until is not None:
        return format_time(head.lock_until)
    return "its retention date"


def plan_deletions(
    result: PruneResult,
    refs: Sequence[BackupRef],
    orphans: Sequence[BackupRef],
    keys: Callable[[BackupRef], list[str]],
) -> None:
    """``result.plan``: ``result.delete`` newest first (an incremental goes before the
    backups it is built on, so an interrupted plan never leaves a listed backup without its
    ancestors), then the orphans swept, each with the ``keys`` deleting it removes."""
    by_id = {ref.id: ref for ref in [*refs, *orphans]}
    result.sizes = {ident: ref.archive_size or 0 for ident, ref in by_id.items()}
    plan = [Deletion(by_id[ident], tuple(keys(by_id[ident]))) for ident in result.delete]
    plan += [Deletion(by_id[ident], tuple(keys(by_id[ident])), True) for ident in result.orphans]
    result.plan = plan


def carry_out(ctx: Context, store: Any, result: PruneResult) -> None:
    """End a plan: on a dry run, record the keys it would delete (nothing is); else delete
    exactly them (:func:`execute`)."""
    if not result.dry_run:
        execute(ctx, store, result)
        return
    label = f"{result.where} {result.host}/{result.source}"
    for step in result.plan:
        result.deleted_keys += step.keys
        what = "orphan archive " if step.orphan else ""
        LOG.info("%s: would delete %s%s", label, what, step.ref.id, extra=REPORTED)


def execute(ctx: Context, store: Any, result: PruneResult) -> None:
    """Delete ``result.plan`` in order, each backup's keys in order; stop on a failure. A
    delete Object Lock refuses is recorded as retained, and the next one is tried."""
    label = f"{result.where} {result.host}/{result.source}"

    def shown(key: str) -> str:
        if result.where == "remote" and ctx.remote is not None:
            return ctx.remote.describe(key)
        return str(ctx.local.path(key)) if key else key

    for step in result.plan:
        ref = step.ref
        deleted_here: list[str] = []
        key = ""
        try:
            for key in step.keys:
                store.delete(key)
                deleted_here.append(key)
                result.deleted_keys.append(key)
        except PermanentStorageError as exc:
            locking = ctx.settings.s3_object_lock is not None
            if result.where == "remote" and _refused_by_lock(exc, locking):
                until = _lock_until_text(ctx, store, ref, key)
                why = f"retained by object lock until {until}"
                if deleted_here:  # the manifest was not locked, the archive is
                    why += " (its manifest is deleted: the archive is now an orphan)"
                result.retained.append((ref.id, why))
                LOG.warning(
                    "%s: %s is retained by object lock until %s", label, ref.id, until,
                    extra=REPORTED,
                )
                continue
            result.errors.append(_failure(result, ref, shown(key), exc, deleted_here))
            break
        except (CloudBackupError, OSError) as exc:
            result.errors.append(_failure(result, ref, shown(key), exc, deleted_here))
            break
        (result.orphans_deleted if step.orphan else result.deleted).append(ref.id)
        what = "orphan archive " if step.orphan else ""
        LOG.info("%s: deleted %s%s", label, what, ref.id, extra=REPORTED)
    for error in result.errors:
        LOG.error("%s: %s", label, error, extra=REPORTED)


def _failure(
    result: PruneResult,
    ref: BackupRef,
    key: str,
    exc: Exception,
    deleted_here: Sequence[str],
) -> str:
    """One line: what could not be deleted, why, what to do, and what is left behind."""
    if isinstance(exc, PermanentStorageError) and exc.code in ("AccessDenied", "403"):
        text = f"cannot delete {key}: access denied: the credentials lack {DELETE_PERMISSION}"
        if result.where == "local":
            text = f"cannot delete {key}: access denied"
    elif isinstance(exc, OSError):
        text = f"cannot delete {key}: {exc.strerror or exc}"
        if isinstance(exc, PermissionError):
            text += " (check the permissions of the local dir)"
    else:
        text = f"cannot delete {key}: {exc}"
    text = f"{ref.id}: {text}"
    if deleted_here:
        names = ", ".join(k.rsplit("/", 1)[-1] for k in deleted_here)
        text += f" ({names} already deleted: the archive left is an orphan a later prune removes)"
    return text + "; nothing more deleted for this source"
