"""check's write probe: what a real upload sends, and which features a store refuses."""

from __future__ import annotations

import boto3
from botocore.stub import ANY, Stubber

from cloudbackup.storage.base import UploadSpec
from cloudbackup.storage.s3 import S3Store


def _store(compat: bool = False) -> tuple[S3Store, Stubber]:
    client = boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    return S3Store(client, "bkt", compat=compat), Stubber(client)


def test_probe_sends_what_an_upload_sends_and_aborts() -> None:
    store, stub = _store()
    stub.add_response(
        "create_multipart_upload",
        {"UploadId": "u1"},
        {
            "Bucket": "bkt",
            "Key": "p/h/.probe",
            "Metadata": {},
            "ContentType": ANY,
            "Tagging": "cloudbackup%3Akind=check",
            "StorageClass": "STANDARD_IA",
            "ChecksumAlgorithm": "SHA256",
        },
    )
    stub.add_response(
        "abort_multipart_upload", {}, {"Bucket": "bkt", "Key": "p/h/.probe", "UploadId": "u1"}
    )
    with stub:
        probe = store.probe_write(
            "p/h/.probe",
            UploadSpec(tags=[("cloudbackup:kind", "check")], storage_class="STANDARD_IA"),
        )
    assert probe.refused == ()
    assert probe.accepted == "tagging, SHA-256 checksums, STANDARD_IA"
    stub.assert_no_pending_responses()


def test_probe_names_the_features_a_store_refuses() -> None:
    store, stub = _store()
    stub.add_client_error("create_multipart_upload", "InvalidRequest", "tagging not supported", 400)
    stub.add_response("create_multipart_upload", {"UploadId": "u2"})
    stub.add_response("abort_multipart_upload", {})
    with stub:
        probe = store.probe_write("k", UploadSpec(tags=[("cloudbackup:kind", "check")]))
    assert probe.refused == ("ChecksumAlgorithm", "Tagging")
    stub.assert_no_pending_responses()


def test_probe_access_denied_is_not_masked() -> None:
    store, stub = _store()
    stub.add_client_error("create_multipart_upload", "AccessDenied", "denied", 403)
    with stub:
        try:
            store.probe_write("k", UploadSpec())
        except Exception as exc:  # noqa: BLE001
            assert "AccessDenied" in str(exc)
        else:
            raise AssertionError("AccessDenied must fail the probe")
    stub.assert_no_pending_responses()
