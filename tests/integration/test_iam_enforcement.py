"""The rendered IAM policies, enforced by moto's in-process IAM simulation, with raw boto3 calls.

moto ignores ``Condition`` blocks, so the ``s3:prefix`` condition on ``s3:ListBucket`` is not
exercised here (listing another prefix is allowed in moto, denied on AWS): these tests prove the
action and resource scoping only. See tests/iam_helpers.py for the other moto limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from tests.iam_helpers import (
    REGION,
    Credentials,
    create_role_user,
    enforce_iam,
    error_code,
    fake_admin_env,
    s3_client,
)

BUCKET = "cloudbackup-iam-test"
PREFIX = "cloudbackup"
MIB = 1024 * 1024

# Existing backups, written before enforcement starts.
A_ARCHIVE = f"{PREFIX}/a/www/www-20261121T021500Z.tar.zst"
A_MANIFEST = f"{PREFIX}/a/www/www-20261121T021500Z.manifest.json"
B_ARCHIVE = f"{PREFIX}/b/www/www-20261121T021500Z.tar.zst"
OTHER_PREFIX_ARCHIVE = "other/a/www/www-20261121T021500Z.tar.zst"
TAGS = "cloudbackup%3Asource=www&cloudbackup%3Ahost=a&cloudbackup%3Akind=archive"


@dataclass
class World:
    writer: Credentials  # whole prefix
    writer_a: Credentials  # host "a" only
    writer_other: Credentials  # prefix "other" only
    pruner: Credentials
    restorer: Credentials
    stale_upload_id: str  # a multipart upload under <prefix>/a/ left by a crashed run


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    fake_admin_env(monkeypatch)
    with mock_aws():
        admin = boto3.client("s3", region_name=REGION)
        admin.create_bucket(Bucket=BUCKET)
        for key in (A_ARCHIVE, A_MANIFEST, B_ARCHIVE, OTHER_PREFIX_ARCHIVE):
            admin.put_object(Bucket=BUCKET, Key=key, Body=b"backup", Tagging=TAGS)
        stale = admin.create_multipart_upload(Bucket=BUCKET, Key=f"{PREFIX}/a/www/old.tar.zst")
        iam_client = boto3.client("iam", region_name=REGION)
        yield World(
            writer=create_role_user(iam_client, "writer", BUCKET, PREFIX),
            writer_a=create_role_user(iam_client, "writer", BUCKET, PREFIX, host="a"),
            writer_other=create_role_user(iam_client, "writer", BUCKET, "other"),
            pruner=create_role_user(iam_client, "pruner", BUCKET, PREFIX),
            restorer=create_role_user(iam_client, "restorer", BUCKET, PREFIX),
            stale_upload_id=stale["UploadId"],
        )


def assert_denied(call: Any, **kwargs: Any) -> None:
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    assert error_code(info.value) == "AccessDenied", info.value.response


def put_backup(s3: Any, key: str) -> None:
    """An upload as cloudbackup makes it: conditional, with metadata, tags and storage class."""
    s3.put_object(
        Bucket=BUCKET,
        Key=key,
        Body=b"archive bytes",
        IfNoneMatch="*",
        Metadata={"sha256": "0" * 64, "source": "www", "host": "a"},
        Tagging=TAGS,
        StorageClass="STANDARD",
        ChecksumAlgorithm="SHA256",
    )


def multipart_backup(s3: Any, key: str) -> None:
    upload = s3.create_multipart_upload(
        Bucket=BUCKET, Key=key, Tagging=TAGS, ChecksumAlgorithm="SHA256"
    )
    upload_id = upload["UploadId"]
    parts = []
    for number, size in ((1, 5 * MIB), (2, 1024)):
        part = s3.upload_part(
            Bucket=BUCKET,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=b"x" * size,
            ChecksumAlgorithm="SHA256",
        )
        parts.append(
            {"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]}
        )
    # A resumed upload lists the parts already there before sending the rest.
    listed = s3.list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2]
    s3.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


@enforce_iam
def test_writer_uploads_lists_and_verifies_under_its_prefix(world: World) -> None:
    s3 = s3_client(world.writer)
    key = f"{PREFIX}/a/www/www-20261122T021500Z.tar.zst"
    put_backup(s3, key)
    multipart_backup(s3, f"{PREFIX}/a/db/db-20261122T021500Z.tar.zst")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/a/.host-id", Body=b"machine-id", IfNoneMatch="*")

    head = s3.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head["Metadata"]["source"] == "www"
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=key)["TagSet"]
    assert {"Key": "cloudbackup:kind", "Value": "archive"} in tags
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"archive bytes"
    # Bucket probe without HeadBucket (moto wants a non-existent s3:HeadBucket action for it).
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/a/", MaxKeys=1000)
    assert key in [item["Key"] for item in listed["Contents"]]
    s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/", MaxKeys=1)


@enforce_iam
def test_writer_cleans_up_stale_multipart_uploads(world: World) -> None:
    s3 = s3_client(world.writer)
    uploads = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{PREFIX}/a/")["Uploads"]
    assert [u["UploadId"] for u in uploads] == [world.stale_upload_id]
    s3.abort_multipart_upload(
        Bucket=BUCKET, Key=f"{PREFIX}/a/www/old.tar.zst", UploadId=world.stale_upload_id
    )


@enforce_iam
def test_writer_cannot_delete_or_reconfigure(world: World) -> None:
    s3 = s3_client(world.writer)
    assert_denied(s3.delete_object, Bucket=BUCKET, Key=A_ARCHIVE)
    assert_denied(s3.delete_object, Bucket=BUCKET, Key=A_ARCHIVE, VersionId="null")
    result = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": A_ARCHIVE}]})
    assert [e["Code"] for e in result["Errors"]] == ["AccessDenied"]
    assert not result.get("Deleted")
    assert_denied(
        s3.put_bucket_lifecycle_configuration,
        Bucket=BUCKET,
        LifecycleConfiguration={
            "Rules": [{"ID": "x", "Status": "Enabled", "Filter": {}, "Expiration": {"Days": 1}}]
        },
    )
    assert_denied(
        s3.put_bucket_versioning, Bucket=BUCKET, VersioningConfiguration={"Status": "Suspended"}
    )
    assert_denied(s3.put_bucket_policy, Bucket=BUCKET, Policy='{"Version": "2012-10-17"}')
    assert_denied(s3.delete_bucket, Bucket=BUCKET)
    # Everything is still there (read back with the writer's own GetObject right).
    assert s3.get_object(Bucket=BUCKET, Key=A_ARCHIVE)["Body"].read() == b"backup"


@enforce_iam
def test_host_scoped_writer_stays_in_its_host_prefix(world: World) -> None:
    s3 = s3_client(world.writer_a)
    put_backup(s3, f"{PREFIX}/a/www/www-20261122T021500Z.tar.zst")
    multipart_backup(s3, f"{PREFIX}/a/www/www-20261123T021500Z.tar.zst")
    s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/a/", MaxKeys=1)

    b_key = f"{PREFIX}/b/www/www-20261122T021500Z.tar.zst"
    assert_denied(s3.put_object, Bucket=BUCKET, Key=b_key, Body=b"x", IfNoneMatch="*")
    assert_denied(s3.create_multipart_upload, Bucket=BUCKET, Key=b_key)
    assert_denied(s3.put_object, Bucket=BUCKET, Key=f"{PREFIX}/b/.host-id", Body=b"x")
    assert_denied(s3.head_object, Bucket=BUCKET, Key=B_ARCHIVE)
    assert_denied(s3.get_object, Bucket=BUCKET, Key=B_ARCHIVE)
    assert_denied(s3.put_object, Bucket=BUCKET, Key=f"{PREFIX}/a-evil/x", Body=b"x")


@enforce_iam
def test_writer_for_one_prefix_cannot_touch_another(world: World) -> None:
    s3 = s3_client(world.writer_other)
    put_backup(s3, "other/a/www/www-20261122T021500Z.tar.zst")
    assert_denied(s3.put_object, Bucket=BUCKET, Key=f"{PREFIX}/a/www/x.tar.zst", Body=b"x")
    assert_denied(s3.get_object, Bucket=BUCKET, Key=A_ARCHIVE)
    assert_denied(s3.get_object_tagging, Bucket=BUCKET, Key=A_ARCHIVE)
    assert_denied(
        s3.abort_multipart_upload,
        Bucket=BUCKET,
        Key=f"{PREFIX}/a/www/old.tar.zst",
        UploadId=world.stale_upload_id,
    )


@enforce_iam
def test_pruner_lists_reads_and_deletes_but_cannot_write(world: World) -> None:
    s3 = s3_client(world.pruner)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")["Contents"]]
    assert A_ARCHIVE in keys and B_ARCHIVE in keys
    s3.get_object(Bucket=BUCKET, Key=A_MANIFEST)
    # Prune deletes the manifest first, then the archive, one DeleteObject each.
    s3.delete_object(Bucket=BUCKET, Key=A_MANIFEST)
    s3.delete_object(Bucket=BUCKET, Key=A_ARCHIVE)
    remaining = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/a/").get("Contents", [])
    assert remaining == []
    s3.abort_multipart_upload(
        Bucket=BUCKET, Key=f"{PREFIX}/a/www/old.tar.zst", UploadId=world.stale_upload_id
    )

    assert_denied(s3.put_object, Bucket=BUCKET, Key=f"{PREFIX}/a/www/x.tar.zst", Body=b"x")
    assert_denied(s3.create_multipart_upload, Bucket=BUCKET, Key=f"{PREFIX}/a/www/x.tar.zst")
    assert_denied(s3.delete_object, Bucket=BUCKET, Key=OTHER_PREFIX_ARCHIVE)
    assert_denied(s3.delete_object, Bucket=BUCKET, Key=B_ARCHIVE, VersionId="null")


@enforce_iam
def test_restorer_reads_but_cannot_write_or_delete(world: World) -> None:
    s3 = s3_client(world.restorer)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")["Contents"]]
    assert A_ARCHIVE in keys
    assert s3.get_object(Bucket=BUCKET, Key=A_ARCHIVE)["Body"].read() == b"backup"
    s3.head_object(Bucket=BUCKET, Key=A_MANIFEST)
    s3.get_object_tagging(Bucket=BUCKET, Key=A_ARCHIVE)

    assert_denied(s3.put_object, Bucket=BUCKET, Key=f"{PREFIX}/a/www/x.tar.zst", Body=b"x")
    assert_denied(s3.create_multipart_upload, Bucket=BUCKET, Key=f"{PREFIX}/a/www/x.tar.zst")
    assert_denied(s3.delete_object, Bucket=BUCKET, Key=A_ARCHIVE)
    assert_denied(s3.list_multipart_uploads, Bucket=BUCKET)
    assert_denied(
        s3.abort_multipart_upload,
        Bucket=BUCKET,
        Key=f"{PREFIX}/a/www/old.tar.zst",
        UploadId=world.stale_upload_id,
    )
    assert_denied(s3.get_object, Bucket=BUCKET, Key=OTHER_PREFIX_ARCHIVE)
