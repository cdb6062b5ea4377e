"""What every use case needs, built once by the CLI: the settings, the local and remote
stores, the clock, the machine id and the progress factory; the local and remote listings,
the one manifest reader of each side, and the local upload records."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cloudbackup.config import Settings
from cloudbackup.core.errors import CloudBackupError, IntegrityError
from cloudbackup.core.model import (
    BackupId,
    BackupRef,
    Listing,
    Manifest,
    UploadRecord,
    build_listing,
    check_manifest_size,
    parse_manifest,
    parse_upload_record,
    upload_name,
)
from cloudbackup.fs.files import write_file_atomic
from cloudbackup.storage.local import LocalStore

LOG = logging.getLogger("cloudbackup")

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class Context:
    """What every use case needs; built once by the CLI."""

    settings: Settings
    local: LocalStore
    now: Callable[[], datetime]
    machine_id: str
    remote: Any = None  # a remote store (S3Store behind the retry wrapper) or None
    progress: ProgressFactory = _no_progress
    _remote_listing: Listing | None = None
    _remote_listing_all: Listing | None = None
    _remote_warned: bool = False
    # The host claim's outcome for this run (transfer.claim_host): claimed, or the error.
    _host_claimed: bool = False
    _host_claim_error: CloudBackupError | None = None

    @property
    def host(self) -> str:
        return self.settings.host

    def local_dir_for(self, source: str, host: str | None = None) -> Path:
        return self.settings.local_dir / (host or self.host) / source

    def local_listing(self, source: str | None = None) -> Listing:
        """Every local backup, or only this host's backups of ``source`` (one directory)."""
        prefix = f"{self.host}/{source}" if source else ""
        return build_listing(self.local.list(prefix), prefix="", where="local")

    def remote_listing_or_empty(self) -> Listing:
        """The remote listing for guards before archiving; an unusable bucket is discovered
        (and reported) at upload, so the local archive is still made and kept."""
        if self.remote is None:
            return Listing()
        try:
            return self.remote_listing()
        except CloudBackupError as exc:
            if not self._remote_warned:
                LOG.warning("cannot list the bucket (%s); checking against local backups only", exc)
                self._remote_warned = True
            return Listing()

    def remote_listing(self, *, refresh: bool = False, all_hosts: bool = False) -> Listing:
        """This host's backups (LIST ``<prefix>/<host>/``: all a host-scoped writer may list),
        or every host's with ``all_hosts``. Cached until ``refresh``."""
        if self.remote is None:
            return Listing()
        parts = [p for p in self.settings.s3_prefix.split("/") if p]
        if all_hosts:
            if self._remote_listing_all is None or refresh:
                self._remote_listing_all = build_listing(
                    self.remote.list("/".join(parts) + "/" if parts else ""),
                    prefix=self.settings.s3_prefix,
                    where="remote",
                )
            return self._remote_listing_all
        if self._remote_listing is None or refresh:
            self._remote_listing = build_listing(
                self.remote.list("/".join([*parts, self.host]) + "/"),
                prefix=self.settings.s3_prefix,
                where="remote",
            )
        return self._remote_listing


def read_machine_id(local_dir: Path, candidates: Sequence[Path] | None = None) -> str | None:
    """``/etc/machine-id``, else dbus's, else the id stored in the local dir; never writes."""
    paths = candidates or (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
    for path in (*paths, local_dir / ".machine-id"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def machine_id(local_dir: Path, candidates: Sequence[Path] | None = None) -> str:
    """The machine id; when there is none, a random one is stored once in the local dir."""
    found = read_machine_id(local_dir, candidates)
    if found:
        return found
    new = uuid.uuid4().hex
    local_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(local_dir / ".machine-id", (new + "\n").encode(), 0o644)
    return new


def read_local_manifest(ctx: Context, ref: BackupRef) -> Manifest:
    """The manifest of a local backup, parsed against its key (the local dir is untrusted)."""
    return _read_manifest(ctx.local, ref)


def read_remote_manifest(ctx: Context, ref: BackupRef) -> Manifest:
    """The manifest of a remote backup, parsed against its key: one GET."""
    return _read_manifest(ctx.remote, ref)


def _read_manifest(store: Any, ref: BackupRef) -> Manifest:
    assert ref.manifest_key
    check_manifest_size(ref)
    try:
        raw = store.get_bytes(ref.manifest_key)
    except OSError as exc:  # the local dir: unreadable, or not a file
        raise CloudBackupError(
            f"cannot read the {ref.where} manifest {ref.manifest_key}: {exc.strerror or exc}",
            "check the local dir's permissions",
        ) from None
    return parse_manifest(raw, ref)


def upload_record_path(ctx: Context, source: str, backup_id: str, host: str | None = None) -> Path:
    return ctx.local_dir_for(source, host) / upload_name(BackupId.parse(backup_id))


def read_upload_record(
    ctx: Context, backup_id: str, source: str, host: str | None = None
) -> UploadRecord | None:
    """The local record of a backup's upload; ``None`` when there is none or it does not
    parse as one (the local dir is untrusted: a bad record proves nothing)."""
    parsed = BackupId.parse(backup_id)
    path = upload_record_path(ctx, source, backup_id, host)
    try:
        return parse_upload_record(path.read_bytes(), parsed, host or ctx.host)
    except (OSError, IntegrityError):
        return None


def write_upload_record(ctx: Context, source: str, backup_id: str, record: UploadRecord) -> None:
    import json

    path = upload_record_path(ctx, source, backup_id)
    write_file_atomic(
        path, (json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    )
