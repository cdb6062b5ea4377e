"""``list``: backups from LIST results only (zero GETs), local and remote merged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError
from cloudbackup.core.model import format_time


@dataclass
class ListedBackup:
    id: str
    host: str
    source: str
    created_at: datetime
    size: int | None
    local: bool
    remote: bool
    verified: bool
    #: The archive's name ends in .age (encrypted with age): known from LIST alone.
    encrypted: bool = False
    incremental: bool = False
    #: 0 for a full; n for the n-th incremental after it (the names carry the chain).
    level: int = 0
    parent: str | None = None

    @property
    def kind(self) -> str:
        return "incr" if self.incremental else "full"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "source": self.source,
            "created_at": format_time(self.created_at),
            "size": self.size,
            "local": self.local,
            "remote": self.remote,
            "verified": self.verified,
            "encrypted": self.encrypted,
            "level": self.level,
            "parent": self.parent,
        }


def list_backups(
    ctx: Context,
    *,
    where: str = "all",
    source: str | None = None,
    host: str | None = None,
    all_hosts: bool = False,
) -> list[ListedBackup]:
    """Backups from LIST results only (zero GETs)."""
    wanted_host = None if all_hosts else (host or ctx.host)
    merged: dict[tuple[str, str], ListedBackup] = {}
    if where in ("local", "all"):
        listing = ctx.local_catalog.listing()
        for ref in listing.refs:
            if wanted_host and ref.host != wanted_host:
                continue
            if source and ref.source != source:
                continue
            merged[(ref.host, ref.id)] = ListedBackup(
                ref.id,
                ref.host,
                ref.source,
                ref.created_at,
                ref.archive_size,
                True,
                False,
                ctx.local_catalog.verified_offsite(ref),
                ref.encrypted,
                ref.incremental,
            )
    if where in ("remote", "all") and ctx.remote is not None:
        for ref in ctx.remote_catalog.listing(all_hosts=all_hosts).refs:
            if wanted_host and ref.host != wanted_host:
                continue
            if source and ref.source != source:
                continue
            existing = merged.get((ref.host, ref.id))
            # A remote manifest is uploaded only after HEAD confirmed the archive: verified.
            if existing:
                existing.remote = True
                existing.verified = True
            else:
                merged[(ref.host, ref.id)] = ListedBackup(
                    ref.id,
                    ref.host,
                    ref.source,
                    ref.created_at,
                    ref.archive_size,
                    False,
                    True,
                    True,
                    ref.encrypted,
                    ref.incremental,
                )
    listed = sorted(merged.values(), key=lambda b: (b.host, b.source, b.created_at, b.id))
    previous: ListedBackup | None = None
    for backup in listed:
        same = previous is not None and (previous.host, previous.source) == (
            backup.host,
            backup.source,
        )
        if backup.incremental and same and previous is not None:
            backup.parent = previous.id
            backup.level = previous.level + 1
        elif backup.incremental:
            backup.level = 1  # its parent is not listed here
        previous = backup
    return listed


def hosts_with_backups(ctx: Context) -> list[str]:
    """Every host with backups in the bucket (one LIST of the whole prefix): what a listing
    that found none of this host names, as ``restore`` does (a DR machine's hostname is not
    the old host's)."""
    if ctx.remote is None:
        return []
    try:
        listing = ctx.remote_catalog.listing(all_hosts=True)
    except CloudBackupError:  # a role scoped to this host's prefix cannot list the others
        return []
    return sorted({ref.host for ref in listing.refs})
