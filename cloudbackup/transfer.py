"""Offsite: upload backups (archive first, manifest last), claim the host prefix, verify
remote copies without downloading, and clean up stale multipart uploads."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudbackup import __version__
from cloudbackup.errors import (
    CloudBackupError,
    IntegrityError,
    PermanentStorageError,
)
from cloudbackup.model import (
    HOST_CLAIM,
    BackupId,
    BackupRef,
    Manifest,
    UploadRecord,
    format_time,
    key_for,
    manifest_name,
)
from cloudbackup.operations import (
    Context,
    SourceResult,
    VerifyResult,
    read_local_manifest,
    read_upload_record,
    write_upload_record,
)
from cloudbackup.storage.s3 import (
    UploadSpec,
    checksums_match,
    hex_to_b64,
    lock_until,
)

LOG = logging.getLogger("cloudbackup")
STALE_UPLOAD_AGE = timedelta(days=7)


def _prefix(ctx: Context) -> str:
    return ctx.settings.s3_prefix


def host_claim_key(ctx: Context, host: str | None = None) -> str:
    parts = [p for p in _prefix(ctx).split("/") if p] + [host or ctx.host, HOST_CLAIM]
    return "/".join(parts)


def claim_host(ctx: Context) -> None:
    """Write ``<prefix>/<host>/.host-id`` once; refuse a prefix another machine claimed."""
    if getattr(ctx, "_claimed", False):
        return
    key = host_claim_key(ctx)
    # Existence by LIST, not HEAD: with a prefix-scoped role, AWS answers a HEAD of a missing
    # key with 403 rather than 404.
    exists = any(obj.key == key for obj in ctx.remote.list(key))
    head = ctx.remote.head(key) if exists else None
    if head is None:
        try:
            ctx.remote.put_bytes(
                key,
                (ctx.machine_id + "\n").encode(),
                spec=UploadSpec(
                    metadata={"machine-id": ctx.machine_id, "cloudbackup-version": __version__},
                    tags=[("cloudbackup:host", ctx.host), ("cloudbackup:kind", "host-claim")],
                    content_type="text/plain",
                ),
            )
            LOG.info("claimed s3://%s/%s for this machine", ctx.remote.bucket, key)
        except PermanentStorageError as exc:
            if exc.code != "PreconditionFailed":
                raise
            head = ctx.remote.head(key)
    if head is not None:
        owner = head.metadata.get("machine-id")
        if owner is None:
            owner = ctx.remote.get_bytes(key).decode(errors="replace").strip()
        if owner != ctx.machine_id and not ctx.settings.host_explicit:
            raise PermanentStorageError(
                f"s3://{ctx.remote.bucket}/{key} is claimed by another machine ({owner[:12]}…), "
                f"not this one ({ctx.machine_id[:12]}…): two machines share the host name {ctx.host!r}",
                "set CLOUDBACKUP_HOST to a unique name, or pass --host explicitly on a DR machine",
                code="HostClaimed",
            )
    ctx._claimed = True  # type: ignore[attr-defined]


def object_tags(ctx: Context, source: str, kind: str) -> list[tuple[str, str]]:
    tags = [
        ("cloudbackup:source", source),
        ("cloudbackup:host", ctx.host),
        ("cloudbackup:kind", kind),
    ]
    if kind == "archive":
        tags += list(ctx.settings.s3_tags)
    return tags


def _lock(ctx: Context, manifest: Manifest) -> tuple[str | None, datetime | None]:
    lock = ctx.settings.s3_object_lock
    if lock is None:
        return None, None
    return lock.mode, lock_until(manifest.created, lock.days)


def _find_in_progress(ctx: Context, key: str) -> str | None:
    uploads = [u for u in ctx.remote.list_uploads(key) if u.get("Key") == key]
    if not uploads:
        return None
    newest = max(uploads, key=lambda u: u.get("Initiated") or datetime.min.replace(tzinfo=UTC))
    return str(newest["UploadId"])


@dataclass
class UploadResult:
    id: str
    source: str
    ok: bool
    detail: str
    seconds: float = 0.0
    parts_sent: int = 0
    parts_reused: int = 0
    exit_code: int = 0

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


def upload_backup(ctx: Context, ref: BackupRef) -> UploadResult:
    """Upload one complete local backup, resuming an interrupted multipart upload."""
    started = time.monotonic()
    result = UploadResult(ref.id, ref.source, False, "")
    manifest = read_local_manifest(ctx, ref)
    record = read_upload_record(ctx, ref.id, ref.source)
    if record and record.verified_at:
        result.ok, result.detail = True, "already verified offsite"
        return result
    claim_host(ctx)
    backup_id = BackupId.parse(ref.id)
    assert ref.archive_key
    path = ctx.local.path(ref.archive_key)
    key = key_for(_prefix(ctx), ctx.host, backup_id, manifest.archive)
    upload_id = record.upload_id if record else None
    part_size = record.part_size if record and record.upload_id else None
    if upload_id is None:
        # No local record: the part size is inferred from the upload's own first part.
        upload_id = _find_in_progress(ctx, key)
    if upload_id:
        LOG.info("%s: resuming upload %s…", ref.id, upload_id[:12])
    lock_mode, until = _lock(ctx, manifest)
    spec = UploadSpec(
        metadata={
            "sha256": manifest.sha256,
            "source": manifest.source,
            "host": manifest.host,
            "created-at": manifest.created_at,
            "cloudbackup-version": __version__,
        },
        tags=object_tags(ctx, ref.source, "archive"),
        storage_class=ctx.settings.s3_storage_class,
        lock_mode=lock_mode,
        lock_until=until,
    )

    def on_created(new_id: str, size: int) -> None:
        write_upload_record(
            ctx,
            ref.source,
            ref.id,
            UploadRecord(
                key=key,
                part_size=size,
                part_count=0,
                checksum_algorithm="SHA256",
                checksum=None,
                upload_id=new_id,
            ),
        )

    progress = ctx.progress(f"upload {ref.id}", manifest.size)
    outcome = ctx.remote.upload_file(
        key,
        path,
        spec,
        upload_id=upload_id,
        part_size=part_size,
        on_created=on_created,
        progress=progress,
    )
    getattr(progress, "close", lambda: None)()
    result.parts_sent, result.parts_reused = outcome.parts_sent, outcome.parts_reused
    if outcome.part_count == 1 and outcome.checksum is not None:
        # One PUT: S3's SHA-256 is the archive's own digest.
        if outcome.checksum != hex_to_b64(manifest.sha256):
            raise IntegrityError(f"{ref.id}: uploaded checksum differs from the manifest's sha256")
    upload = UploadRecord(
        key=key,
        part_size=outcome.part_size,
        part_count=outcome.part_count,
        checksum_algorithm=None if ctx.settings.s3_compat else "SHA256",
        checksum=outcome.checksum,
        etag=outcome.etag,
        uploaded_at=format_time(ctx.now()),
    )
    _confirm_archive(ctx, key, manifest, upload)
    remote_manifest = Manifest.from_json(manifest.to_json())
    remote_manifest.upload = upload
    mkey = key_for(_prefix(ctx), ctx.host, backup_id, manifest_name(backup_id))
    body = remote_manifest.to_json()
    try:
        ctx.remote.put_bytes(
            mkey,
            body,
            spec=UploadSpec(
                metadata=manifest_metadata(manifest, upload),
                tags=object_tags(ctx, ref.source, "manifest"),
                storage_class="STANDARD",
                content_type="application/json",
                lock_mode=lock_mode,
                lock_until=until,
            ),
        )
    except PermanentStorageError as exc:
        if exc.code != "PreconditionFailed":
            raise
        existing = Manifest.from_json(ctx.remote.get_bytes(mkey))
        if existing.sha256 != manifest.sha256:
            raise IntegrityError(
                f"s3 manifest {mkey} exists and describes another archive"
            ) from None
    upload.verified_at = format_time(ctx.now())
    write_upload_record(ctx, ref.source, ref.id, upload)
    result.ok = True
    result.detail = (
        f"uploaded {outcome.size} bytes in {outcome.part_count} part(s)"
        + (f", {outcome.parts_reused} reused" if outcome.parts_reused else "")
        + "; verified"
    )
    result.seconds = time.monotonic() - started
    LOG.info("%s: %s", ref.id, result.detail)
    return result


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
    head = ctx.remote.head(key)
    if head is None:
        raise IntegrityError(f"s3://{ctx.remote.bucket}/{key} is missing right after upload")
    problems = _compare(head, manifest.size, manifest.sha256, upload.checksum)
    if problems:
        raise IntegrityError(f"s3://{ctx.remote.bucket}/{key}: " + "; ".join(problems))


def _compare(head: Any, size: int, sha256: str, checksum: str | None) -> list[str]:
    problems = []
    if head.size != size:
        problems.append(f"size {head.size} ≠ {size}")
    if head.metadata.get("sha256") != sha256:
        problems.append(f"sha256 metadata {head.metadata.get('sha256')} ≠ {sha256}")
    if checksum and head.checksum_sha256 and not checksums_match(checksum, head.checksum_sha256):
        problems.append(f"S3 checksum {head.checksum_sha256} ≠ expected {checksum}")
    if checksum and not head.checksum_sha256:
        problems.append("S3 reports no SHA-256 checksum for the object")
    return problems


def upload_after_backup(ctx: Context, result: SourceResult) -> None:
    """Called by ``backup`` right after a source's archive is complete."""
    assert result.id
    listing = ctx.local_listing(result.source)
    ref = listing.find(result.id, ctx.host)
    if ref is None:
        return
    try:
        up = upload_backup(ctx, ref)
        result.uploaded = up.ok
    except CloudBackupError as exc:
        result.error = f"upload failed: {exc} (the local archive is kept; run `cloudbackup upload`)"
        result.ok = False  # the backup's offsite half failed: never summarised as a success
        result.exit_code = max(result.exit_code, 3 if isinstance(exc, IntegrityError) else 1)
        LOG.error("%s: %s", ref.id, result.error)


def pending_uploads(ctx: Context, source: str | None = None) -> list[BackupRef]:
    refs = []
    for ref in ctx.local_listing().refs:
        if ref.host != ctx.host or (source and ref.source != source):
            continue
        record = read_upload_record(ctx, ref.id, ref.source)
        if record and record.verified_at:
            continue
        refs.append(ref)
    return refs


def upload_pending(ctx: Context, source: str | None = None) -> list[UploadResult]:
    results = []
    for ref in pending_uploads(ctx, source):
        try:
            results.append(upload_backup(ctx, ref))
        except CloudBackupError as exc:
            code = 3 if isinstance(exc, IntegrityError) else 1
            results.append(UploadResult(ref.id, ref.source, False, str(exc), exit_code=code))
            LOG.error("%s: upload failed: %s", ref.id, exc)
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
            ):
                break  # the same for every backup: say it once
    return results


def abort_stale_uploads(ctx: Context) -> list[str]:
    """Abort this host's multipart uploads older than 7 days with no local archive to resume."""
    prefix = "/".join([p for p in _prefix(ctx).split("/") if p] + [ctx.host]) + "/"
    local_keys = set()
    for ref in ctx.local_listing().refs:
        if ref.host == ctx.host and ref.archive_key:
            local_keys.add(
                key_for(_prefix(ctx), ctx.host, ref.backup_id, ref.archive_key.rsplit("/", 1)[-1])
            )
    aborted = []
    now = ctx.now()
    for upload in ctx.remote.list_uploads(prefix):
        initiated = upload.get("Initiated")
        if upload["Key"] in local_keys or initiated is None or now - initiated < STALE_UPLOAD_AGE:
            continue
        ctx.remote.abort(upload["Key"], upload["UploadId"])
        aborted.append(upload["Key"])
        LOG.info(
            "aborted a stale multipart upload of %s (started %s)",
            upload["Key"],
            format_time(initiated),
        )
    return aborted


def verify_remote_ref(ctx: Context, ref: BackupRef, *, deep: bool = False) -> VerifyResult:
    """HEAD the manifest and the archive (no GET); ``deep`` streams and walks the archive."""
    from cloudbackup.archive import HashingReader, open_decompressed, walk_archive

    result = VerifyResult(ref.id, "remote", False, "", ref.host, ref.source)
    try:
        assert ref.manifest_key and ref.archive_key
        mhead = ctx.remote.head(ref.manifest_key)
        if mhead is None:
            result.detail = "manifest object is missing"
            return result
        meta = mhead.metadata
        if "sha256" not in meta or "size" not in meta:
            manifest = Manifest.from_json(ctx.remote.get_bytes(ref.manifest_key))
            upload = manifest.upload
            sha256, size = manifest.sha256, manifest.size
            checksum = upload.checksum if upload else None
        else:
            sha256, size, checksum = meta["sha256"], int(meta["size"]), meta.get("s3-checksum")
        head = ctx.remote.head(ref.archive_key)
        if head is None:
            result.detail = "archive object is missing"
            return result
        problems = _compare(head, size, sha256, checksum)
        if problems:
            result.detail = "; ".join(problems)
            return result
        detail = f"size, sha256 metadata and S3 checksum match ({size} bytes)"
        if deep:
            manifest = Manifest.from_json(ctx.remote.get_bytes(ref.manifest_key))
            progress = ctx.progress(f"verify {ref.id}", size)
            corrupt: IntegrityError | None = None
            with ctx.remote.open(ref.archive_key) as body:
                hashing = HashingReader(body, progress)
                try:
                    walked = walk_archive(open_decompressed(hashing, manifest.compression))
                except IntegrityError as exc:
                    corrupt = exc  # report the checksum first: it says the bytes changed
                hashing.drain()
            getattr(progress, "close", lambda: None)()
            if hashing.count != size or hashing.sha.hexdigest() != sha256:
                result.detail = f"downloaded sha256 {hashing.sha.hexdigest()} ({hashing.count} bytes) ≠ manifest {sha256}"
                return result
            if corrupt is not None:
                raise corrupt
            if (walked.file_count, walked.uncompressed_bytes) != (
                manifest.file_count,
                manifest.uncompressed_bytes,
            ):
                result.detail = (
                    f"archive holds {walked.file_count} files / {walked.uncompressed_bytes} bytes, "
                    f"manifest says {manifest.file_count} / {manifest.uncompressed_bytes}"
                )
                return result
            detail = f"streamed and re-hashed {size} bytes; {walked.file_count} files, {walked.uncompressed_bytes} bytes walked"
        result.ok = True
        result.detail = detail
    except IntegrityError as exc:
        result.detail = str(exc)
    except CloudBackupError as exc:
        result.detail = f"cannot verify: {exc}"
    return result
