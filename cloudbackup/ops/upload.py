"""``upload``: backups offsite (archive first, checked by HEAD, manifest last), resumed
after an interruption or streamed while the archive is written; stale multipart uploads
cleaned up. The host claim is ``context.HostClaim``'s."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cloudbackup import __version__
from cloudbackup.context import (
    Context,
)
from cloudbackup.core.errors import CloudBackupError, IntegrityError, PermanentStorageError
from cloudbackup.core.model import (
    BackupId,
    BackupRef,
    Manifest,
    UploadRecord,
    format_time,
    key_for,
    manifest_name,
)
from cloudbackup.core.outcome import REPORTED, Outcome
from cloudbackup.storage.base import (
    RemoteStore,
    SentParts,
    UploadOutcome,
    UploadSpec,
    VerifyMethod,
    head_problems,
    hex_to_b64,
)
from cloudbackup.storage.parts import MAX_OBJECT, choose_part_size
from cloudbackup.stream.hashing import ArchiveAbandoned, ArchiveTail

LOG = logging.getLogger("cloudbackup")
STALE_UPLOAD_AGE = timedelta(days=7)


def _prefix(ctx: Context) -> str:
    return ctx.settings.s3_prefix


def object_tags(ctx: Context, source: str, kind: str) -> list[tuple[str, str]]:
    tags = [
        ("cloudbackup:source", source),
        ("cloudbackup:host", ctx.host),
        ("cloudbackup:kind", kind),
    ]
    if kind == "archive":
        tags += list(ctx.settings.s3_tags)
    return tags


def _lock(ctx: Context, created: datetime) -> tuple[str | None, datetime | None]:
    lock = ctx.settings.s3_object_lock
    if lock is None:
        return None, None
    return lock.mode, created.astimezone(UTC) + timedelta(days=lock.days)


def archive_spec(ctx: Context, source: str, created: datetime, sha256: str | None) -> UploadSpec:
    """Metadata, tags, class and lock of an archive object (``sha256`` once it is known)."""
    lock_mode, until = _lock(ctx, created)
    metadata = {"sha256": sha256} if sha256 else {}
    metadata |= {
        "source": source,
        "host": ctx.host,
        "created-at": format_time(created),
        "cloudbackup-version": __version__,
    }
    return UploadSpec(
        metadata=metadata,
        tags=object_tags(ctx, source, "archive"),
        storage_class=ctx.settings.s3_storage_class,
        lock_mode=lock_mode,
        lock_until=until,
    )


def _remote(ctx: Context) -> RemoteStore:
    assert ctx.remote is not None, "an upload needs a context with a remote store"
    return ctx.remote


def _find_in_progress(ctx: Context, key: str) -> str | None:
    uploads = [u for u in _remote(ctx).list_uploads(key) if u.key == key]
    if not uploads:
        return None
    newest = max(uploads, key=lambda u: u.initiated or datetime.min.replace(tzinfo=UTC))
    return newest.upload_id


@dataclass
class UploadResult:
    """One backup uploaded (OK), or not (FAILED, or INTEGRITY when what arrived differs)."""

    id: str
    source: str
    detail: str = ""
    seconds: float = 0.0
    parts_sent: int = 0
    parts_reused: int = 0
    outcome: Outcome = Outcome.FAILED

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "ok": self.ok,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "parts_sent": self.parts_sent,
            "parts_reused": self.parts_reused,
        }


def _in_progress(key: str, upload_id: str, part_size: int) -> UploadRecord:
    return UploadRecord(
        key=key,
        part_size=part_size,
        part_count=0,
        checksum_algorithm="SHA256",
        checksum=None,
        upload_id=upload_id,
    )


def upload_backup(
    ctx: Context, ref: BackupRef, streamed: UploadOutcome | None = None
) -> UploadResult:
    """Upload one complete local backup, resuming an interrupted multipart upload: the
    archive, checked against its manifest (HEAD), then the manifest, last.

    ``streamed`` is the archive upload a :class:`StreamedUpload` already completed: only
    the confirmation and the manifest remain.
    """
    started = time.monotonic()
    result = UploadResult(ref.id, ref.source)
    manifest = ctx.local_catalog.manifest(ref)
    record = ctx.local_catalog.upload_record(ref.id, ref.source)
    if record and record.verified_at:
        result.outcome, result.detail = Outcome.OK, "already verified offsite"
        return result
    ctx.host_claim.ensure()
    _parents_first(ctx, ref, manifest)
    backup_id = BackupId.parse(ref.id)
    key = key_for(_prefix(ctx), ctx.host, backup_id, manifest.archive)
    spec = archive_spec(ctx, manifest.source, manifest.created, manifest.sha256)
    outcome = streamed or _upload_archive(ctx, ref, manifest, key, spec, record)
    result.parts_sent, result.parts_reused = outcome.parts_sent, outcome.parts_reused
    if outcome.part_count == 1 and outcome.checksum is not None:
        # One PUT: the store's SHA-256 is the archive's own digest.
        if outcome.checksum != hex_to_b64(manifest.sha256):
            raise IntegrityError(f"{ref.id}: uploaded checksum differs from the manifest's sha256")
    if outcome.sha256 is not None and outcome.sha256 != manifest.sha256:
        # The store hashed the object as it wrote it (a directory destination).
        raise IntegrityError(
            f"{ref.id}: {_remote(ctx).describe(key)} has sha256 {outcome.sha256}, the manifest "
            f"says {manifest.sha256}"
        )
    upload = UploadRecord(
        key=key,
        part_size=outcome.part_size,
        part_count=outcome.part_count,
        checksum_algorithm="SHA256" if outcome.checksum else None,
        checksum=outcome.checksum,
        etag=outcome.etag,
        uploaded_at=format_time(ctx.now()),
    )
    _confirm_archive(ctx, key, manifest, upload)
    _put_index(ctx, ref, manifest, spec)
    _put_manifest(ctx, ref, manifest, upload, spec)
    upload.verified_at = format_time(ctx.now())
    ctx.local_catalog.write_upload_record(ref.source, ref.id, upload)
    result.outcome = Outcome.OK
    result.detail = (
        f"uploaded {outcome.size} bytes in {outcome.part_count} part(s)"
        + (f", {outcome.parts_reused} reused" if outcome.parts_reused else "")
        + "; verified"
    )
    result.seconds = time.monotonic() - started
    LOG.info("%s: %s", ref.id, result.detail, extra=REPORTED)
    return result


def _parents_first(ctx: Context, ref: BackupRef, manifest: Manifest) -> None:
    """An incremental's manifest goes up only after its parent's: the ancestors not yet
    offsite are uploaded first, oldest first. A parent neither local nor remote fails it."""
    if manifest.parent is None:
        return
    local = ctx.local_catalog.listing(ref.source)
    listed = ctx.remote_catalog.listing_or_empty().for_source(ctx.host, ref.source)
    remote_ids = {r.id for r in listed}
    if manifest.parent in remote_ids:
        return
    if local.find(manifest.parent, ctx.host) is None:
        raise CloudBackupError(
            f"{ref.id}: its parent {manifest.parent} is neither local nor offsite; "
            "it cannot be uploaded",
            "make a full backup (`cloudbackup backup --full`)",
        )
    pending: list[BackupRef] = []
    current = ref
    while current.incremental:
        parent = local.parent_of(current)
        if parent is None or parent.id in remote_ids:
            break
        if ctx.local_catalog.verified_offsite(parent):
            break
        pending.append(parent)
        current = parent
    for parent in reversed(pending):
        LOG.info("%s: uploading its parent %s first", ref.id, parent.id)
        result = upload_backup(ctx, parent)
        if not result.ok:
            raise CloudBackupError(f"{ref.id}: its parent {parent.id} failed to upload")


def _put_index(ctx: Context, ref: BackupRef, manifest: Manifest, spec: UploadSpec) -> None:
    """The index, after the archive and before the manifest (checked against the manifest's
    digest as read: the local dir is untrusted). One already there is left as it is."""
    facts = manifest.index
    if facts is None:
        return
    backup_id = BackupId.parse(ref.id)
    local_key = key_for("", ctx.host, backup_id, facts.name)
    data = ctx.local.get_bytes(local_key)
    if len(data) != facts.size or hashlib.sha256(data).hexdigest() != facts.sha256:
        raise IntegrityError(f"{ref.id}: the local index differs from its manifest")
    key = key_for(_prefix(ctx), ctx.host, backup_id, facts.name)
    try:
        _remote(ctx).put_bytes(
            key,
            data,
            spec=UploadSpec(
                metadata={"sha256": facts.sha256, "source": ref.source, "host": ctx.host},
                tags=object_tags(ctx, ref.source, "index"),
                storage_class="STANDARD",
                content_type="application/octet-stream" if manifest.encrypted else "application/zstd",
                lock_mode=spec.lock_mode,
                lock_until=spec.lock_until,
            ),
        )
    except PermanentStorageError as exc:
        if exc.code != "PreconditionFailed":
            raise
        head = _remote(ctx).head(key)
        if head is None or head.size != facts.size:
            raise IntegrityError(
                f"{_remote(ctx).describe(key)} exists and is another index"
            ) from None


def _upload_archive(
    ctx: Context,
    ref: BackupRef,
    manifest: Manifest,
    key: str,
    spec: UploadSpec,
    record: UploadRecord | None,
) -> UploadOutcome:
    """Send the archive file, resuming the upload its record (or the bucket) names."""
    upload_id = record.upload_id if record else None
    part_size = record.part_size if record and record.upload_id else None
    if upload_id is None:
        # No local record: the part size is inferred from the upload's own first part.
        upload_id = _find_in_progress(ctx, key)
    if upload_id:
        LOG.info("%s: resuming upload %s…", ref.id, upload_id[:12])

    def on_created(new_id: str, size: int) -> None:
        ctx.local_catalog.write_upload_record(ref.source, ref.id, _in_progress(key, new_id, size))

    assert ref.archive_key
    progress = ctx.progress(f"upload {ref.id}", manifest.size)
    with ctx.local.open(ref.archive_key) as archive:  # never through a planted link
        outcome = _remote(ctx).upload_file(
            key,
            archive,
            spec,
            label=str(ctx.local.path(ref.archive_key)),
            upload_id=upload_id,
            part_size=part_size,
            on_created=on_created,
            progress=progress,
        )
    getattr(progress, "close", lambda: None)()
    return outcome


def _put_manifest(
    ctx: Context, ref: BackupRef, manifest: Manifest, upload: UploadRecord, spec: UploadSpec
) -> None:
    """The remote manifest (the local one plus its upload record), never over another one:
    one already there must describe the same archive."""
    backup_id = BackupId.parse(ref.id)
    mkey = key_for(_prefix(ctx), ctx.host, backup_id, manifest_name(backup_id))
    try:
        _remote(ctx).put_bytes(
            mkey,
            dataclasses.replace(manifest, upload=upload).to_json(),
            spec=UploadSpec(
                metadata=manifest_metadata(manifest, upload),
                tags=object_tags(ctx, ref.source, "manifest"),
                storage_class="STANDARD",
                content_type="application/json",
                lock_mode=spec.lock_mode,
                lock_until=spec.lock_until,
            ),
        )
    except PermanentStorageError as exc:
        if exc.code != "PreconditionFailed":
            raise
        remote_ref = BackupRef(
            ref.host,
            ref.source,
            backup_id,
            "remote",
            archive_key=upload.key,
            manifest_key=mkey,
            compression=manifest.compression,
            encrypted=manifest.encrypted,
        )
        existing = ctx.remote_catalog.manifest(remote_ref)
        if existing.sha256 != manifest.sha256:
            raise IntegrityError(
                f"{_remote(ctx).describe(mkey)} exists and describes another archive"
            ) from None


def manifest_metadata(manifest: Manifest, upload: UploadRecord) -> dict[str, str]:
    """The facts remote verify needs, on the manifest object itself: HEAD, no GET."""
    meta = {
        "sha256": manifest.sha256,
        "size": str(manifest.size),
        "source": manifest.source,
        "host": manifest.host,
        "created-at": manifest.created_at,
        "cloudbackup-version": __version__,
        "part-size": str(upload.part_size),
        "part-count": str(upload.part_count),
    }
    if upload.checksum:
        meta["s3-checksum"] = upload.checksum
    return meta


def _confirm_archive(ctx: Context, key: str, manifest: Manifest, upload: UploadRecord) -> None:
    """The object, checked by HEAD: its size, and (S3) its sha256 metadata and checksum. A
    store verified by re-hashing hashed the object as it wrote it (see ``upload_backup``)."""
    remote = _remote(ctx)
    head = remote.head(key)
    if head is None:
        raise IntegrityError(f"{remote.describe(key)} is missing right after upload")
    if remote.verify_method is VerifyMethod.REHASH:
        problems = [] if head.size == manifest.size else [f"size {head.size} ≠ {manifest.size}"]
    else:
        problems = head_problems(head, manifest.size, manifest.sha256, upload.checksum)
    if problems:
        raise IntegrityError(f"{remote.describe(key)}: " + "; ".join(problems))


class StreamedUpload:
    """Sends an archive's parts to S3 while the archive is still being written.

    Backup and upload overlap: each part leaves as soon as it is on disk, so the upload
    ends shortly after the archive does. Nothing is completed before the archive is
    durable and kept (``finish``); a failed or refused archive aborts the upload
    (``abandon``). S3 takes user metadata when a multipart upload is created, before the
    archive's SHA-256 exists, so a streamed archive object carries no ``sha256`` metadata:
    its SHA-256 is in the manifest object (body and metadata), and S3's composite
    checksum, checked by S3 part by part on receipt, is what remote verify compares.
    """

    def __init__(
        self,
        ctx: Context,
        source: str,
        backup_id: BackupId,
        archive_name: str,
        previous: Manifest | None,
    ) -> None:
        self.ctx = ctx
        self.source = source
        self.backup_id = backup_id
        self.key = key_for(_prefix(ctx), ctx.host, backup_id, archive_name)
        # The part size is fixed before the first byte: from the last archive of this
        # source, with room to double (a larger archive falls back to a whole upload).
        estimate = min(2 * previous.size, MAX_OBJECT) if previous else 0
        self.part_size = choose_part_size(estimate, ctx.settings.s3_part_size)
        self.spec = archive_spec(ctx, source, backup_id.created_at, None)
        self.tail = ArchiveTail()
        self.sent: SentParts | None = None
        self.upload_id: str | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stream-upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        progress = self.ctx.progress(f"upload {self.backup_id}", None)
        try:
            self.sent = _remote(self.ctx).upload_growing(
                self.key, self.tail, self.spec, self.part_size, on_created=self._created,
                progress=progress,
            )
        except ArchiveAbandoned:
            pass
        except BaseException as exc:  # surfaced by finish()
            self.error = exc
        finally:
            getattr(progress, "close", lambda: None)()

    def _created(self, upload_id: str, part_size: int) -> None:
        self.upload_id = upload_id
        self.ctx.local_catalog.write_upload_record(
            self.source,
            str(self.backup_id),
            _in_progress(self.key, upload_id, part_size),
        )

    def _discard(self) -> None:
        if self.upload_id is not None:
            try:
                _remote(self.ctx).abort(self.key, self.upload_id)
            except CloudBackupError as exc:
                # The record stays: the next run aborts (or replaces) the upload it names.
                LOG.warning("cannot abort the streamed upload of %s: %s", self.key, exc)
                return
        self.ctx.local_catalog.remove_upload_record(self.source, str(self.backup_id))

    def abandon(self) -> None:
        self.tail.fail()
        self._thread.join()
        self.tail.close()
        self._discard()

    def finish(self) -> UploadOutcome | None:
        """Send the last parts and complete the upload; ``None`` leaves the archive to the
        regular upload: it fit in one part (one PUT, with ``sha256`` metadata), outgrew
        10,000 parts, or the stream failed (its parts are resumed, not sent again)."""
        self._thread.join()
        size = self.tail.size
        self.tail.close()
        if self.error is not None:
            error = self.error
            if isinstance(error, PermanentStorageError) and error.code == "TooManyParts":
                LOG.info("%s: %s; uploading it whole instead", self.backup_id, self.error)
                self._discard()
            else:
                LOG.warning(
                    "%s: the streamed upload stopped (%s); finishing it from the local archive",
                    self.backup_id,
                    self.error,
                )
            return None
        if self.sent is None or size is None:
            return None
        return _remote(self.ctx).complete_parts(
            self.key, self.sent, size, self.part_size, self.spec
        )


def start_stream(
    ctx: Context,
    source: str,
    backup_id: BackupId,
    archive_name: str,
    previous: Manifest | None,
) -> StreamedUpload | None:
    """The streamer ``backup`` and ``run`` use unless ``CLOUDBACKUP_S3_UPLOAD=after``.

    Not with ``CLOUDBACKUP_S3_COMPAT`` (no checksums there: the ``sha256`` metadata is the
    only record S3 keeps). A prefix that cannot be claimed is left to the regular upload,
    which reports it.
    """
    if ctx.remote is None or ctx.settings.s3_upload != "stream" or ctx.settings.s3_compat:
        return None
    try:
        ctx.host_claim.ensure()
    except CloudBackupError as exc:
        LOG.debug("not streaming %s: %s", backup_id, exc)
        return None
    return StreamedUpload(ctx, source, backup_id, archive_name, previous)


class Abandonable(Protocol):
    """An upload that followed an archive while it was written (a :class:`StreamedUpload`)."""

    def abandon(self) -> None: ...


def upload_after_backup(
    ctx: Context, source: str, backup_id: str, stream: Abandonable | None
) -> UploadResult | None:
    """The uploader ``backup`` calls right after a source's archive is complete: finishes
    the ``stream`` that followed it (if any), then uploads what is left. A failure is a
    result (the local archive is kept), not an exception; ``None``: no such local backup."""
    try:
        ref = ctx.local_catalog.listing(source).find(backup_id, ctx.host)
        if ref is None:
            return None
        streamed = None
        if isinstance(stream, StreamedUpload):
            # Finished (or failed finishing): either way the stream is done with.
            current, stream = stream, None
            streamed = current.finish()
        return upload_backup(ctx, ref, streamed)
    except (CloudBackupError, OSError) as exc:
        reason = str(exc) if isinstance(exc, CloudBackupError) else (exc.strerror or str(exc))
        detail = f"upload failed: {reason} (the local archive is kept; run `cloudbackup upload`)"
        LOG.error("%s: %s", backup_id, detail, extra=REPORTED)
        outcome = Outcome.INTEGRITY if isinstance(exc, IntegrityError) else Outcome.FAILED
        return UploadResult(backup_id, source, detail, outcome=outcome)
    finally:
        if stream is not None:  # never reached finish: leave nothing in progress behind
            stream.abandon()


def pending_uploads(ctx: Context, source: str | None = None) -> list[BackupRef]:
    refs = []
    for ref in ctx.local_catalog.listing().refs:
        if ref.host != ctx.host or (source and ref.source != source):
            continue
        if not ctx.local_catalog.verified_offsite(ref):
            refs.append(ref)
    LOG.debug("not yet verified offsite: %s", ", ".join(r.id for r in refs) or "none")
    return refs


def upload_pending(ctx: Context, source: str | None = None) -> list[UploadResult]:
    results = []
    for ref in pending_uploads(ctx, source):
        try:
            results.append(upload_backup(ctx, ref))
        except CloudBackupError as exc:
            outcome = exc.outcome if exc.outcome is Outcome.INTEGRITY else Outcome.FAILED
            results.append(UploadResult(ref.id, ref.source, str(exc), outcome=outcome))
            LOG.error("%s: upload failed: %s", ref.id, exc, extra=REPORTED)
            if isinstance(exc, PermanentStorageError) and exc.code in (
                "AccessDenied",
                "NoSuchBucket",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "ExpiredToken",
                "RequestExpired",
                "RequestTimeTooSkewed",
                "NoCredentials",
                "HostClaimed",
                "NoSuchDestination",
                "NotFollowed",
                "NoSpace",
            ):
                break  # the same for every backup: say it once
    return results


def abort_stale_uploads(ctx: Context) -> list[str]:
    """Abort this host's multipart uploads older than 7 days with no local archive to resume."""
    prefix = "/".join([p for p in _prefix(ctx).split("/") if p] + [ctx.host]) + "/"
    local_keys = set()
    for ref in ctx.local_catalog.listing().refs:
        if ref.host == ctx.host and ref.archive_key:
            local_keys.add(
                key_for(_prefix(ctx), ctx.host, ref.backup_id, ref.archive_key.rsplit("/", 1)[-1])
            )
    aborted = []
    now = ctx.now()
    remote = _remote(ctx)
    for upload in remote.list_uploads(prefix):
        initiated = upload.initiated
        if upload.key in local_keys or initiated is None or now - initiated < STALE_UPLOAD_AGE:
            continue
        remote.abort(upload.key, upload.upload_id)
        aborted.append(upload.key)
        LOG.info(
            "aborted a stale multipart upload of %s (started %s)",
            upload.key,
            format_time(initiated),
        )
    return aborted


