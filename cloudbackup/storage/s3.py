"""S3 (and S3-compatible) store: the only module that imports botocore (boto3's client
layer: boto3 itself, with s3transfer, would add ~55 ms to every command's start).

It gives the multipart primitives (create / list_parts / upload_part with a SHA-256
checksum / complete with ``If-None-Match: *``) that ``parts.MultipartStore`` drives,
metadata, tags, SSE, storage class and Object Lock, streaming GETs that resume mid-body
(one stream, or parallel ranged GETs), and maps botocore errors to transient or permanent
ones. Every API call goes through the store's :class:`RetryPolicy`, which sees, logs and
counts every attempt.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode

import botocore.exceptions as bexc
import botocore.session
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
    ObjectHead,
    ObjectInfo,
    PartInfo,
    ReadStream,
    SentParts,
    UploadInfo,
    UploadSpec,
    VerifyMethod,
    WriteProbe,
    checksums_match,
    sha256_b64,
)
from cloudbackup.storage.parts import MultipartStore
from cloudbackup.storage.retry import ResumingReader, RetryPolicy, without_query

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")

#: ``CLOUDBACKUP_S3_DOWNLOAD=ranged``: objects above this size are read in parallel ranges.
RANGED_MIN_SIZE = 64 * 1024**2
RANGED_PART_SIZE = 8 * 1024**2

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
        # botocore names the endpoint URL, query string included (upload ids, signatures).
        return TransientStorageError(
            without_query(f"s3://{bucket}: {what}: {type(exc).__name__}: {exc}")
        )
    if isinstance(exc, bexc.BotoCoreError):
        return PermanentStorageError(without_query(f"s3://{bucket}: {what}: {exc}"))
    return StorageError(without_query(f"s3://{bucket}: {what}: {type(exc).__name__}: {exc}"))


class S3Store(MultipartStore):
    """A bucket (``CLOUDBACKUP_S3_BUCKET``): the reference remote store."""

    where = "remote"
    verify_method = VerifyMethod.HEAD
    keeps_metadata = True
    list_page_size = 1000  # S3's largest LIST page: one request per 1,000 objects

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        policy: RetryPolicy | None = None,
        compat: bool = False,
        sse: str | None = None,
        kms_key_id: str | None = None,
        concurrency: int = 4,
        part_size: int | None = None,
        download: str = "single",
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.policy = policy or RetryPolicy()
        self.compat = compat
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.concurrency = concurrency
        self.part_size = part_size
        self.download = download

    @classmethod
    def from_settings(cls, settings: Any, policy: RetryPolicy) -> S3Store:
        return cls(
            make_client(
                endpoint_url=settings.s3_endpoint_url,
                compat=settings.s3_compat,
                addressing=settings.s3_addressing,
                max_pool=max(settings.s3_concurrency * 2, 10),
            ),
            settings.s3_bucket,
            policy=policy,
            compat=settings.s3_compat,
            sse=settings.s3_sse,
            kms_key_id=settings.s3_kms_key_id,
            concurrency=settings.s3_concurrency,
            part_size=settings.s3_part_size,
            download=settings.s3_download,
        )

    # -- plumbing

    def _raw(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """One attempt of one API call, its errors classified."""
        try:
            return fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified
            raise classify(exc, what, self.bucket) from exc

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """One API call under the retry policy."""
        return self.policy.call(what, lambda: self._raw(what, fn, **kwargs))

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

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- objects

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": self.list_page_size,
            }
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

    def open(self, key: str, *, size: int | None = None) -> ReadStream:
        """One streamed GET that resumes mid-body (a ranged GET from the offset reached,
        ``If-Match`` the first response's ETag); with ``CLOUDBACKUP_S3_DOWNLOAD=ranged`` an
        object of known ``size`` over ``RANGED_MIN_SIZE`` is read in parallel ranges."""
        if (
            self.download == "ranged"
            and self.concurrency > 1
            and size is not None
            and size > RANGED_MIN_SIZE
        ):
            return _RangedReader(self, key, size, RANGED_PART_SIZE, self.concurrency)
        what = f"get {key}"
        first: dict[str, Any] = {}

        def opener(offset: int) -> _ClassifyingBody | _EmptyBody:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if offset:
                if offset >= first["ContentLength"]:
                    return _EmptyBody()
                kwargs["Range"] = f"bytes={offset}-"
                if first.get("ETag"):
                    kwargs["IfMatch"] = first["ETag"]  # the same object, or PreconditionFailed
            resp = self._raw(what, self.client.get_object, **kwargs)
            if not offset:
                first.update(resp)
            return _ClassifyingBody(resp["Body"], what, self.bucket)

        return ResumingReader(opener, self.policy, what)

    def _get_range(self, key: str, start: int, end: int) -> bytes:
        """One ranged GET, body included in the retried attempt (a reset mid-body retries)."""
        what = f"get {key} bytes {start}-{end}"

        def attempt() -> bytes:
            resp = self._raw(
                what,
                self.client.get_object,
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{end}",
            )
            return _ClassifyingBody(resp["Body"], what, self.bucket).read()

        data = self.policy.call(what, attempt)
        if len(data) != end - start + 1:
            raise IntegrityError(
                f"{self.describe(key)}: the ranged GET of bytes {start}-{end} returned "
                f"{len(data)} bytes"
            )
        return data

    def get_bytes(self, key: str) -> bytes:
        def attempt() -> bytes:
            resp = self._raw(f"get {key}", self.client.get_object, Bucket=self.bucket, Key=key)
            return _ClassifyingBody(resp["Body"], f"get {key}", self.bucket).read()

        return self.policy.call(f"get {key}", attempt)

    def put_bytes(self, key: str, data: bytes, *, spec: UploadSpec | None = None) -> None:
        self._put_whole(key, data, spec or UploadSpec(content_type="application/json"))

    def _put_whole(self, key: str, data: bytes, spec: UploadSpec) -> str | None:
        args = self._write_args(spec)
        args["IfNoneMatch"] = "*"
        if not self.compat:
            args["ChecksumSHA256"] = sha256_b64(data)
            args["ChecksumAlgorithm"] = "SHA256"
        resp = self._call(
            f"put {key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **args
        )
        return resp.get("ETag")

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    # -- multipart

    def create_upload(self, key: str, spec: UploadSpec) -> str:
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

    def list_uploads(self, prefix: str) -> builtins.list[UploadInfo]:
        uploads: builtins.list[UploadInfo] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._call(
                f"list uploads {prefix}", self.client.list_multipart_uploads, **kwargs
            )
            for upload in page.get("Uploads", []):
                uploads.append(
                    UploadInfo(upload["Key"], str(upload["UploadId"]), upload.get("Initiated"))
                )
            if not page.get("IsTruncated"):
                return uploads
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def list_parts(self, key: str, upload_id: str) -> builtins.list[PartInfo]:
        parts: builtins.list[PartInfo] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        while True:
            page = self._call(f"list parts {key}", self.client.list_parts, **kwargs)
            for part in page.get("Parts", []):
                parts.append(
                    PartInfo(
                        number=int(part["PartNumber"]),
                        size=int(part["Size"]),
                        checksum_sha256=part.get("ChecksumSHA256"),
                        etag=part.get("ETag"),
                    )
                )
            if not page.get("IsTruncated"):
                return parts
            kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]

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

    def probe_write(self, key: str, spec: UploadSpec) -> WriteProbe:
        """Prove write access without leaving an object: create, then abort an upload.

        The probe carries what a real upload sends (checksum algorithm, tags, storage class,
        SSE). When the store rejects that, the bare request is tried too, so the caller can
        say which features the endpoint refused.
        """
        full = self._write_args(spec)
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

        how = "multipart upload created and aborted"
        features = "tagging, SHA-256 checksums" if not self.compat else "compat mode"
        try:
            create_and_abort(full)
            return WriteProbe(how, accepted=f"{features}, {spec.storage_class}")
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
        refused = tuple(n for n in ("ChecksumAlgorithm", "Tagging", "StorageClass") if n in full)
        return WriteProbe(how, refused=refused)

    def _put_part(
        self, key: str, upload_id: str, number: int, data: bytes, checksum: str, label: str
    ) -> str:
        args: dict[str, Any] = {}
        if not self.compat:
            args = {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": checksum}
        resp = self._call(
            f"upload {label}",
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
        return str(resp["ETag"])

    def _complete(self, key: str, sent: SentParts) -> tuple[str | None, str | None]:
        parts = []
        for number in range(1, sent.count + 1):
            part: dict[str, Any] = {"PartNumber": number, "ETag": sent.etags[number]}
            if not self.compat:
                part["ChecksumSHA256"] = sent.checksums[number]
            parts.append(part)
        resp = self._call(
            f"complete upload {key}",
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=sent.upload_id,
            MultipartUpload={"Parts": parts},
            IfNoneMatch="*",
        )
        return resp.get("ETag"), None

    def _records_checksums(self) -> bool:
        return not self.compat

    def _reusable(self, previous: PartInfo, data: bytes, checksum: str) -> bool:
        if previous.size != len(data):
            return False
        if previous.checksum_sha256:
            return previous.checksum_sha256 == checksum
        if self.sse == "aws:kms":  # the ETag is not the MD5 of the data then
            return False
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return (previous.etag or "").strip('"') == md5

    def _holds(
        self, head: ObjectHead, size: int, checksum: str, part_size: int, spec: UploadSpec
    ) -> bool:
        """Is the object S3 holds the one we meant to write (size and SHA-256)?"""
        if head.size != size:
            return False
        if head.checksum_sha256:
            return checksums_match(checksum, head.checksum_sha256)
        # Without checksums (CLOUDBACKUP_S3_COMPAT) the archive's sha256 metadata must match.
        ours = spec.metadata.get("sha256")
        return bool(self.compat and ours and head.metadata.get("sha256") == ours)


class _ClassifyingBody:
    """A streaming GET body whose read errors become our error types."""

    def __init__(self, body: Any, what: str, bucket: str) -> None:
        self.body, self.what, self.bucket = body, what, bucket

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self.body.read(size if size >= 0 else None)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001
            raise classify(exc, self.what, self.bucket) from exc

    def close(self) -> None:
        self.body.close()


class _EmptyBody:
    """What is left of an object read to its end."""

    def read(self, size: int = -1, /) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _RangedReader:
    """An object read as parallel ranged GETs, served in order as one stream: at most
    ``2 × workers`` ranges are fetched or waiting (bounded memory); each range is one
    retried attempt, body included."""

    def __init__(self, store: S3Store, key: str, size: int, part_size: int, workers: int) -> None:
        self.store, self.key, self.size, self.part_size = store, key, size, part_size
        self.window = max(2 * workers, 2)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
        self.pending: deque[Future[bytes]] = deque()
        self.next_start = 0
        self.buffer = memoryview(b"")
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.window and self.next_start < self.size:
            start = self.next_start
            end = min(start + self.part_size, self.size) - 1
            self.pending.append(self.pool.submit(self.store._get_range, self.key, start, end))
            self.next_start = end + 1

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            chunks = []
            while chunk := self.read(self.part_size):
                chunks.append(chunk)
            return b"".join(chunks)
        if not self.buffer:
            if not self.pending:
                return b""
            data = self.pending.popleft().result()
            self._fill()
            self.buffer = memoryview(data)
        part, self.buffer = self.buffer[:size], self.buffer[size:]
        return bytes(part)

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> _RangedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def make_client(
    *, endpoint_url: str | None, compat: bool, addressing: str = "auto", max_pool: int = 10
) -> Any:
    """botocore's own retries are off: the store's retry policy owns every retry (see
    README)."""
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
    session = botocore.session.get_session()
    region = session.get_config_variable("region") or "us-east-1"
    return session.create_client("s3", endpoint_url=endpoint_url, config=config, region_name=region)
