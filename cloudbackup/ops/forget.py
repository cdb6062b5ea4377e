"""Forget: delete backups named by id, locally, remotely or both.

The way out of a backup that should not exist (one dated in the future by a clock that was
wrong for a night blocks every later backup of its source). Everything is checked before
anything is deleted: an id that names no backup, a backup under Object Lock, or one that
other backups still need is refused (exit 2) and nothing is deleted. The plan (one
``PruneResult`` per place and source, with its deletions) is then carried out as prune's is
(:func:`cloudbackup.ops.deletion.carry_out`): a dry run records exactly the keys it names, a
real run deletes exactly them, manifest first (then archive, and locally the upload record).
The caller holds the local-dir lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, UsageError
from cloudbackup.core.model import BackupId, BackupRef, Listing, format_time
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.ops.deletion import (
    PruneResult,
    carry_out,
    local_keys,
    lock_until,
    plan_deletions,
    remote_keys,
)

__all__ = ["exit_code", "forget", "needed_by"]

LOG = logging.getLogger("cloudbackup")
POLICY = "forget"  # what PruneResult.policy says for a forget


def forget(
    ctx: Context, ids: Sequence[str], *, where: str = "local", dry_run: bool = False
) -> list[PruneResult]:
    """Delete the backups ``ids`` of this host (``ctx.host``) from ``where``.

    One :class:`PruneResult` per (where, source), as prune returns them. ``UsageError``
    (exit 2, nothing deleted) for an unknown id, a locked backup or a needed one.
    """
    if where not in ("local", "remote", "all"):
        raise UsageError(f"--where {where!r} is invalid", "use local, remote or all")
    if where == "remote" and ctx.remote is None:
        raise UsageError("--where remote needs a bucket", "set CLOUDBACKUP_S3_BUCKET")
    if not ids:
        raise UsageError(
            "no backup id given", "name the backups to forget (see `cloudbackup list`)"
        )
    wanted = _parse_ids(ids)
    sides: list[tuple[str, Listing]] = []
    if where in ("local", "all"):
        sides.append(("local", ctx.local_catalog.listing(host=ctx.host)))
    if where in ("remote", "all") and ctx.remote is not None:
        sides.append(("remote", ctx.remote_catalog.refresh()))
    elif where == "all":
        LOG.info("no bucket or destination configured: only local copies are forgotten")

    found = {side: _matching(listing, wanted, ctx.host) for side, listing in sides}
    unknown = [i for i in wanted if not any(i in refs for refs in found.values())]
    if unknown:
        places = " or ".join(side for side, _listing in sides)
        raise UsageError(
            f"no backup {', '.join(unknown)} of host {ctx.host} found ({places}); nothing deleted",
            "see `cloudbackup list` for the ids",
        )
    now = ctx.now()
    for side, listing in sides:
        needed = needed_by(listing, wanted)
        if needed:
            ident, users = next(iter(sorted(needed.items())))
            raise UsageError(
                f"{ident} is needed by {', '.join(users)} ({side}); nothing deleted",
                "forget those too (name them all), or keep it",
            )
        if side == "remote":
            _refuse_locked(ctx, found[side], now)
            problem = None if ctx.settings.host_explicit else ctx.host_claim.problem(ctx.host)
            if problem:
                raise UsageError(problem)

    results: list[PruneResult] = []
    # Remote first: when the bucket refuses (a writer role cannot delete), the local copies
    # are left as they were, and forgetting again later finishes the job.
    for side, listing in sorted(sides, key=lambda s: s[0] != "remote"):
        refs_by_id = found[side]
        store: Any = ctx.local if side == "local" else ctx.remote
        keys = local_keys(listing) if side == "local" else remote_keys
        by_source: dict[str, list[BackupRef]] = {}
        for ref in refs_by_id.values():
            by_source.setdefault(ref.source, []).append(ref)
        for source, refs in sorted(by_source.items()):
            refs.sort(key=lambda r: (r.created_at, r.backup_id.seq), reverse=True)
            result = PruneResult(
                where=side,
                host=ctx.host,
                source=source,
                policy=POLICY,
                delete=[ref.id for ref in refs],  # newest first, executed so (a chain from its head)
                dry_run=dry_run,
                named=True,
            )
            plan_deletions(result, refs, [], keys)
            if any(r.errors for r in results):
                result.errors.append("not deleted: an earlier deletion failed")
            else:
                carry_out(ctx, store, result)
            results.append(result)
        if side == "remote" and not dry_run:
            ctx.remote_catalog.invalidate()  # stale: list again
            if "local" not in found:
                _unmark_offsite(ctx, results)
    return results


def needed_by(listing: Listing, ids: Sequence[str]) -> dict[str, list[str]]:
    """The backups among ``ids`` that a backup not named still needs: id -> the ids that
    need it (the incrementals built on it, up to the next full: the names carry the chain,
    SPEC "Incremental archives"). Forgetting a backup with its whole dependent chain
    named is allowed."""
    named = set(ids)
    needed: dict[str, list[str]] = {}
    groups: dict[tuple[str, str], list[BackupRef]] = {}
    for ref in listing.refs:
        groups.setdefault((ref.host, ref.source), []).append(ref)
    for refs in groups.values():
        refs.sort(key=lambda r: (r.created_at, r.backup_id.seq))
        for position, ref in enumerate(refs):
            if ref.id not in named:
                continue
            users = []
            for later in refs[position + 1 :]:
                if not later.incremental:
                    break
                if later.id not in named:
                    users.append(later.id)
            if users:
                needed[ref.id] = users
    return needed


def _parse_ids(ids: Sequence[str]) -> list[str]:
    wanted: list[str] = []
    for text in ids:
        try:
            ident = str(BackupId.parse(text))
        except ValueError:
            raise UsageError(
                f"{text!r} is not a backup id; nothing deleted",
                "ids look like www-20261121T021500Z (see `cloudbackup list`)",
            ) from None
        if ident != text:
            raise UsageError(f"{text!r} is not a backup id; nothing deleted")
        if ident not in wanted:
            wanted.append(ident)
    return wanted


def _matching(listing: Listing, wanted: Sequence[str], host: str) -> dict[str, BackupRef]:
    """The backups (complete, or half-deleted: an archive or a manifest alone) named."""
    found: dict[str, BackupRef] = {}
    for ref in (*listing.refs, *listing.orphans, *listing.stray_manifests):
        if ref.host == host and ref.id in wanted and ref.id not in found:
            found[ref.id] = ref
    return found


def _refuse_locked(ctx: Context, refs: dict[str, BackupRef], now: datetime) -> None:
    """UsageError for a remote backup under Object Lock: S3 would refuse (or, under
    governance mode, leave a delete marker over) a delete before the lock ends."""
    assert ctx.remote is not None
    for ident, ref in sorted(refs.items()):
        until = lock_until(ctx.settings, ref, now)
        if until is None and ref.archive_key:
            try:  # locked by another writer's setting: S3 knows (one HEAD)
                head = ctx.remote.head(ref.archive_key)
            except CloudBackupError as exc:
                raise UsageError(
                    f"cannot check the object lock of {ident}: {exc}; nothing deleted"
                ) from None
            if head is not None and head.lock_until is not None and head.lock_until > now:
                until = head.lock_until
        if until is not None:
            raise UsageError(
                f"{ident} is under object lock until {format_time(until)}; nothing deleted",
                "a locked backup cannot be deleted before its retention ends",
            )


def _unmark_offsite(ctx: Context, results: Sequence[PruneResult]) -> None:
    """A local copy whose remote copy was forgotten is no longer offsite: its upload record
    goes, so prune pins it and the next upload sends it again."""
    listing = ctx.local_catalog.listing(host=ctx.host)
    for result in results:
        for ident in result.deleted:
            key = listing.upload_keys.get(ident)
            if key is None:
                continue
            try:
                ctx.local.delete(key)
            except OSError as exc:
                LOG.warning("cannot remove the upload record %s: %s", key, exc.strerror)
                continue
            LOG.warning(
                "%s: the local copy is no longer offsite; the next upload sends it again "
                "(forget it with --where all to delete it too)",
                ident,
            )


def exit_code(results: Sequence[PruneResult]) -> int:
    """0 when every named backup was deleted (or would be), 1 otherwise."""
    return code_of(r.outcome for r in results)
