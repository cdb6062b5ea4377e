"""Prune: apply the retention plan to local and remote copies, per host and source.

One planner (:func:`cloudbackup.core.retention.plan`) decides, per group, with the group's
policy (``--policy``, else the source's own ``CLOUDBACKUP_*_RETENTION__<SOURCE>``, else the
global one); the plan is a value (``PruneResult`` with its deletions), which a dry run prints
and a real run executes exactly (``ops.deletion.carry_out``). Everything is planned from LIST
results alone (names carry host, source and time): a remote prune issues no GetObject, and
pins need no extra request.

* Pinned: a local backup not yet verified offsite while a bucket is configured ("not yet
  offsite"); a remote backup whose Object Lock retention (``created_at`` + the configured
  period) has not expired ("object lock until T"): prune never writes a delete marker over it.
* Remote deletes go manifest first, then archive, so a half-deleted backup is never listed
  (an archive without manifest is an orphan, swept later). Local deletes: manifest, archive,
  upload record.
* Orphans (an archive without manifest) older than 7 days are deleted, locally and remotely;
  younger ones are left alone: the manifest of an upload or backup may still be on its way.
  Locally the same 7 days apply (see README, "Orphans", for why not "at once under the lock").
* One failing source is recorded in its result and the other sources go on. ``AccessDenied``
  stops that source at once and names the missing permission; a delete refused by Object Lock
  is reported as retained, not as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import UsageError
from cloudbackup.core.model import (
    BackupRef,
    Listing,
    format_time,
)
from cloudbackup.core.outcome import REPORTED
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.core.retention import Policy, plan
from cloudbackup.ops.deletion import (
    PruneResult,
    carry_out,
    local_keys,
    lock_until,
    plan_deletions,
    remote_keys,
)

__all__ = [
    "ORPHAN_AGE",
    "exit_code",
    "has_remote_policy",
    "prune",
    "prune_for_run",
    "validate",
]

LOG = logging.getLogger("cloudbackup")

#: An archive without manifest younger than this may be an upload or backup in progress.
ORPHAN_AGE = timedelta(days=7)
REASON_NOT_OFFSITE = "not yet offsite"


def exit_code(results: Iterable[PruneResult]) -> int:
    """0 when every group was pruned as planned, 1 when any group recorded an error."""
    return code_of(r.outcome for r in results)


# ---------------------------------------------------------------- entry points


def validate(
    settings: Settings,
    *,
    where: str = "local",
    policy: Policy | None = None,
    host: str | None = None,
    all_hosts: bool = False,
) -> None:
    """Raise :class:`UsageError` (exit 2) for a prune that cannot run; nothing is touched."""
    if where not in ("local", "remote", "all"):
        raise UsageError(f"--where {where!r} is invalid", "use local, remote or all")
    if host is not None and all_hosts:
        raise UsageError("--host and --all-hosts exclude each other", "give one of them")
    if where == "remote" and not settings.remote_configured:
        raise UsageError(
            "--where remote needs a bucket", "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST)"
        )
    if (
        where in ("remote", "all")
        and settings.remote_configured
        and policy is None
        and not has_remote_policy(settings)
    ):
        raise UsageError(
            "no retention policy for the remote copies",
            "set CLOUDBACKUP_REMOTE_RETENTION or pass --policy",
        )


def prune(
    ctx: Context,
    *,
    where: str = "local",
    policy: Policy | None = None,
    source: str | None = None,
    host: str | None = None,
    all_hosts: bool = False,
    dry_run: bool = False,
) -> list[PruneResult]:
    """Plan and apply retention per (host, source); see the module docstring.

    ``policy`` (``--policy``) overrides the configured local/remote policies, global and
    per source. Usage errors (exit 2, see :func:`validate`) are raised before anything is
    listed or deleted.
    """
    settings = ctx.settings
    validate(settings, where=where, policy=policy, host=host, all_hosts=all_hosts)
    now = ctx.now()
    results: list[PruneResult] = []
    if where in ("local", "all"):
        results += _prune_local(ctx, policy, now, source, host, dry_run)
    if where in ("remote", "all"):
        if ctx.remote is None or (policy is None and not has_remote_policy(settings)):
            LOG.info(
                "no bucket configured (CLOUDBACKUP_S3_BUCKET or CLOUDBACKUP_DEST): remote copies not pruned"
            )
        else:
            results += _prune_remote(ctx, policy, now, source, host, all_hosts, dry_run)
    return results


def prune_for_run(
    ctx: Context, sources: Sequence[str] = (), *, dry_run: bool = False
) -> list[PruneResult]:
    """What ``run`` prunes: local copies always; remote ones only with a remote policy (the
    global one, or a source's own). ``sources`` (``run --source``): only theirs."""
    remote = ctx.remote is not None and has_remote_policy(ctx.settings)
    where = "all" if remote else "local"
    if not sources:
        return prune(ctx, where=where, dry_run=dry_run)
    return [
        result
        for source in sources
        for result in prune(ctx, where=where, source=source, dry_run=dry_run)
    ]


def has_remote_policy(settings: Settings) -> bool:
    """A remote policy applies to some source: the global one, or a source's own."""
    return settings.remote_retention is not None or settings.overridden("remote_retention")


# ---------------------------------------------------------------- the two sides


def _prune_local(
    ctx: Context,
    policy: Policy | None,
    now: datetime,
    source: str | None,
    host: str | None,
    dry_run: bool,
) -> list[PruneResult]:
    """This host's (or ``host``'s) local dir only: other hosts' dirs are left alone."""
    target = host or ctx.settings.host
    listing = ctx.local_catalog.listing(host=target)
    offsite_expected = ctx.settings.remote_configured
    keys = local_keys(listing)
    results = []
    for (group_host, group_source), refs, orphans in _groups(listing, {target}, source):
        pins: dict[str, list[str]] = {}
        if offsite_expected:
            for ref in refs:
                if not ctx.local_catalog.verified_offsite(ref):
                    pins[ref.id] = [REASON_NOT_OFFSITE]
        own = ctx.settings.for_source(group_source).local_retention
        group_policy = policy if policy is not None else own
        result = _plan_group("local", group_host, group_source, refs, group_policy, now, pins)
        result.dry_run = dry_run
        _classify_orphans(result, orphans, now, lambda ref: None)
        plan_deletions(result, refs, orphans, keys)
        carry_out(ctx, ctx.local, result)
        results.append(result)
    return results


def _prune_remote(
    ctx: Context,
    policy: Policy | None,
    now: datetime,
    source: str | None,
    host: str | None,
    all_hosts: bool,
    dry_run: bool,
) -> list[PruneResult]:
    settings = ctx.settings
    # The cached listing may predate this run's uploads; one host's prefix unless --all-hosts.
    other_host = host is not None and host != settings.host
    listing = ctx.remote_catalog.refresh(all_hosts=all_hosts or other_host)
    target = host or settings.host
    hosts = None if all_hosts else {target}
    explicit = all_hosts or host is not None or settings.host_explicit
    problem = None if explicit else ctx.host_claim.problem(target)

    def lock_reason(ref: BackupRef) -> str | None:
        until = lock_until(settings, ref, now)
        return f"object lock until {format_time(until)}" if until else None

    results = []
    for (group_host, group_source), refs, orphans in _groups(listing, hosts, source):
        own_remote = settings.for_source(group_source).remote_retention
        group_policy = policy if policy is not None else own_remote
        if group_policy is None:
            LOG.info(
                "remote %s/%s: no remote retention policy for this source: not pruned",
                group_host,
                group_source,
            )
            continue
        pins = {ref.id: [reason] for ref in refs if (reason := lock_reason(ref))}
        result = _plan_group("remote", group_host, group_source, refs, group_policy, now, pins)
        result.dry_run = dry_run
        _classify_orphans(result, orphans, now, lock_reason)
        plan_deletions(result, refs, orphans, remote_keys)
        if problem:
            result.errors.append(problem)
            LOG.error("remote %s/%s: %s", group_host, group_source, problem, extra=REPORTED)
        else:
            carry_out(ctx, ctx.remote, result)
        results.append(result)
    if not dry_run and any(r.deleted_keys for r in results):
        ctx.remote_catalog.invalidate()  # stale: the next caller lists again
    return results


# ---------------------------------------------------------------- planning


def _groups(
    listing: Listing, hosts: set[str] | None, source: str | None
) -> list[tuple[tuple[str, str], list[BackupRef], list[BackupRef]]]:
    """(host, source) -> (complete backups, orphan archives), sorted by host and source."""
    groups: dict[tuple[str, str], tuple[list[BackupRef], list[BackupRef]]] = {}
    for index, refs in enumerate((listing.refs, listing.orphans)):
        for ref in refs:
            if (hosts is not None and ref.host not in hosts) or (source and ref.source != source):
                continue
            groups.setdefault((ref.host, ref.source), ([], []))[index].append(ref)
    for stray in listing.stray_manifests:
        if (hosts is None or stray.host in hosts) and (not source or stray.source == source):
            LOG.warning(
                "%s: a manifest without its archive (%s); left alone",
                stray.id,
                stray.manifest_key,
            )
    return [(ident, refs, orphans) for ident, (refs, orphans) in sorted(groups.items())]


def _plan_group(
    where: str,
    host: str,
    source: str,
    refs: Sequence[BackupRef],
    policy: Policy,
    now: datetime,
    pins: dict[str, list[str]],
) -> PruneResult:
    planned = plan(refs, policy, now=now, pinned=pins)
    for ref, reasons in planned.keep:
        LOG.debug("%s %s/%s: keep %s (%s)", where, host, source, ref.id, ", ".join(reasons))
    for ident in planned.removed_ids:
        LOG.debug("%s %s/%s: delete %s (no rule of %s keeps it)", where, host, source, ident, policy)
    return PruneResult(
        where=where,
        host=host,
        source=source,
        policy=str(policy),
        keep=[(ref.id, reasons) for ref, reasons in planned.keep],
        delete=planned.removed_ids,
        pinned={ident: pins[ident] for ident in planned.kept_ids if ident in pins},
        policy_empty=policy.is_empty,
    )


def _classify_orphans(
    result: PruneResult,
    orphans: Sequence[BackupRef],
    now: datetime,
    lock_reason: Callable[[BackupRef], str | None],
) -> None:
    """Orphans older than 7 days are swept, younger (or locked) ones left and said so."""
    for orphan in orphans:
        locked = lock_reason(orphan)
        modified = orphan.archive_mtime
        if result.policy_empty:
            result.orphans_kept.append((orphan.id, "the policy has no rules: nothing deleted"))
        elif locked:
            result.orphans_kept.append((orphan.id, locked))
        elif modified is None or now - modified < ORPHAN_AGE:
            result.orphans_kept.append(
                (orphan.id, "younger than 7 days: its manifest may still be on its way")
            )
        else:
            result.orphans.append(orphan.id)
