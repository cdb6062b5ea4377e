"""S3Store and its RetryPolicy without a server: error taxonomy, part sizes, composite checksums,
exact call sequences (botocore's Stubber) and resume against moto in-process."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions as bexc
import pytest
from botocore.stub import Stubber

from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    NotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from cloudbackup.storage.base import (
    UploadOutcome,
    UploadSpec,
    checksums_match,
    composite_checksum,
    sha256_b64,
)
from cloudbackup.storage.parts import MAX_PARTS, choose_part_size
from cloudbackup.storage.retry import RetryPolicy
from cloudbackup.storage.s3 import S3Store, classify, make_client
from tests.conftest import fake_aws_credentials
from tests.s3_helpers import Sleeps

BUCKET = "unit-bucket"
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


@pytest.fixture(autouse=True)
def _fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_aws_credentials(monkeypatch)


def send(store: S3Store, key: str, path: Path, spec: UploadSpec, **kwargs: Any) -> UploadOutcome:
    """``upload_file`` of the file at ``path`` (stores take an open file)."""
    with path.open("rb") as file:
        return store.upload_file(key, file, spec, **kwargs)


def client_error(code: str, status: int, message: str = "") -> bexc.ClientError:
    return bexc.ClientError(
        {
            "Error": {"Code": code, "Message": message or code},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


# ---------------------------------------------------------------- part sizes and checksums


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 100 * MiB, 10 * GiB, 80 * GiB])
def test_default_part_size_is_at_least_8mib_and_fits_10000_parts(size: int) -> None:
    part = choose_part_size(size)
    assert part >= 8 * MiB
    assert -(-size // part) <= MAX_PARTS


def test_part_size_grows_in_whole_mib_for_huge_archives() -> None:
    size = 400 * GiB
    part = choose_part_size(size)
    assert part % MiB == 0
    assert part * MAX_PARTS >= size
    assert (part - MiB) * MAX_PARTS < size  # the smallest whole MiB that fits


def test_preferred_part_size_is_honoured_but_never_below_5mib() -> None:
    assert choose_part_size(100 * MiB, 5 * MiB) == 5 * MiB
    assert choose_part_size(100 * MiB, 1 * MiB) == 5 * MiB
    assert choose_part_size(100 * MiB, 64 * MiB) == 64 * MiB
    # ...unless it cannot fit 10,000 parts.
    assert choose_part_size(100 * GiB, 5 * MiB) * MAX_PARTS >= 100 * GiB


def test_archives_beyond_the_s3_object_limit_are_refused() -> None:
    assert choose_part_size(5 * TiB) <= 5 * GiB
    with pytest.raises(PermanentStorageError, match="5 TiB"):
        choose_part_size(5 * TiB + 1)


def test_composite_checksum_follows_the_documented_algorithm() -> None:
    # AWS: base64(sha256(digest(part 1) || digest(part 2) || ...)) + "-" + number of parts.
    parts = [b"a" * 5 * MiB, b"b" * 5 * MiB, b"tail"]
    digests = [hashlib.sha256(p).digest() for p in parts]
    expected = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode() + "-3"
    assert composite_checksum([sha256_b64(p) for p in parts]) == expected
    # One part is still a composite of one digest, not the digest itself.
    single = composite_checksum([sha256_b64(b"x")])
    assert single.endswith("-1")
    assert single.split("-")[0] != sha256_b64(b"x")


def test_checksums_match_tolerates_a_missing_part_suffix_only() -> None:
    value = composite_checksum([sha256_b64(b"1"), sha256_b64(b"2")])
    bare = value.split("-")[0]
    assert checksums_match(value, value)
    assert checksums_match(value, bare)  # moto (and some stores) omit "-N"
    assert not checksums_match(value, bare + "-3")
    assert not checksums_match(value, sha256_b64(b"other"))
    assert not checksums_match(value, None)
    assert not checksums_match(None, value)


# ---------------------------------------------------------------- error taxonomy


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("ServiceUnavailable", 503),
        ("InternalError", 500),
        ("RequestTimeout", 400),
        ("Throttling", 400),
        ("TooManyRequests", 429),
        ("BadGateway", 502),
    ],
)
def test_throttling_and_server_errors_are_transient(code: str, status: int) -> None:
    err = classify(client_error(code, status), "put k", BUCKET)
    assert isinstance(err, TransientStorageError)
    assert BUCKET in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        bexc.ConnectionClosedError(endpoint_url="http://x"),
        bexc.EndpointConnectionError(endpoint_url="http://x"),
        bexc.ReadTimeoutError(endpoint_url="http://x"),
        bexc.ConnectTimeoutError(endpoint_url="http://x"),
        bexc.HTTPClientError(error="boom"),
        bexc.ResponseStreamingError(error="reset"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
    ],
)
def test_resets_and_timeouts_are_transient(exc: Exception) -> None:
    assert isinstance(classify(exc, "put k", BUCKET), TransientStorageError)


@pytest.mark.parametrize(
    ("code", "status", "hint"),
    [
        ("AccessDenied", 403, "IAM"),
        ("403", 403, "IAM"),  # a HEAD has no body: only the status
        ("NoSuchBucket", 404, "CLOUDBACKUP_S3_BUCKET"),
        ("InvalidAccessKeyId", 403, "access key"),
        ("SignatureDoesNotMatch", 403, "secret key"),
        ("ExpiredToken", 400, "resume"),
        ("RequestTimeTooSkewed", 403, "fix the clock"),
    ],
)
def test_permanent_errors_name_the_bucket_and_what_to_do(code: str, status: int, hint: str) -> None:
    err = classify(client_error(code, status), "put k", BUCKET)
    assert isinstance(err, PermanentStorageError)
    assert not isinstance(err, NotFound)
    assert BUCKET in str(err)
    assert hint in str(err)
    assert "\n" not in str(err)


def test_missing_objects_are_not_found() -> None:
    assert isinstance(classify(client_error("NoSuchKey", 404), "get k", BUCKET), NotFound)
    assert isinstance(classify(client_error("404", 404), "head k", BUCKET), NotFound)


def test_a_checksum_failure_on_download_is_an_integrity_error() -> None:
    exc = bexc.FlexibleChecksumError(error_msg="Expected checksum X did not match calculated Y")
    err = classify(exc, "get k", BUCKET)
    assert isinstance(err, IntegrityError)
    assert err.exit_code == 3


def test_missing_credentials_are_permanent() -> None:
    err = classify(bexc.NoCredentialsError(), "list /", BUCKET)
    assert isinstance(err, PermanentStorageError)
    assert "AWS_ACCESS_KEY_ID" in str(err)


def test_our_own_errors_pass_through() -> None:
    mine = IntegrityError("x")
    assert classify(mine, "get k", BUCKET) is mine
    assert isinstance(classify(ValueError("odd"), "get k", BUCKET), StorageError)


# ---------------------------------------------------------------- the retry wrapper


class Flaky:
    """An operation that fails with the given errors first."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    def op(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_transient_errors_are_retried_with_each_attempt_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sleeps = Sleeps()
    flaky = Flaky(TransientStorageError("slow down"), TransientStorageError("reset"))
    policy = RetryPolicy(attempts=5, base=0.5, cap=30, sleep=sleeps)
    with caplog.at_level(logging.WARNING, logger="cloudbackup"):
        assert policy.call("op thing", flaky.op) == "done"
    assert flaky.calls == 3
    assert len(sleeps.waits) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one line per retry
    assert "op thing failed (attempt 1 of 5): slow down; retrying " in messages[0]
    assert "op thing failed (attempt 2 of 5): reset; retrying " in messages[1]
    # Full jitter: each wait is within [0, base × 2^attempt].
    assert 0 <= sleeps.waits[0] <= 1.0 and 0 <= sleeps.waits[1] <= 2.0


def test_waits_grow_exponentially_up_to_the_cap() -> None:
    sleeps = Sleeps()
    flaky = Flaky(*[TransientStorageError("503")] * 9)
    assert RetryPolicy(attempts=10, base=1.0, cap=4.0, sleep=sleeps).call("op", flaky.op) == "done"
    assert len(sleeps.waits) == 9
    assert max(sleeps.waits) <= 4.0


def test_retries_stop_after_the_configured_attempts() -> None:
    sleeps = Sleeps()
    flaky = Flaky(*[TransientStorageError("s3://b: put k: SlowDown")] * 10)
    with pytest.raises(TransientStorageError, match="gave up after 3 attempts"):
        RetryPolicy(attempts=3, sleep=sleeps).call("op", flaky.op)
    assert flaky.calls == 3
    assert len(sleeps.waits) == 2


@pytest.mark.parametrize(
    "error",
    [
        PermanentStorageError("denied", code="AccessDenied"),
        IntegrityError("checksum mismatch"),
        NotFound("gone"),
    ],
)
def test_permanent_and_integrity_errors_are_not_retried(error: CloudBackupError) -> None:
    sleeps = Sleeps()
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        RetryPolicy(sleep=sleeps).call("op", flaky.op)
    assert flaky.calls == 1
    assert sleeps.waits == []


def test_a_retry_line_never_shows_a_query_string_nor_a_wait_of_zero(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore names the endpoint URL with its query (an upload id, a signature); and full
    jitter can draw a wait that rounds to 0.0s: neither reaches the log."""
    monkeypatch.setattr("random.uniform", lambda low, high: 0.0004)
    url = "http://127.0.0.1:9/b/k?uploadId=SECRETID&partNumber=3&X-Amz-Signature=abc"
    flaky = Flaky(TransientStorageError(f"reset (endpoint {url})"))
    with caplog.at_level(logging.WARNING, logger="cloudbackup"):
        RetryPolicy(sleep=Sleeps()).call(f"upload part 3 of {url}", flaky.op)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "SECRETID" not in line and "Signature" not in line and "?…" in line
    assert "0.0s" not in line and line.endswith("retrying at once")


def test_botocore_errors_lose_their_query_string_when_classified() -> None:
    exc = bexc.ConnectionClosedError(endpoint_url="http://x/b/k?uploadId=SECRETID&partNumber=2")
    err = classify(exc, "upload part 2 of k", BUCKET)
    assert isinstance(err, TransientStorageError)
    assert "SECRETID" not in str(err) and "http://x/b/k?…" in str(err)


def test_botocore_retries_are_off_so_the_policy_sees_every_attempt() -> None:
    client = make_client(endpoint_url="http://127.0.0.1:9", compat=False)
    assert client.meta.config.retries["total_max_attempts"] == 1
    # And the store calls the policy it was given.
    policy = RetryPolicy(attempts=7)
    assert S3Store(client, BUCKET, policy=policy).policy is policy


# ---------------------------------------------------------------- exact call sequences (Stubber)


class Calls:
    """Records the operation name of every call a client makes (stubbed or not)."""

    def __init__(self, client: Any) -> None:
        self.names: list[str] = []
        client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, model: Any, **kwargs: Any) -> None:
        self.names.append(model.name)


@pytest.fixture
def stubbed() -> Iterator[tuple[S3Store, Stubber, Calls, Sleeps]]:
    client = make_client(endpoint_url="http://127.0.0.1:9", compat=False)
    sleeps = Sleeps()
    policy = RetryPolicy(attempts=5, sleep=sleeps)
    store = S3Store(client, BUCKET, policy=policy, concurrency=1, part_size=5 * MiB)
    calls = Calls(client)
    with Stubber(client) as stubber:
        yield store, stubber, calls, sleeps


def archive(tmp_path: Path, size: int, seed: int = 1) -> Path:
    path = tmp_path / "a.tar.zst"
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    data = (block * (size // len(block) + 1))[:size]
    # Make every part different so a reused part cannot match by accident.
    mixed = bytearray(data)
    for offset in range(0, size, 5 * MiB):
        mixed[offset : offset + 8] = offset.to_bytes(8, "big")
    path.write_bytes(bytes(mixed))
    return path


def parts_of(path: Path, part_size: int = 5 * MiB) -> list[bytes]:
    return parts_of_bytes(path.read_bytes(), part_size)


def test_resume_lists_parts_before_uploading_and_reuses_only_matching_ones(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, _ = stubbed
    path = archive(tmp_path, 12 * MiB)
    p1, p2, p3 = parts_of(path)
    stubber.add_response(
        "list_parts",
        {
            "Parts": [
                {
                    "PartNumber": 1,
                    "Size": len(p1),
                    "ETag": '"e1"',
                    "ChecksumSHA256": sha256_b64(p1),
                },
                # Part 2 was sent from other bytes (the archive changed?): it must be re-sent.
                {
                    "PartNumber": 2,
                    "Size": len(p2),
                    "ETag": '"e2"',
                    "ChecksumSHA256": sha256_b64(b"x"),
                },
            ],
            "IsTruncated": False,
        },
        {"Bucket": BUCKET, "Key": "k", "UploadId": "up-1"},
    )
    for number, body in ((2, p2), (3, p3)):
        stubber.add_response(
            "upload_part",
            {"ETag": f'"n{number}"', "ChecksumSHA256": sha256_b64(body)},
            {
                "Bucket": BUCKET,
                "Key": "k",
                "UploadId": "up-1",
                "PartNumber": number,
                "Body": body,
                "ChecksumAlgorithm": "SHA256",
                "ChecksumSHA256": sha256_b64(body),
            },
        )
    expected = composite_checksum([sha256_b64(p) for p in (p1, p2, p3)])
    stubber.add_response(
        "complete_multipart_upload",
        {"ETag": '"final-3"', "ChecksumSHA256": expected},
        {
            "Bucket": BUCKET,
            "Key": "k",
            "UploadId": "up-1",
            "IfNoneMatch": "*",
            "MultipartUpload": {
                "Parts": [
                    {"PartNumber": 1, "ETag": '"e1"', "ChecksumSHA256": sha256_b64(p1)},
                    {"PartNumber": 2, "ETag": '"n2"', "ChecksumSHA256": sha256_b64(p2)},
                    {"PartNumber": 3, "ETag": '"n3"', "ChecksumSHA256": sha256_b64(p3)},
                ]
            },
        },
    )
    outcome = send(store, k := "k", path, UploadSpec(), upload_id="up-1", part_size=5 * MiB)
    assert k == outcome.key
    assert calls.names == ["ListParts", "UploadPart", "UploadPart", "CompleteMultipartUpload"]
    assert (outcome.parts_reused, outcome.parts_sent, outcome.part_count) == (1, 2, 3)
    assert outcome.checksum == expected
    stubber.assert_no_pending_responses()


def test_a_new_multipart_upload_announces_its_id_before_any_part(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, _ = stubbed
    path = archive(tmp_path, 6 * MiB)
    spec = UploadSpec(metadata={"sha256": "ab"}, tags=[("cloudbackup:kind", "archive")])
    stubber.add_response(
        "create_multipart_upload",
        {"UploadId": "up-2"},
        {
            "Bucket": BUCKET,
            "Key": "k",
            "Metadata": {"sha256": "ab"},
            "ContentType": "application/octet-stream",
            "Tagging": "cloudbackup%3Akind=archive",
            "ChecksumAlgorithm": "SHA256",
            "ChecksumType": "COMPOSITE",
        },
    )
    announced: list[tuple[str, int]] = []

    def on_created(upload_id: str, part_size: int) -> None:
        announced.append((upload_id, part_size))
        assert calls.names == ["CreateMultipartUpload"]  # no part sent yet

    for _ in range(2):
        stubber.add_response("upload_part", {"ETag": '"e"'}, None)
    stubber.add_response("complete_multipart_upload", {"ETag": '"f"'}, None)
    send(store, "k", path, spec, on_created=on_created)
    assert announced == [("up-2", 5 * MiB)]
    stubber.assert_no_pending_responses()


def test_access_denied_is_not_retried(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, sleeps = stubbed
    stubber.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(PermanentStorageError) as caught:
        store.put_bytes("k", b"{}")
    assert caught.value.code == "AccessDenied"
    assert f"s3://{BUCKET}" in str(caught.value)
    assert calls.names == ["PutObject"]
    assert sleeps.waits == []
    stubber.assert_no_pending_responses()


def test_a_503_is_retried_by_the_wrapper_not_by_botocore(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps],
) -> None:
    store, stubber, calls, sleeps = stubbed
    for _ in range(2):
        stubber.add_client_error("put_object", "SlowDown", "Please reduce your request rate.", 503)
    stubber.add_response("put_object", {"ETag": '"e"'})
    store.put_bytes("k", b"{}")
    assert calls.names == ["PutObject"] * 3
    assert len(sleeps.waits) == 2
    stubber.assert_no_pending_responses()


def test_expired_credentials_fail_at_once_and_keep_the_upload_for_resume(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, sleeps = stubbed
    path = archive(tmp_path, 11 * MiB)
    stubber.add_response("create_multipart_upload", {"UploadId": "up-3"})
    stubber.add_response("upload_part", {"ETag": '"e1"'})
    stubber.add_client_error("upload_part", "ExpiredToken", "The provided token has expired.", 400)
    created: list[str] = []
    with pytest.raises(PermanentStorageError) as caught:
        send(store, "k", path, UploadSpec(), on_created=lambda uid, _: created.append(uid))
    assert caught.value.code == "ExpiredToken"
    assert "resume" in str(caught.value)
    assert created == ["up-3"]  # recorded, so `cloudbackup upload` resumes it
    assert "AbortMultipartUpload" not in calls.names
    assert calls.names == ["CreateMultipartUpload", "UploadPart", "UploadPart"]
    assert sleeps.waits == []


def test_a_skewed_clock_fails_at_once_with_fix_the_clock(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps],
) -> None:
    store, stubber, calls, sleeps = stubbed
    stubber.add_client_error(
        "put_object",
        "RequestTimeTooSkewed",
        "The difference between the request time and the current time is too large.",
        403,
    )
    with pytest.raises(PermanentStorageError, match="fix the clock"):
        store.put_bytes("k", b"{}")
    assert calls.names == ["PutObject"]
    assert sleeps.waits == []


def _upload_until_complete(stubber: Stubber, parts: list[bytes]) -> str:
    stubber.add_response("create_multipart_upload", {"UploadId": "up-4"})
    for part in parts:
        stubber.add_response("upload_part", {"ETag": '"e"', "ChecksumSHA256": sha256_b64(part)})
    return composite_checksum([sha256_b64(p) for p in parts])


def test_no_such_upload_on_a_retried_complete_accepts_the_matching_object(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, sleeps = stubbed
    path = archive(tmp_path, 11 * MiB)
    expected = _upload_until_complete(stubber, parts_of(path))
    # The first Complete succeeded but its answer was lost; the retry finds no upload.
    stubber.add_client_error("complete_multipart_upload", "InternalError", "", 500)
    stubber.add_client_error("complete_multipart_upload", "NoSuchUpload", "", 404)
    stubber.add_response(
        "head_object",
        {
            "ContentLength": 11 * MiB,
            "ChecksumSHA256": expected.split("-")[0],  # as moto reports it, without "-3"
            "ETag": '"final-3"',
            "Metadata": {},
        },
        {"Bucket": BUCKET, "Key": "k", "ChecksumMode": "ENABLED"},
    )
    outcome = send(store, "k", path, UploadSpec())
    assert outcome.checksum == expected
    assert outcome.etag == '"final-3"'
    assert calls.names[-3:] == [
        "CompleteMultipartUpload",
        "CompleteMultipartUpload",
        "HeadObject",
    ]
    assert len(sleeps.waits) == 1
    stubber.assert_no_pending_responses()


def test_no_such_upload_with_a_different_object_there_is_refused(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, _, _ = stubbed
    path = archive(tmp_path, 11 * MiB)
    _upload_until_complete(stubber, parts_of(path))
    stubber.add_client_error("complete_multipart_upload", "NoSuchUpload", "", 404)
    stubber.add_response(
        "head_object",
        {"ContentLength": 11 * MiB, "ChecksumSHA256": sha256_b64(b"other"), "Metadata": {}},
    )
    with pytest.raises(PermanentStorageError, match="already exists and differs"):
        send(store, "k", path, UploadSpec())


def test_an_existing_identical_object_is_accepted_and_the_leftover_upload_aborted(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, _ = stubbed
    path = archive(tmp_path, 11 * MiB)
    expected = _upload_until_complete(stubber, parts_of(path))
    stubber.add_client_error("complete_multipart_upload", "PreconditionFailed", "", 412)
    stubber.add_response(
        "head_object", {"ContentLength": 11 * MiB, "ChecksumSHA256": expected, "Metadata": {}}
    )
    stubber.add_response(
        "abort_multipart_upload", {}, {"Bucket": BUCKET, "Key": "k", "UploadId": "up-4"}
    )
    send(store, "k", path, UploadSpec())
    assert calls.names[-2:] == ["HeadObject", "AbortMultipartUpload"]
    stubber.assert_no_pending_responses()


def test_a_resumed_upload_that_already_completed_is_not_sent_again(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, calls, _ = stubbed
    path = archive(tmp_path, 11 * MiB)
    expected = composite_checksum([sha256_b64(p) for p in parts_of(path)])
    stubber.add_client_error("list_parts", "NoSuchUpload", "", 404)
    stubber.add_response(
        "head_object", {"ContentLength": 11 * MiB, "ChecksumSHA256": expected, "Metadata": {}}
    )
    outcome = send(store, "k", path, UploadSpec(), upload_id="up-5", part_size=5 * MiB)
    assert outcome.already_present
    assert outcome.checksum == expected
    assert calls.names == ["ListParts", "HeadObject"]


def test_a_single_put_carries_checksum_metadata_tags_and_a_conditional_write(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, stubber, _, _ = stubbed
    path = tmp_path / "small.tar.zst"
    path.write_bytes(b"small archive")
    spec = UploadSpec(
        metadata={"sha256": hashlib.sha256(b"small archive").hexdigest()},
        tags=[("cloudbackup:source", "www"), ("team", "ops")],
        storage_class="STANDARD_IA",
    )
    stubber.add_response(
        "put_object",
        {"ETag": '"e"'},
        {
            "Bucket": BUCKET,
            "Key": "k",
            "Body": b"small archive",
            "Metadata": spec.metadata,
            "ContentType": "application/octet-stream",
            "StorageClass": "STANDARD_IA",
            "Tagging": "cloudbackup%3Asource=www&team=ops",
            "IfNoneMatch": "*",
            "ChecksumSHA256": sha256_b64(b"small archive"),
            "ChecksumAlgorithm": "SHA256",
        },
    )
    outcome = send(store, "k", path, spec)
    assert outcome.checksum == sha256_b64(b"small archive")
    assert outcome.part_count == 1


def test_compat_mode_sends_no_checksum_and_no_tags(tmp_path: Path) -> None:
    client = make_client(endpoint_url="http://127.0.0.1:9", compat=True)
    store = S3Store(client, BUCKET, compat=True, concurrency=1, part_size=5 * MiB)
    spec = UploadSpec(metadata={"sha256": "ab"}, tags=[("cloudbackup:kind", "archive")])
    with Stubber(client) as stubber:
        stubber.add_response(
            "put_object",
            {"ETag": '"e"'},
            {
                "Bucket": BUCKET,
                "Key": "k",
                "Body": b"{}",
                "Metadata": {"sha256": "ab"},
                "ContentType": "application/octet-stream",
                "IfNoneMatch": "*",
            },
        )
        store.put_bytes("k", b"{}", spec=spec)
        path = archive(tmp_path, 6 * MiB)
        stubber.add_response(
            "create_multipart_upload",
            {"UploadId": "u"},
            {
                "Bucket": BUCKET,
                "Key": "k2",
                "Metadata": {"sha256": "ab"},
                "ContentType": "application/octet-stream",
            },
        )
        for number, body in enumerate(parts_of(path), 1):
            stubber.add_response(
                "upload_part",
                {"ETag": '"e"'},
                {
                    "Bucket": BUCKET,
                    "Key": "k2",
                    "UploadId": "u",
                    "PartNumber": number,
                    "Body": body,
                },
            )
        stubber.add_response("complete_multipart_upload", {"ETag": '"f"'}, None)
        outcome = send(store, "k2", path, spec)
        stubber.assert_no_pending_responses()
    assert outcome.checksum is None


def test_a_checksum_failure_while_downloading_is_not_retried() -> None:
    class Client:
        calls = 0

        def get_object(self, **kwargs: Any) -> Any:
            Client.calls += 1
            raise bexc.FlexibleChecksumError(error_msg="Expected checksum A did not match B")

    sleeps = Sleeps()
    store = S3Store(Client(), BUCKET, policy=RetryPolicy(sleep=sleeps))
    with pytest.raises(IntegrityError):
        store.get_bytes("k")
    assert Client.calls == 1
    assert sleeps.waits == []


# ---------------------------------------------------------------- resume against moto in-process


@pytest.fixture
def moto_store() -> Iterator[S3Store]:
    from moto import mock_aws

    with mock_aws():
        client = make_client(endpoint_url=None, compat=False)
        client.create_bucket(Bucket=BUCKET)
        yield S3Store(client, BUCKET, concurrency=1, part_size=5 * MiB)


class Interrupted(Exception):
    pass


def test_an_interrupted_upload_resumes_and_resends_only_parts_that_differ(
    moto_store: S3Store, tmp_path: Path
) -> None:
    path = archive(tmp_path, 17 * MiB)  # 4 parts
    created: list[tuple[str, int]] = []
    sent = 0

    def crash_after_two(n: int) -> None:
        nonlocal sent
        sent += 1
        if sent == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        send(
            moto_store,
            "k",
            path,
            UploadSpec(),
            on_created=lambda uid, size: created.append((uid, size)),
            progress=crash_after_two,
        )
    ((upload_id, part_size),) = created
    listed = moto_store.client.list_parts(Bucket=BUCKET, Key="k", UploadId=upload_id)["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2]  # nothing sent after the failure
    # Part 2's bytes change locally: it must be sent again; part 1 is reused.
    data = bytearray(path.read_bytes())
    data[5 * MiB + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    outcome = send(moto_store, "k", path, UploadSpec(), upload_id=upload_id, part_size=part_size)
    assert (outcome.parts_reused, outcome.parts_sent) == (1, 3)
    body = moto_store.client.get_object(Bucket=BUCKET, Key="k")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(bytes(data)).digest()
    head = moto_store.head("k")
    assert head is not None and checksums_match(outcome.checksum, head.checksum_sha256)


def test_conditional_writes_never_overwrite(moto_store: S3Store) -> None:
    moto_store.put_bytes("m", b"first")
    with pytest.raises(PermanentStorageError) as caught:
        moto_store.put_bytes("m", b"second")
    assert caught.value.code == "PreconditionFailed"
    assert moto_store.get_bytes("m") == b"first"


class Body:
    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.pos, self.fail_after = data, 0, fail_after

    def read(self, size: int | None = None) -> bytes:
        end = len(self.data) if size is None else min(len(self.data), self.pos + size)
        if self.fail_after is not None and end > self.fail_after:
            raise bexc.ResponseStreamingError(error="connection reset")
        out, self.pos = self.data[self.pos : end], end
        return out

    def close(self) -> None:
        pass


def test_a_stream_resumes_at_the_offset_reached_with_the_same_etag() -> None:
    """A reset mid-body asks again from the byte reached (Range), If-Match the first ETag:
    the bytes before the break are not fetched again, and a replaced object is refused."""
    data = os.urandom(1000)

    class Client:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        def get_object(self, **kwargs: Any) -> dict[str, Any]:
            self.calls.append(kwargs)
            start = int(kwargs["Range"][6:-1]) if "Range" in kwargs else 0
            fail = 300 if len(self.calls) == 1 else None
            return {"Body": Body(data[start:], fail), "ContentLength": 1000, "ETag": '"e1"'}

    client, waits = Client(), Sleeps()
    store = S3Store(client, "bkt", policy=RetryPolicy(attempts=3, sleep=waits))
    with store.open("k") as body:
        got = b"".join(iter(lambda: body.read(128), b""))
    assert got == data
    assert [c.get("Range") for c in client.calls] == [None, "bytes=256-"]
    assert client.calls[1]["IfMatch"] == '"e1"'
    assert len(waits.waits) == 1


def test_a_ranged_read_retries_a_reset_in_the_middle_of_a_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CLOUDBACKUP_S3_DOWNLOAD=ranged: parallel ranges, served in order; each range's body
    read is part of its retried attempt."""
    monkeypatch.setattr("cloudbackup.storage.s3.RANGED_MIN_SIZE", 0)
    monkeypatch.setattr("cloudbackup.storage.s3.RANGED_PART_SIZE", 3)
    data = b"abcdefghij"
    lock = threading.Lock()

    class Client:
        ranges: list[str] = []

        def get_object(self, **kwargs: Any) -> dict[str, Any]:
            start, end = (int(x) for x in kwargs["Range"][6:].split("-"))
            with lock:
                Client.ranges.append(kwargs["Range"])
                first = Client.ranges.count(kwargs["Range"]) == 1
            time.sleep(0.001 * (10 - start))  # finish out of order
            fail = 1 if first and start == 3 else None
            return {"Body": Body(data[start : end + 1], fail)}

    waits = Sleeps()
    store = S3Store(
        Client(), "bkt", policy=RetryPolicy(sleep=waits), download="ranged", concurrency=3
    )
    with store.open("k", size=len(data)) as body:
        assert body.read() == data
    assert sorted(set(Client.ranges)) == ["bytes=0-2", "bytes=3-5", "bytes=6-8", "bytes=9-9"]
    assert Client.ranges.count("bytes=3-5") == 2 and len(waits.waits) == 1
    # Without a size (or when single), one streamed GET.
    single = S3Store(Client(), "bkt", download="single", concurrency=3)
    Client.ranges = []

    class Whole:
        def get_object(self, **kwargs: Any) -> dict[str, Any]:
            assert "Range" not in kwargs
            return {"Body": Body(data), "ContentLength": len(data), "ETag": '"e"'}

    single.client = Whole()
    with single.open("k", size=len(data)) as body:
        assert body.read() == data


# ---------------------------------------------------------------- a file still being written


class Writer:
    """Writes ``data`` to ``path`` in steps, telling an ArchiveTail as the archive writer does."""

    def __init__(self, path: Path, data: bytes) -> None:
        from cloudbackup.stream.hashing import ArchiveTail

        self.path, self.data = path, data
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.tail = ArchiveTail()
        self.tail.attach(path)
        self.written = 0

    def write_to(self, end: int) -> None:
        os.write(self.fd, self.data[self.written : end])
        self.written = end
        self.tail.advance(end)

    def finish(self) -> None:
        self.write_to(len(self.data))
        os.close(self.fd)
        self.tail.finish(len(self.data))


def test_a_tail_waits_for_bytes_and_reports_the_end(tmp_path: Path) -> None:
    from cloudbackup.stream.hashing import ArchiveAbandoned

    writer = Writer(tmp_path / "a", b"x" * 100)
    got: list[tuple[int, int | None]] = []
    reader = threading.Thread(target=lambda: got.append(writer.tail.wait_for(60)))
    reader.start()
    writer.write_to(50)
    reader.join(0.2)
    assert reader.is_alive() and got == []  # 50 of the 60 bytes: still waiting
    writer.write_to(70)
    reader.join(5)
    assert got == [(70, None)]
    writer.finish()
    assert writer.tail.wait_for(1000) == (100, 100)  # complete: no waiting past the end
    failed = Writer(tmp_path / "b", b"y" * 10)
    waiter = threading.Thread(
        target=lambda: pytest.raises(ArchiveAbandoned, failed.tail.wait_for, 5)
    )
    waiter.start()
    failed.tail.fail()
    waiter.join(5)
    assert not waiter.is_alive()
    with pytest.raises(ArchiveAbandoned):
        failed.tail.wait_for(5)


def test_parts_of_a_growing_file_are_sent_as_it_grows(moto_store: S3Store, tmp_path: Path) -> None:
    data = archive(tmp_path, 17 * MiB).read_bytes()  # 4 parts of 5 MiB
    writer = Writer(tmp_path / "growing", data)
    sent: list[int] = []

    def progress(n: int) -> None:
        sent.append(n)

    result: list[Any] = []
    uploader = threading.Thread(
        target=lambda: result.append(
            moto_store.upload_growing("g", writer.tail, UploadSpec(), 5 * MiB, progress=progress)
        )
    )
    uploader.start()
    writer.write_to(5 * MiB)  # exactly one part: it could still be a one-PUT archive
    time.sleep(0.3)
    assert moto_store.list_uploads("g") == []
    writer.write_to(11 * MiB)
    deadline = time.monotonic() + 10
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [5 * MiB, 5 * MiB]  # parts 1 and 2 left before the file was complete
    writer.finish()
    uploader.join(10)
    (parts,) = result
    assert parts.count == 4
    outcome = moto_store.complete_parts("g", parts, len(data), 5 * MiB, UploadSpec())
    body = moto_store.client.get_object(Bucket=BUCKET, Key="g")["Body"].read()
    assert body == data
    assert outcome.checksum == composite_checksum([sha256_b64(p) for p in parts_of_bytes(data)])


def parts_of_bytes(data: bytes, part_size: int = 5 * MiB) -> list[bytes]:
    return [data[i : i + part_size] for i in range(0, len(data), part_size)]


def test_a_growing_file_of_one_part_starts_no_multipart_upload(
    stubbed: tuple[S3Store, Stubber, Calls, Sleeps], tmp_path: Path
) -> None:
    store, _, calls, _ = stubbed
    writer = Writer(tmp_path / "small", b"z" * (5 * MiB))
    writer.finish()
    assert store.upload_growing("s", writer.tail, UploadSpec(), 5 * MiB) is None
    assert calls.names == []  # no request at all: the caller PUTs it whole with its sha256


def test_a_growing_file_stops_before_part_10001(
    moto_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cloudbackup.storage.parts.MAX_PARTS", 2)
    writer = Writer(tmp_path / "big", archive(tmp_path, 12 * MiB).read_bytes())
    writer.finish()
    with pytest.raises(PermanentStorageError) as caught:
        moto_store.upload_growing("t", writer.tail, UploadSpec(), 5 * MiB)
    assert caught.value.code == "TooManyParts"
    (upload,) = moto_store.list_uploads("t")
    listed = moto_store.client.list_parts(Bucket=BUCKET, Key="t", UploadId=upload.upload_id)
    numbers = {p["PartNumber"] for p in listed["Parts"]}
    assert 1 in numbers and 3 not in numbers  # stopped before part 3 was sent


@pytest.mark.parametrize(
    ("previous_size", "preferred", "expected"),
    [
        (None, None, 8 * MiB),  # first backup of the source: the default
        (40 * GiB, None, 9 * MiB),  # room to double: 80 GiB in 10,000 parts
        (300 * GiB, 64 * MiB, 64 * MiB),  # a preferred size that already fits is kept
        (4 * TiB, None, 525 * MiB),  # doubling past S3's 5 TiB is capped, not an error
    ],
)
def test_a_streamed_upload_fixes_its_part_size_from_the_previous_archive(
    tmp_path: Path, previous_size: int | None, preferred: int | None, expected: int
) -> None:
    from cloudbackup.config import Settings
    from cloudbackup.context import Context
    from cloudbackup.core.model import BackupId
    from cloudbackup.ops import upload as transfer
    from cloudbackup.storage.local import LocalStore

    class Remote:
        def upload_growing(
            self, key: str, tail: Any, spec: UploadSpec, part_size: int, **_: Any
        ) -> None:
            self.part_size = part_size
            tail.wait_for(1)  # until abandoned

        def abort(self, key: str, upload_id: str) -> None:
            raise AssertionError("nothing was created")

    remote = Remote()
    settings = Settings(local_dir=tmp_path, host="h", s3_bucket="b", s3_part_size=preferred)
    ctx = Context(
        settings=settings,
        local=LocalStore(tmp_path),
        now=lambda: None,
        machine_id="m",
        remote=remote,
    )  # type: ignore[arg-type]
    previous = None
    if previous_size is not None:
        previous = type("M", (), {"size": previous_size})()
    backup_id = BackupId.parse("www-20261122T021500Z")
    stream = transfer.StreamedUpload(
        ctx, "www", backup_id, "www-20261122T021500Z.tar.zst", previous
    )  # type: ignore[arg-type]
    stream.abandon()
    assert stream.part_size == remote.part_size == expected


def test_resuming_an_upload_whose_parts_are_too_small_starts_over(
    moto_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed upload sized its parts from an estimate the archive outgrew: resuming it
    must not fail on every run; it is aborted and the archive sent in parts that fit."""
    monkeypatch.setattr("cloudbackup.storage.parts.MAX_PARTS", 3)
    path = archive(tmp_path, 22 * MiB)  # 5 parts of 5 MiB: more than 3
    old = moto_store.client.create_multipart_upload(Bucket=BUCKET, Key="big")["UploadId"]
    moto_store.client.upload_part(
        Bucket=BUCKET, Key="big", UploadId=old, PartNumber=1, Body=parts_of(path)[0]
    )
    created: list[tuple[str, int]] = []
    outcome = send(
        moto_store,
        "big",
        path,
        UploadSpec(),
        upload_id=old,
        part_size=5 * MiB,
        on_created=lambda uid, size: created.append((uid, size)),
    )
    ((new, part_size),) = created
    assert new != old and part_size == 8 * MiB and outcome.part_count == 3
    assert [u.upload_id for u in moto_store.list_uploads("big")] == []
    body = moto_store.client.get_object(Bucket=BUCKET, Key="big")["Body"].read()
    assert body == path.read_bytes()
