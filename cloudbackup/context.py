"""What every use case needs, built once by the CLI: the settings, the local and remote
stores, the clock, the machine id and the progress factory.

The context is a value (frozen); what it holds that learns during a run is in three objects
it owns, each with its one job:

* :class:`LocalCatalog`: the local dir (``<local>/<host>/<source>/``): listings, its manifest
  reader and the upload records;
* :class:`RemoteCatalog`: the remote copies: one LIST per scope (this host, or every host),
  cached until :meth:`~RemoteCatalog.refresh` or :meth:`~RemoteCatalog.invalidate`, and the
  remote manifest reader;
* :class:`HostClaim`: ``<prefix>/<host>/.host-id``, claimed once per run; its outcome (claimed,
  or the error) is remembered.

Every manifest read back, local or remote, goes through :func:`read_manifest` and so
through ``core.model.parse_manifest``: bytes become a validated ``Manifest`` or an
``IntegrityError`` in one place. ``dataclasses.replace(ctx, remote=None)`` derives a
consistent context: the catalogs and the claim are rebuilt for the new stores.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cloudbackup import __version__
from cloudbackup.config import Settings
from cloudbackup.core.errors import CloudBackupError, ConfigError, PermanentStorageError
from cloudbackup.core.model import (
    BackupId,
    BackupRef,
    Listing,
    Manifest,
    UploadRecord,
    build_listing,
    check_manifest_size,
    host_claim_key,
    parse_upload_record,
    upload_name,
)
from cloudbackup.fs.dirs import Dir
from cloudbackup.sources.registry import parse_manifest
from cloudbackup.storage.base import ObjectHead, RemoteStore, UploadSpec
from cloudbackup.storage.local import LocalStore

LOG = logging.getLogger("cloudbackup")

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


# ---------------------------------------------------------------- machine id

MACHINE_ID_FILE = ".machine-id"
_MACHINE_ID = re.compile(r"[0-9A-Za-z._-]{1,128}")


def _stored_machine_id(local_dir: Path) -> str | None:
    """The id stored in the local dir: read without following a link, and only when it
    looks like an id (the local dir is untrusted: a planted file must not become one)."""
    try:
        with Dir.root(local_dir) as root:
            text = root.read_file(MACHINE_ID_FILE, limit=256).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _MACHINE_ID.fullmatch(text) else None


def read_machine_id(local_dir: Path, candidates: Sequence[Path] | None = None) -> str | None:
    """``/etc/machine-id``, else dbus's, else the id stored in the local dir; never writes."""
    paths = candidates or (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
    for path in paths:
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return text
    return _stored_machine_id(local_dir)


def machine_id(local_dir: Path, candidates: Sequence[Path] | None = None) -> str:
    """The machine id; when there is none, a random one is stored once in the local dir."""
    found = read_machine_id(local_dir, candidates)
    if found:
        return found
    new = uuid.uuid4().hex
    try:
        LocalStore(local_dir).put_bytes(MACHINE_ID_FILE, (new + "\n").encode(), mode=0o644)
    except FileExistsError:  # made meanwhile by another run, or not an id at all
        stored = _stored_machine_id(local_dir)
        if stored is None:
            raise ConfigError(
                f"{local_dir / MACHINE_ID_FILE} is not a machine id",
                "remove it: a new id is made on the next run",
            ) from None
        return stored
    return new


# ---------------------------------------------------------------- manifests


class Readable(Protocol):
    """A store manifests are read from (the local store or a remote one)."""

    def get_bytes(self, key: str) -> bytes: ...


def read_manifest(store: Readable, ref: BackupRef) -> Manifest:
    """The one reader of a manifest (local or remote): refused unread when the listing says
    it is far too large, read (one GET remotely), then parsed against its key."""
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


# ---------------------------------------------------------------- the local dir


class LocalCatalog:
    """The local dir: ``<local_dir>/<host>/<source>/`` holds archives, manifests and upload
    records. Listed afresh on every call (the run itself changes it); never trusted: each
    manifest and record is parsed against its name."""

    def __init__(self, store: LocalStore, host: str, prefix: str = "") -> None:
        self.store = store
        self.host = host
        self.prefix = prefix  # the bucket prefix: upload records name keys under it

    def source_dir(self, source: str, host: str | None = None) -> Path:
        return self.store.root / (host or self.host) / source

    def listing(self, source: str | None = None, *, host: str | None = None) -> Listing:
        """The backups of every host, or of ``host`` only, or of this (or ``host``'s) host's
        ``source`` only (one directory)."""
        if source is not None:
            prefix = f"{host or self.host}/{source}"
        else:
            prefix = host or ""
        return build_listing(self.store.list(prefix), prefix="", where="local")

    def manifest(self, ref: BackupRef) -> Manifest:
        """The manifest of a local backup, parsed against its key."""
        return read_manifest(self.store, ref)

    def upload_record_key(self, source: str, backup_id: str, host: str | None = None) -> str:
        return f"{host or self.host}/{source}/{upload_name(BackupId.parse(backup_id))}"

    def upload_record(
        self, backup_id: str, source: str, host: str | None = None
    ) -> UploadRecord | None:
        """The local record of a backup's upload; ``None`` when there is none or it does not
        parse as one (the local dir is untrusted: a bad record proves nothing)."""
        parsed = BackupId.parse(backup_id)
        key = self.upload_record_key(source, backup_id, host)
        try:
            return parse_upload_record(
                self.store.get_bytes(key), parsed, host or self.host, prefix=self.prefix
            )
        except (OSError, CloudBackupError):
            return None

    def verified_offsite(self, ref: BackupRef) -> bool:
        """True when the upload record of ``ref`` says its remote copy was verified."""
        record = self.upload_record(ref.id, ref.source, ref.host)
        return bool(record and record.verified_at)

    def write_upload_record(self, source: str, backup_id: str, record: UploadRecord) -> None:
        """Write (or replace) a backup's upload record, atomically."""
        data = (json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        self.store.put_bytes(self.upload_record_key(source, backup_id), data, replace=True)

    def remove_upload_record(self, source: str, backup_id: str) -> None:
        self.store.delete(self.upload_record_key(source, backup_id))

    def newest_archive_size(self, source: str) -> int | None:
        ref = self.listing(source).newest(self.host, source)
        return ref.archive_size if ref else None


# ---------------------------------------------------------------- the remote copies


class RemoteCatalog:
    """The remote copies, from LIST results: one listing per scope (this host's prefix, or
    every host's), kept until :meth:`refresh` or :meth:`invalidate`. Without a store, every
    listing is empty."""

    def __init__(self, store: RemoteStore | None, settings: Settings) -> None:
        self.store = store
        self.prefix = settings.s3_prefix
        self.host = settings.host
        self._listings: dict[bool, Listing] = {}
        self._warned = False

    def _list(self, all_hosts: bool) -> Listing:
        assert self.store is not None
        parts = [p for p in self.prefix.split("/") if p]
        if not all_hosts:
            parts.append(self.host)
        prefix = "/".join(parts) + "/" if parts else ""
        return build_listing(self.store.list(prefix), prefix=self.prefix, where="remote")

    def listing(self, *, all_hosts: bool = False) -> Listing:
        """This host's backups (LIST ``<prefix>/<host>/``: all a host-scoped writer may list),
        or every host's with ``all_hosts``; listed once, then kept."""
        if self.store is None:
            return Listing()
        if all_hosts not in self._listings:
            self._listings[all_hosts] = self._list(all_hosts)
        return self._listings[all_hosts]

    def refresh(self, *, all_hosts: bool = False) -> Listing:
        """List again (the bucket changed, or may have): the listing of that scope."""
        self._listings.pop(all_hosts, None)
        return self.listing(all_hosts=all_hosts)

    def invalidate(self) -> None:
        """Forget every listing (after deletions): the next caller lists again."""
        self._listings.clear()

    def listing_or_empty(self) -> Listing:
        """The listing for guards before archiving; an unusable bucket is discovered (and
        reported) at upload, so the local archive is still made and kept."""
        try:
            return self.listing()
        except CloudBackupError as exc:
            if not self._warned:
                LOG.warning("cannot list the bucket (%s); checking against local backups only", exc)
                self._warned = True
            return Listing()

    def manifest(self, ref: BackupRef) -> Manifest:
        """The manifest of a remote backup, parsed against its key: one GET."""
        assert self.store is not None
        return read_manifest(self.store, ref)


# ---------------------------------------------------------------- the host claim


#: The most of a ``.host-id`` body read: a machine id is 32 hex digits (the bucket is untrusted).
_CLAIM_READ_LIMIT = 256


def _claim_body(store: RemoteStore, key: str) -> str:
    """The machine id a claim's body holds (its first bytes only), stripped."""
    with store.open(key) as body:
        raw = body.read(_CLAIM_READ_LIMIT)
    return bytes(raw).decode("utf-8", errors="replace").strip()


def _printable(text: str) -> str:
    """``text`` for a message: its printable characters only (no terminal escapes)."""
    return "".join(char for char in text if char.isprintable())


class HostClaim:
    """``<prefix>/<host>/.host-id``: the machine that writes under a host's prefix.

    :meth:`ensure` writes it once (or finds it this machine's) and remembers the outcome for
    the run: a failure (after its retries) is raised again at once rather than retried for
    every backup. :meth:`problem` is the read-only check of prune and forget (one HEAD).
    """

    def __init__(
        self, store: RemoteStore | None, settings: Settings, machine_id: str | None
    ) -> None:
        self.store = store
        self.settings = settings
        self.machine_id = machine_id
        self._claimed = False
        self._error: CloudBackupError | None = None

    def key(self, host: str | None = None) -> str:
        return host_claim_key(self.settings.s3_prefix, host or self.settings.host)

    def ensure(self) -> None:
        """Claim this host's prefix, or raise (PermanentStorageError ``HostClaimed`` when
        another machine holds it, unless the host was given explicitly)."""
        if self._claimed:
            return
        if self._error is not None:
            raise self._error
        try:
            self._claim()
        except CloudBackupError as exc:
            self._error = exc
            raise
        self._claimed = True

    def _claim(self) -> None:
        store, host = self.store, self.settings.host
        assert store is not None and self.machine_id is not None
        key = self.key()
        # Existence by LIST, not HEAD: with a prefix-scoped role, AWS answers a HEAD of a
        # missing key with 403 rather than 404.
        exists = any(obj.key == key for obj in store.list(key))
        head = store.head(key) if exists else None
        if head is None:
            try:
                store.put_bytes(
                    key,
                    (self.machine_id + "\n").encode(),
                    spec=UploadSpec(
                        metadata={"machine-id": self.machine_id, "cloudbackup-version": __version__},
                        tags=[("cloudbackup:host", host), ("cloudbackup:kind", "host-claim")],
                        content_type="text/plain",
                    ),
                )
                LOG.info("claimed %s for this machine", store.describe(key))
            except PermanentStorageError as exc:
                if exc.code != "PreconditionFailed":
                    raise
                head = store.head(key)
        if head is not None:
            owner = self._owner(head)
            if owner != self.machine_id and not self.settings.host_explicit:
                raise PermanentStorageError(
                    f"{store.describe(key)} is claimed by another machine "
                    f"({_printable(owner)[:12]}…), "
                    f"not this one ({self.machine_id[:12]}…): two machines share the host name "
                    f"{host!r}",
                    "set CLOUDBACKUP_HOST to a unique name, or pass --host explicitly on a DR "
                    "machine",
                    code="HostClaimed",
                )

    def _owner(self, head: ObjectHead) -> str:
        """The machine id a claim names: its metadata (S3: one HEAD), else its body."""
        assert self.store is not None
        owner = head.metadata.get("machine-id")
        if owner is None:
            owner = _claim_body(self.store, head.key)
        return owner

    def owner(self, host: str | None = None) -> str | None:
        """The machine id claiming ``host``'s prefix (this host's by default); None when
        it is unclaimed, or when a store that keeps metadata holds a claim without it (not
        one this tool wrote: no GET is spent on it)."""
        assert self.store is not None
        head = self.store.head(self.key(host))
        if head is None or (self.store.keeps_metadata and "machine-id" not in head.metadata):
            return None
        return self._owner(head)

    def problem(self, host: str) -> str | None:
        """Why nothing may be deleted under ``host``'s prefix: claimed by another machine (one
        HEAD on ``.host-id``; its body too where the store keeps no metadata, as a directory
        destination), or the claim cannot be read; None when it is fine."""
        key = self.key(host)
        try:
            owner = self.owner(host)
        except CloudBackupError as exc:
            return f"cannot read the host claim {key}: {exc}"
        if owner is None or owner == self.machine_id:
            return None
        return (
            f"{key} is claimed by another machine ({_printable(owner)[:12]}…), not this one "
            f"({(self.machine_id or '')[:12]}…): two machines share the host name {host!r}; "
            "nothing deleted: set CLOUDBACKUP_HOST to a unique name, or pass --host explicitly "
            "(a DR machine or a central pruner)"
        )


# ---------------------------------------------------------------- the context


@dataclass(frozen=True)
class Context:
    """What every use case needs; built once by the CLI.

    ``machine_id`` is None for commands that neither write backups nor claim a prefix and
    found no id to read (they create none). ``remote`` is the remote store or None.
    """

    settings: Settings
    local: LocalStore
    now: Callable[[], datetime]
    machine_id: str | None = None
    remote: RemoteStore | None = None
    progress: ProgressFactory = no_progress
    local_catalog: LocalCatalog = field(init=False, repr=False, compare=False)
    remote_catalog: RemoteCatalog = field(init=False, repr=False, compare=False)
    host_claim: HostClaim = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived from the stores: a context made with dataclasses.replace gets its own.
        object.__setattr__(
            self,
            "local_catalog",
            LocalCatalog(self.local, self.settings.host, self.settings.s3_prefix),
        )
        object.__setattr__(self, "remote_catalog", RemoteCatalog(self.remote, self.settings))
        object.__setattr__(
            self, "host_claim", HostClaim(self.remote, self.settings, self.machine_id)
        )

    @property
    def host(self) -> str:
        return self.settings.host
