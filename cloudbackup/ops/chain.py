"""Whether a backup of a tree source is full or incremental, and against what.

SPEC "Incremental archives": the parent of an incremental is always the backup immediately
before it (same host and source, id order, local or remote); it is made only against an
index this host wrote and kept in its local dir, checked against the digest its local
manifest records. An encrypted backup's manifest describes the uploaded ciphertext: its
parent is the plaintext index kept beside it in the local dir only, read whole before use
(zstd's frame checksum). An index fetched from the bucket is never a parent. Anything
missing or damaged means a full backup, with one log line saying why.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, NotFound
from cloudbackup.core.model import BackupId, BackupRef, Manifest, index_name, key_for
from cloudbackup.sources.base import Source
from cloudbackup.stream.index import IndexInvalid, Parent, check_complete, read_index

LOG = logging.getLogger("cloudbackup")


@dataclass
class ChainStart:
    """An incremental backup's parent: its manifest, its index (open), the new level."""

    manifest: Manifest
    level: int
    base: str
    index: IO[bytes]
    parent: Parent

    def close(self) -> None:
        self.index.close()


def _newest(ctx: Context, source: str) -> tuple[BackupRef | None, BackupRef | None]:
    """The newest backup of this host and source anywhere (local or remote), and the newest
    local one."""
    local = ctx.local_catalog.listing(source).for_source(ctx.host, source)
    remote = ctx.remote_catalog.listing_or_empty().for_source(ctx.host, source)
    order = lambda r: (r.created_at, r.backup_id.seq)  # noqa: E731
    newest = max([*local, *remote], key=order, default=None)
    return newest, (max(local, key=order) if local else None)


def start(
    ctx: Context, source: Source, settings: Settings, *, full: bool, moment: datetime
) -> ChainStart | None:
    """The parent to make this backup an incremental of, or None for a full (logged)."""
    if not source.chain_capable:
        return None
    name = source.name

    def full_because(reason: str) -> None:
        LOG.info("%s: full backup (%s)", name, reason)

    if full:
        full_because("--full")
        return None
    every = settings.full_every
    if every.always:
        full_because(f"CLOUDBACKUP_FULL_EVERY={every}")
        return None
    newest, local = _newest(ctx, name)
    if newest is None:
        full_because("the first backup of this source")
        return None
    if local is None or local.id != newest.id:
        full_because(f"the local dir lacks the index of the newest backup {newest.id}")
        return None
    try:
        manifest = ctx.local_catalog.manifest(local)
    except CloudBackupError as exc:
        full_because(f"the manifest of {local.id} cannot be read: {exc}")
        return None
    facts = manifest.index
    if facts is None or manifest.walk_started_ns is None:
        full_because(f"{local.id} has no index")
        return None
    level = manifest.level + 1
    base = manifest.base or manifest.id
    if every.count is not None and level >= every.count:
        full_because(f"CLOUDBACKUP_FULL_EVERY={every}: {manifest.level + 1} incrementals")
        return None
    if every.age is not None:
        base_time = manifest.created if manifest.level == 0 else _time_of(base)
        if moment - base_time >= every.age:
            full_because(f"CLOUDBACKUP_FULL_EVERY={every}: the full {base} is that old")
            return None
    if facts.name == index_name(local.backup_id):
        key = key_for("", ctx.host, local.backup_id, facts.name)
        handle = _open_checked(ctx, key, facts.size, facts.sha256, local.id, full_because)
    else:
        # Encrypted: the manifest describes the uploaded ciphertext; the parent is the
        # plaintext index this host kept beside it (no identity needed to read it).
        key = key_for("", ctx.host, local.backup_id, index_name(local.backup_id))
        handle = _open_plain(ctx, key, local.id, full_because)
    if handle is None:
        return None
    parent = Parent(
        id=manifest.id,
        base=base,
        started_ns=manifest.walk_started_ns,
        records=read_index(handle, name),
        ignore_inode=settings.incremental_ignore_inode,
    )
    return ChainStart(manifest, level, base, handle, parent)


def _time_of(backup_id: str) -> datetime:
    return BackupId.parse(backup_id).created_at


def _open_plain(
    ctx: Context, key: str, ident: str, say: Callable[[str], None]
) -> IO[bytes] | None:
    """The plaintext index kept beside an encrypted one, opened after it decompressed
    completely (zstd's frame checksum and end: a damaged or truncated copy means a full)."""
    try:
        handle = ctx.local.open(key)
    except NotFound:
        say(f"the local dir lacks the plaintext index of {ident}")
        return None
    except (OSError, CloudBackupError) as exc:
        say(f"the index of {ident} cannot be read: {getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        check_complete(handle)
        handle.seek(0)
    except (OSError, IndexInvalid) as exc:
        handle.close()
        say(f"the plaintext index of {ident} is damaged ({exc})")
        return None
    return io.BufferedReader(handle) if not isinstance(handle, io.BufferedReader) else handle


def _open_checked(
    ctx: Context, key: str, size: int, sha256: str, ident: str, say: Callable[[str], None]
) -> IO[bytes] | None:
    """The local index, opened after its size and digest matched the manifest's."""
    try:
        handle = ctx.local.open(key)
    except (OSError, CloudBackupError) as exc:
        say(f"the index of {ident} cannot be read: {getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        digest = hashlib.sha256()
        total = 0
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            total += len(chunk)
        if total != size or digest.hexdigest() != sha256:
            say(f"the index of {ident} is damaged (it differs from its manifest)")
            handle.close()
            return None
        handle.seek(0)
    except OSError as exc:
        handle.close()
        say(f"the index of {ident} cannot be read: {exc.strerror or exc}")
        return None
    return io.BufferedReader(handle) if not isinstance(handle, io.BufferedReader) else handle
