"""S3 (and S3-compatible) store: the only module that imports boto3.

It owns the resumable multipart loop (create / list_parts / upload_part with a SHA-256
checksum / complete with ``If-None-Match: *``), metadata, tags, SSE, storage class and
Object Lock, and maps botocore errors to transient or permanent ones. Each API call goes
through ``self.retrying`` so the retry wrapper sees, logs and counts every attempt.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    NotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from cloudbackup.storage.base import (
    GrowingFile,
    ObjectHead,
    ObjectInfo,
    SentParts,
    UploadOutcome,
    UploadSpec,
    checksums_match,
)

__all__ = ["S3Store", "SentParts", "UploadOutcome", "UploadSpec", "checksums_match"]

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")

MIN_PART = 5 * 1024**2
DEFAULT_PART = 8 * 1024**2  # as the AWS CLI; parts in flight are held in memory
MIN_CHOSEN_PART = 8 * 1024**2
MAX_PART = 5 * 1024**3
MAX_PARTS = 10_000
MAX_OBJECT = 5 * 1024**4  # S3's documented limit for one object

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
    "OperationAborted",
    "503",
    "500",
    "502",
    "504",
}
_PERMANENT_HINTS = {
    "AccessDenied": "the credentials lack the permission; check the IAM role (see `cloudbackup iam render`)",
    "AllAccessDisabled": "access to the bucket is disabled",
    "NoSuchBucket": "check CLOUDBACKUP_S3_BUCKET and the region/endpoint",
    "InvalidAccessKeyId": "check the AWS access key (environment, profile or instance role)",
    "SignatureDoesNotMatch": "check the AWS secret key",
    "ExpiredToken": "the credentials expired; refresh them and run `cloudbackup upload` to resume",
    "RequestExpired": "the credentials expired; refresh them and run `cloudbackup upload` to resume",
    "TokenRefreshRequired": "refresh the credentials and run `cloudbackup upload` to resume",
    "RequestTimeTooSkewed": "fix the clock (NTP): S3 refuses requests from a skewed clock",
    "InvalidBucketName": "check CLOUDBACKUP_S3_BUCKET",
    "PermanentRedirect": "the bucket is in another region; set AWS_DEFAULT_REGION",
    "AuthorizationHeaderMalformed": "the bucket is in another region; set AWS_DEFAULT_REGION",
    "InvalidRequest": "the store rejected the request (an S3-compatible store? try CLOUDBACKUP_S3_COMPAT=1)",
    "NotImplemented": "the store does not support this feature; try CLOUDBACKUP_S3_COMPAT=1",
    "InvalidStorageClass": "choose another CLOUDBACKUP_S3_STORAGE_CLASS",
    "KMS.AccessDeniedException": "the credentials may not use the KMS key",
}


def sha256_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def hex_to_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def composite_checksum(part_checksums_b64: list[str]) -> str:
    """AWS's multipart SHA-256: the SHA-256 of the concatenated part digests, ``-N``."""
    joined = b"".join(base64.b64decode(c) for c in part_checksums_b64)
    return f"{sha256_b64(joined)}-{len(part_checksums_b64)}"


def choose_part_size(size: int, preferred: int | None = None) -> int:
    """At least 8 MiB (or ``preferred``, never below 5 MiB), and large enough for 10,000 parts."""
    if size > MAX_OBJECT:
        raise PermanentStorageError(
            f"an archive of {size} bytes exceeds S3's 5 TiB limit for one object",
            "split the source into several smaller sources",
        )
    part = max(preferred or DEFAULT_PART, MIN_PART)
    if preferred is None:
        part = max(part, MIN_CHOSEN_PART)
    needed = -(-size // MAX_PARTS) if size else MIN_PART
    if needed > part:
        # Round up to a whole MiB so the value reads well in manifests.
        part = -(-needed // (1024**2)) * 1024**2
    if part > MAX_PART:
        raise PermanentStorageError(f"an archive of {size} bytes exceeds S3's 10,000 × 5 GiB limit")
    return part


def classify(exc: BaseException, what: str, bucket: str) -> CloudBackupError:
    """Map a botocore exception to a transient or permanent error with a clear message."""
    if isinstance(exc, CloudBackupError):
        return exc
    if isinstance(exc, bexc.FlexibleChecksumError):
        return IntegrityError(
            f"s3://{bucket}: {what}: the downloaded data fails its checksum ({exc})"
        )
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(
            error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or ""
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"s3://{bucket}: {what}: not found", code=code)
        if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500) or status == 429:
            return TransientStorageError(f"s3://{bucket}: {what}: {code} {message}".strip())
        hint = _PERMANENT_HINTS.get(code)
        if code == "403" and not hint:
            hint = _PERMANENT_HINTS["AccessDenied"]
            code = "AccessDenied"
        return PermanentStorageError(
            f"s3://{bucket}: {what}: {code} {message}".strip(), hint, code=code
        )
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return PermanentStorageError(
            f"s3://{bucket}: {what}: no AWS credentials found",
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or use an instance role",
            code="NoCredentials",
        )
    if isinstance(
        exc,
        bexc.ConnectionError
        | bexc.HTTPClientError  # resets, closed connections, read timeouts, proxy errors
        | bexc.ResponseStreamingError
        | bexc.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    ):
        return TransientStorageError(f"s3://{bucket}: {what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bexc.BotoCoreError):
        return PermanentStorageError(f"s3://{bucket}: {what}: {exc}")
    return StorageError(f"s3://{bucket}: {what}: {type(exc).__name__}: {exc}")


class S3Store:
    where = "remote"

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        compat: bool = False,
        sse: str | None = None,
        kms_key_id: str | None = None,
        concurrency: int = 4,
        part_size: int | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.compat = compat
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.concurrency = concurrency
        self.part_size = part_size
        self.retrying: Callable[[str, Callable[[], Any]], Any] = lambda what, fn: fn()

    @classmethod
    def from_settings(cls, settings: Any) -> S3Store:
        return cls(
            make_client(
                endpoint_url=settings.s3_endpoint_url,
                compat=settings.s3_compat,
                addressing=settings.s3_addressing,
                max_pool=max(settings.s3_concurrency * 2, 10),
            ),
            settings.s3_bucket,
            compat=settings.s3_compat,
            sse=settings.s3_sse,
            kms_key_id=settings.s3_kms_key_id,
            concurrency=settings.s3_concurrency,
            part_size=settings.s3_part_size,
        )

    # -- plumbing

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        def attempt() -> T:
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                raise classify(exc, what, self.bucket) from exc

        return self.retrying(what, attempt)  # type: ignore[no-any-return]

    def _sse_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
            if self.kms_key_id:
                args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def _write_args(self, spec: UploadSpec) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": spec.metadata, "ContentType": spec.content_type}
        args.update(self._sse_args())
        if spec.storage_class and spec.storage_class != "STANDARD":
            args["StorageClass"] = spec.storage_class
        if spec.tags and not self.compat:
            args["Tagging"] = urlencode(spec.tags)
        if spec.lock_mode and spec.lock_until:
            args["ObjectLockMode"] = spec.lock_mode
            args["ObjectLockRetainUntilDate"] = spec.lock_until
        return args

    # -- Store protocol

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"list {prefix or '/'}", self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], item["Size"], item["LastModified"], item.get("ETag"))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def head(self, key: str) -> ObjectHead | None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if not self.compat:
            kwargs["ChecksumMode"] = "ENABLED"
        try:
            resp = self._call(f"head {key}", self.client.head_object, **kwargs)
        except NotFound:
            return None
        return ObjectHead(
            key=key,
            size=resp["ContentLength"],
            metadata=dict(resp.get("Metadata", {})),
            checksum_sha256=resp.get("ChecksumSHA256"),
            checksum_type=resp.get("ChecksumType"),
            etag=resp.get("ETag"),
            storage_class=resp.get("StorageClass", "STANDARD"),
            parts_count=resp.get("PartsCount"),
            lock_until=resp.get("ObjectLockRetainUntilDate"),
        )

    def open(self, key: str, *, checksum: bool = False) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if checksum and not self.compat:
            kwargs["ChecksumMode"] = "ENABLED"
        resp = self._call(f"get {key}", self.client.get_object, **kwargs)
        return _ClassifyingBody(resp["Body"], f"get {key}", self.bucket)

    def open_range(self, key: str, start: int, end: int) -> bytes:
        """One ranged GET, body included in the retried attempt (a reset mid-body retries)."""
        what = f"get {key} bytes {start}-{end}"

        def attempt() -> bytes:
            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}"
                )
                return resp["Body"].read()  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001
                raise classify(exc, what, self.bucket) from exc

        return self.retrying(what, attempt)  # type: ignore[no-any-return]

    def get_bytes(self, key: str) -> bytes:
        def attempt() -> bytes:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key)
                return resp["Body"].read()  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001
                raise classify(exc, f"get {key}", self.bucket) from exc

        return self.retrying(f"get {key}", attempt)  # type: ignore[no-any-return]

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        kind: str = "manifest",
        spec: UploadSpec | None = None,
        overwrite: bool = False,
    ) -> None:
        spec = spec or UploadSpec(content_type="application/json")
        args = self._write_args(spec)
        if not overwrite:
            args["IfNoneMatch"] = "*"
        if not self.compat:
            args["ChecksumSHA256"] = sha256_b64(data)
            args["ChecksumAlgorithm"] = "SHA256"
        self._call(
            f"put {key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **args
        )

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    # -- multipart

    def list_uploads(self, prefix: str) -> builtins.list[dict[str, Any]]:
        uploads: builtins.list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._call(
                f"list uploads {prefix}", self.client.list_multipart_uploads, **kwargs
            )
            uploads.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def abort(self, key: str, upload_id: str) -> None:
        try:
            self._call(
                f"abort upload {key}",
                self.client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
            )
        except NotFound:
            pass
        except PermanentStorageError as exc:
            if exc.code != "NoSuchUpload":
                raise

    def probe_write(self, key: str, spec: UploadSpec | None = None) -> builtins.list[str]:
        """Prove write access without leaving an object: create, then abort an upload.

        The probe carries what a real upload sends (checksum algorithm, tags, storage class,
        SSE). When the store rejects that, the bare request is tried too, so the caller can
        say which features the endpoint refused. Returns the refused feature names.
        """
        full = self._write_args(spec or UploadSpec())
        if not self.compat:
            full["ChecksumAlgorithm"] = "SHA256"

        def create_and_abort(args: dict[str, Any]) -> None:
            resp = self._call(
                f"create upload {key}",
                self.client.create_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                **args,
            )
            self.abort(key, resp["UploadId"])

        try:
            create_and_abort(full)
            return []
        except PermanentStorageError as exc:
            if exc.code in (
                "AccessDenied",
                "NoSuchBucket",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
            ):
                raise
            LOG.debug("the store refused the full probe: %s", exc)
        create_and_abort(self._sse_args())
        return [name for name in ("ChecksumAlgorithm", "Tagging", "StorageClass") if name in full]

    def _list_parts(self, key: str, upload_id: str) -> dict[int, dict[str, Any]]:
        parts: dict[int, dict[str, Any]] = {}
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        while True:
            page = self._call(f"list parts {key}", self.client.list_parts, **kwargs)
            for part in page.get("Parts", []):
                parts[part["PartNumber"]] = part
            if not page.get("IsTruncated"):
                return parts
            kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]

    # Long: the resumable upload's one place (resume, part size, one PUT or parts, complete).
    def upload_file(
        self,
        key: str,
        path: Path,
        spec: UploadSpec,
        *,
        upload_id: str | None = None,
        part_size: int | None = None,
        on_created: Callable[[str, int], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> UploadOutcome:
        """Upload ``path`` to ``key``: one PUT when small, else resumable parallel multipart.

        ``upload_id``/``part_size`` resume an interrupted upload (only parts whose checksum
        matches the local bytes are reused); ``on_created`` is told a new upload's id and
        part size before any part is sent, so a crash can be resumed. An error leaves the
        multipart upload in place (expired credentials, a kill): the next run resumes it.
        """
        size = path.stat().st_size
        existing: dict[int, dict[str, Any]] = {}
        if upload_id is not None:
            try:
                existing = self._list_parts(key, upload_id)
            except PermanentStorageError as exc:
                if exc.code not in ("NoSuchUpload", "NoSuchKey", "404", "NotFound"):
                    raise
                # Gone: completed by a run that died before recording it, or aborted.
                present = self._already_present(
                    key, path, size, part_size or choose_part_size(size, self.part_size), spec
                )
                if present is not None:
                    LOG.info("%s is already complete in S3; not sending it again", key)
                    if progress:
                        progress(size)
                    return present
                LOG.info("upload %s of %s is gone; starting over", upload_id[:12], key)
                upload_id, existing = None, {}
        if part_size is None and 1 in existing:
            part_size = int(existing[1]["Size"])  # an upload found without its local record
        part_size = part_size or choose_part_size(size, self.part_size)
        if upload_id is not None and -(-size // part_size) > MAX_PARTS:
            # A streamed upload sized its parts from an estimate the archive outgrew: its
            # parts cannot make this archive. Start over with parts that fit.
            LOG.info(
                "upload %s of %s has %d-byte parts, too small for %d bytes; starting over",
                upload_id[:12],
                key,
                part_size,
                size,
            )
            self._abort_quietly(key, upload_id)
            upload_id, existing = None, {}
            part_size = choose_part_size(size, self.part_size)
        if size <= part_size and upload_id is None:
            return self._put_small(key, path, size, spec, part_size, progress)
        part_count = max(1, -(-size // part_size))
        if part_count > MAX_PARTS:
            raise PermanentStorageError(
                f"{path} needs {part_count} parts of {part_size} bytes; S3 allows 10,000"
            )
        if upload_id is None:
            upload_id = self._create_upload(key, spec)
            if on_created:
                on_created(upload_id, part_size)
        assert upload_id is not None
        ranges = (
            (n, (n - 1) * part_size, min(part_size, size - (n - 1) * part_size))
            for n in range(1, part_count + 1)
        )
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # never a planted link
        try:
            sent = self._send_parts(
                key,
                upload_id,
                fd,
                ranges,
                existing,
                progress,
                total_label=f"/{part_count}",
                file_label=str(path),
            )
        finally:
            os.close(fd)
        return self.complete_parts(key, sent, size, part_size, spec)

    def upload_growing(
        self,
        key: str,
        tail: GrowingFile,
        spec: UploadSpec,
        part_size: int,
        *,
        on_created: Callable[[str, int], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SentParts | None:
        """Send the parts of a file that is still being written, each once it exists.

        The multipart upload is created only when the file outgrows one part: a smaller
        file returns ``None`` (the caller PUTs it whole, once complete). Completing is left
        to :meth:`complete_parts`, so the caller decides whether the file is kept. A file
        that would need part 10,001 raises PermanentStorageError (code ``TooManyParts``)
        before sending it; the upload is left for the caller to abort.
        """
        # One byte more than a part: a file of exactly one part is one PUT.
        written, final = tail.wait_for(part_size + 1)
        if final is not None and final <= part_size:
            return None
        upload_id = self._create_upload(key, spec)
        if on_created:
            on_created(upload_id, part_size)

        def ranges(written: int) -> Iterator[tuple[int, int, int]]:
            number, offset = 1, 0  # part 1 is there already
            while True:
                if number > MAX_PARTS:
                    raise PermanentStorageError(
                        f"{key} outgrew {MAX_PARTS} parts of {part_size} bytes while streaming",
                        code="TooManyParts",
                    )
                yield number, offset, min(part_size, written - offset)
                number, offset = number + 1, offset + part_size
                written, final = tail.wait_for(offset + part_size)
                if final is not None and final <= offset:
                    return

        assert tail.fd is not None  # open since the first byte was written
        return self._send_parts(
            key, upload_id, tail.fd, ranges(written), {}, progress, total_label="", file_label=key
        )

    def _create_upload(self, key: str, spec: UploadSpec) -> str:
        args = self._write_args(spec)
        if not self.compat:
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumType"] = "COMPOSITE"
        resp = self._call(
            f"create upload {key}",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            **args,
        )
        return str(resp["UploadId"])

    # Long: the parallel parts loop keeps its state (sent, reused, in flight) in one frame.
    def _send_parts(
        self,
        key: str,
        upload_id: str,
        fd: int,
        ranges: Iterator[tuple[int, int, int]],
        existing: dict[int, dict[str, Any]],
        progress: Callable[[int], None] | None,
        *,
        total_label: str,
        file_label: str,
    ) -> SentParts:
        """Send ``(number, offset, length)`` ranges of ``fd``, ``concurrency`` at a time.

        ``total_label`` follows the part number in messages (``"/12"``, or ``""`` while the
        count is unknown); ``file_label`` names the local file in a short-read error.

        Memory stays bounded: each running worker reads and holds one part; at most
        2×concurrency part numbers are queued (no data). ``ranges`` may block (a growing file). The first error stops the
        queue; it is the one raised. A part already in ``existing`` is kept when it provably
        holds the same bytes.
        """
        sent = SentParts(upload_id)
        lock = threading.Lock()

        def reusable(previous: dict[str, Any] | None, data: bytes, checksum: str) -> bool:
            """A part already in S3 is kept only when it provably holds these bytes."""
            if previous is None or previous.get("Size") != len(data):
                return False
            if previous.get("ChecksumSHA256"):
                return bool(previous["ChecksumSHA256"] == checksum)
            if self.sse == "aws:kms":  # the ETag is not the MD5 of the data then
                return False
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            return bool(previous.get("ETag", "").strip('"') == md5)

        def send(number: int, offset: int, length: int) -> None:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise IntegrityError(f"{file_label} changed while uploading (short read)")
            checksum = sha256_b64(data)
            previous = existing.get(number)
            if reusable(previous, data, checksum):
                assert previous is not None
                with lock:
                    sent.reused += 1
                    sent.checksums[number] = checksum
                    sent.etags[number] = previous["ETag"]
                if progress:
                    progress(len(data))
                return
            args: dict[str, Any] = {}
            if not self.compat:
                args = {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": checksum}
            resp = self._call(
                f"upload part {number}{total_label} of {key}",
                self.client.upload_part,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                **args,
            )
            returned = resp.get("ChecksumSHA256")
            if returned and returned != checksum:
                raise IntegrityError(
                    f"S3 stored part {number} of {key} with checksum {returned}, sent {checksum}"
                )
            with lock:
                sent.checksums[number] = checksum
                sent.etags[number] = resp["ETag"]
            if progress:
                progress(len(data))

        errors: builtins.list[BaseException] = []

        def guarded(number: int, offset: int, length: int) -> None:
            if errors:  # an earlier part failed: send nothing more
                return
            try:
                send(number, offset, length)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="upload") as pool:
            pending: set[Future[None]] = set()
            try:
                for number, offset, length in ranges:
                    while len(pending) >= self.concurrency * 2 and not errors:
                        _, pending = wait(pending, return_when=FIRST_COMPLETED)
                    if errors:
                        break
                    pending.add(pool.submit(guarded, number, offset, length))
                    sent.count = number
                while pending and not errors:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
            finally:
                for future in pending:
                    future.cancel()
        if errors:
            raise errors[0]
        return sent

    def complete_parts(
        self, key: str, sent: SentParts, size: int, part_size: int, spec: UploadSpec
    ) -> UploadOutcome:
        """Complete a multipart upload with ``If-None-Match: *``; accept an object that is
        already there only when it is provably these bytes."""
        numbers = range(1, sent.count + 1)
        parts = []
        for number in numbers:
            part: dict[str, Any] = {"PartNumber": number, "ETag": sent.etags[number]}
            if not self.compat:
                part["ChecksumSHA256"] = sent.checksums[number]
            parts.append(part)
        expected = composite_checksum([sent.checksums[n] for n in numbers])
        try:
            resp = self._call(
                f"complete upload {key}",
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=sent.upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
            etag = resp.get("ETag")
        except PermanentStorageError as exc:
            # NoSuchUpload: a retried Complete whose first attempt succeeded (the response was
            # lost). PreconditionFailed: the object exists already. Either way, accept what is
            # there only when it is provably these bytes.
            if exc.code not in ("NoSuchUpload", "PreconditionFailed"):
                raise
            head = self.head(key)
            if not self._same_object(head, size, expected, spec):
                raise self._differs(key) from None
            assert head is not None
            etag = head.etag
            if exc.code == "PreconditionFailed":
                self._abort_quietly(key, sent.upload_id)
        return UploadOutcome(
            key=key,
            size=size,
            part_size=part_size,
            part_count=sent.count,
            checksum=None if self.compat else expected,
            etag=etag,
            upload_id=sent.upload_id,
            parts_reused=sent.reused,
            parts_sent=sent.count - sent.reused,
        )

    def _same_object(
        self, head: ObjectHead | None, size: int, checksum: str, spec: UploadSpec
    ) -> bool:
        """Is the object S3 holds the one we meant to write (size and SHA-256)?"""
        if head is None or head.size != size:
            return False
        if head.checksum_sha256:
            return checksums_match(checksum, head.checksum_sha256)
        # Without checksums (CLOUDBACKUP_S3_COMPAT) the archive's sha256 metadata must match.
        ours = spec.metadata.get("sha256")
        return bool(self.compat and ours and head.metadata.get("sha256") == ours)

    def _differs(self, key: str) -> PermanentStorageError:
        return PermanentStorageError(
            f"s3://{self.bucket}/{key} already exists and differs from the local archive",
            "a different object was written there; investigate before deleting anything",
            code="PreconditionFailed",
        )

    def _abort_quietly(self, key: str, upload_id: str) -> None:
        try:
            self.abort(key, upload_id)
        except CloudBackupError as exc:
            LOG.warning("cannot abort the leftover upload of %s: %s", key, exc)

    def _already_present(
        self, key: str, path: Path, size: int, part_size: int, spec: UploadSpec
    ) -> UploadOutcome | None:
        """The object exists and holds exactly the local bytes (same parts): say so."""
        head = self.head(key)
        if head is None or head.size != size:
            return None
        part_count = max(1, -(-size // part_size))
        digests = []
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as handle:
            for _ in range(part_count):
                digests.append(sha256_b64(handle.read(part_size)))
        expected = composite_checksum(digests)
        if not self._same_object(head, size, expected, spec):
            return None
        return UploadOutcome(
            key=key,
            size=size,
            part_size=part_size,
            part_count=part_count,
            checksum=None if self.compat else expected,
            etag=head.etag,
            parts_reused=part_count,
            already_present=True,
        )

    def _put_small(
        self,
        key: str,
        path: Path,
        size: int,
        spec: UploadSpec,
        part_size: int,
        progress: Callable[[int], None] | None,
    ) -> UploadOutcome:
        data = path.read_bytes()
        checksum = sha256_b64(data)
        etag = None
        try:
            self.put_bytes(key, data, spec=spec)
        except PermanentStorageError as exc:
            # A retried PUT whose first attempt succeeded, or an object already there.
            if exc.code != "PreconditionFailed":
                raise
            head = self.head(key)
            if not self._same_object(head, size, checksum, spec):
                raise self._differs(key) from None
            assert head is not None
            etag = head.etag
        if progress:
            progress(size)
        return UploadOutcome(key, size, part_size, 1, None if self.compat else checksum, etag)


class _ClassifyingBody:
    """A streaming GET body whose read errors become our error types."""

    def __init__(self, body: Any, what: str, bucket: str) -> None:
        self.body, self.what, self.bucket = body, what, bucket

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(size if size >= 0 else None)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, self.what, self.bucket) from exc

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _ClassifyingBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_client(
    *, endpoint_url: str | None, compat: bool, addressing: str = "auto", max_pool: int = 10
) -> Any:
    """botocore's own retries are off: the retry wrapper owns every retry (see README)."""
    s3_config: dict[str, Any] = {}
    if addressing != "auto":
        s3_config["addressing_style"] = addressing
    elif endpoint_url:
        s3_config["addressing_style"] = "path"
    if not compat:
        # Object data always travels with a signed x-amz-checksum-sha256 that S3 verifies,
        # so SigV4 need not hash every body a second time (botocore already skips it over
        # HTTPS; this extends that to http:// endpoints such as a local MinIO). The archive
        # is then hashed once per part, not twice; _confirm_archive checks the result.
        s3_config["payload_signing_enabled"] = False
    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=max_pool,
        s3=s3_config,
        request_checksum_calculation="when_required" if compat else "when_supported",
        response_checksum_validation="when_required" if compat else "when_supported",
    )
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    return session.client("s3", endpoint_url=endpoint_url, config=config, region_name=region)


def lock_until(created_at: datetime, days: int) -> datetime:
    return created_at.astimezone(UTC) + timedelta(days=days)
