"""End to end over HTTP: the CLI against a moto server, with a fault-injecting proxy in front.

The proxy (tests/s3_helpers.py) answers 503 SlowDown, resets connections, delays or holds
requests, and records every request so the tests can check headers (checksums, conditional
writes, tags) and count operations (no GetObject for list/verify, no re-sent parts on resume).
Retries use an injected sleep, so no test waits for a real backoff.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, Env, RemoteEnv, S3Env, make_tree
from tests.s3_helpers import Fault, FaultProxy, Request, Sleeps

pytestmark = pytest.mark.slow

HOST = "testhost"
MiB = 1024**2
Cli = Callable[..., CliResult]


@pytest.fixture
def proxy(s3_env: S3Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fault proxy in front of the session's moto server; the CLI talks to it."""
    with FaultProxy(s3_env.endpoint) as fault_proxy:
        monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", fault_proxy.endpoint)
        yield fault_proxy


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    """The CLI's retry policy records its waits instead of sleeping."""
    from cloudbackup.cli import commands

    recorded = Sleeps()
    real = commands.make_remote
    monkeypatch.setattr(commands, "make_remote", lambda settings: real(settings, sleep=recorded))
    return recorded


def source_tree(root: Path, big: int = 0) -> Path:
    files: dict[str, bytes | str] = {f"docs/{i}.txt": f"line {i}\n" * 50 for i in range(20)}
    if big:
        files["media/big.bin"] = os.urandom(big)  # random: zstd cannot shrink it
    return make_tree(root, files)


def backup(cli: Cli, *args: str | Path) -> tuple[CliResult, dict[str, Any]]:
    result = cli("backup", "--json", *args)
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def local_manifest(env: Env, source: str) -> dict[str, Any]:
    (path,) = env.manifests(source)
    return json.loads(path.read_bytes())  # type: ignore[no-any-return]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_sha256(s3: S3Env, key: str) -> str:
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def tags(s3: S3Env, key: str) -> dict[str, str]:
    tag_set = s3.client.get_object_tagging(Bucket=s3.bucket, Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in tag_set}


def keys_of(s3: S3Env, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The archive's and the manifest's keys (and the index's, when there is one)."""
    archive = s3.key(HOST, manifest["source"], manifest["archive"])
    keys = (archive, s3.key(HOST, manifest["source"], f"{manifest['id']}.manifest.json"))
    if manifest.get("index"):
        keys += (s3.key(HOST, manifest["source"], manifest["index"]["name"]),)
    return keys


def tamper_with_archive(env: Env, s3: S3Env, source: str) -> dict[str, Any]:
    """Overwrite a source's archive object with random bytes of the same size and the same
    metadata; returns its local manifest."""
    manifest = local_manifest(env, source)
    key, *_ = keys_of(s3, manifest)
    head = s3.client.head_object(Bucket=s3.bucket, Key=key)
    s3.client.put_object(
        Bucket=s3.bucket,
        Key=key,
        Body=os.urandom(head["ContentLength"]),
        Metadata=head["Metadata"],
    )
    return manifest


def assert_checksummed(requests: list[Request]) -> None:
    """Every object write carries x-amz-checksum-sha256, and it is the SHA-256 of the body."""
    assert requests
    for request in requests:
        assert request.headers.get("x-amz-checksum-sha256") == request.body_sha256_b64, (
            request.operation,
            request.path,
        )


# ---------------------------------------------------------------- transient faults


def test_backup_survives_throttling_and_connection_resets(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, sleeps: Sleeps, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "www", big=11 * MiB)
    is_manifest = lambda r: r.key.endswith(".manifest.json")  # noqa: E731
    proxy.inject(
        Fault("slowdown", operation="ListObjectsV2"),
        Fault("reset", operation="HeadObject"),
        Fault("slowdown", operation="PutObject", when=lambda r: r.key.endswith(".host-id")),
        Fault("reset", operation="UploadPart", times=2),
        Fault("slowdown", operation="UploadPart", times=2),
        # Complete took effect but the answer was lost: the retry meets NoSuchUpload.
        Fault("drop", operation="CompleteMultipartUpload"),
        # The manifest PUT took effect, answer lost: the retry meets PreconditionFailed.
        Fault("drop", operation="PutObject", when=is_manifest),
    )
    started = time.monotonic()
    result, doc = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 30
    (entry,) = doc["results"]
    assert entry["ok"] and entry["uploaded"], entry
    assert len(sleeps.waits) == 9  # one retry per injected fault
    assert "(attempt 1 of 5)" in result.stderr and "retrying in" in result.stderr
    assert "Traceback" not in result.stderr
    manifest = local_manifest(env, "www")
    archive_key, manifest_key, *_ = keys_of(s3_env, manifest)
    (archive,) = env.archives("www")
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"] == sha256_file(archive)
    remote_manifest = s3_env.client.get_object(Bucket=s3_env.bucket, Key=manifest_key)
    assert json.loads(remote_manifest["Body"].read())["upload"]["part_count"] == 3
    assert proxy.count("CreateMultipartUpload") == 1  # retries never start a second upload


def test_a_503_is_retried_only_by_the_wrapper_and_then_gives_up(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, sleeps: Sleeps, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_RETRY_ATTEMPTS", "3")
    src = source_tree(env.tmp / "www")
    proxy.inject(Fault("slowdown", operation="PutObject", times=None))
    result, doc = backup(cli, src)
    assert result.exit_code == 1
    # botocore's own retries are off: exactly the wrapper's 3 attempts reached the wire.
    assert proxy.count("PutObject") == 3
    assert len(sleeps.waits) == 2
    assert "(attempt 1 of 3)" in result.stderr and "(attempt 2 of 3)" in result.stderr
    line = result.assert_one_error(s3_env.bucket, "SlowDown", "gave up after 3 attempts")
    assert "local archive is kept" in line
    assert len(env.archives("www")) == 1 and len(env.manifests("www")) == 1
    assert doc["results"][0]["uploaded"] is False


# ---------------------------------------------------------------- permanent errors


def test_access_denied_fails_fast_with_one_line_and_keeps_the_local_archive(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, sleeps: Sleeps
) -> None:
    src = source_tree(env.tmp / "www")
    # A role that may list but not write (the writer policy is missing).
    proxy.inject(Fault("deny", when=lambda r: r.method in ("PUT", "POST"), times=None))
    started = time.monotonic()
    result, doc = backup(cli, src)
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    result.assert_one_error(s3_env.bucket, "AccessDenied")
    assert sleeps.waits == []  # permanent: never retried
    assert len(env.archives("www")) == 1 and len(env.manifests("www")) == 1
    assert doc["results"][0]["uploaded"] is False

    # `upload` with every request denied: the same, and the archive is still kept.
    proxy.clear()
    proxy.inject(Fault("deny", times=None))
    started = time.monotonic()
    result = cli("upload")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    result.assert_one_error(s3_env.bucket, "AccessDenied")
    assert len(env.archives("www")) == 1
    assert proxy.count() == 1  # the first refusal ends the run: nothing is hammered


def test_a_missing_bucket_fails_the_upload_fast_and_keeps_the_local_archive(
    cli: Cli, env: Env, s3_env: S3Env, sleeps: Sleeps, monkeypatch: Any
) -> None:
    src = source_tree(env.tmp / "www")
    monkeypatch.delenv("CLOUDBACKUP_S3_BUCKET")
    assert cli("backup", src).exit_code == 0  # local-only
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", s3_env.bucket + "-missing")
    started = time.monotonic()
    result = cli("upload")
    assert time.monotonic() - started < 30
    assert result.exit_code == 1
    result.assert_one_error(s3_env.bucket + "-missing", "NoSuchBucket")
    assert sleeps.waits == []
    assert len(env.archives("www")) == 1 and len(env.manifests("www")) == 1


@pytest.mark.parametrize("problem", ["denied", "missing"])
def test_backup_keeps_the_local_archive_when_the_bucket_is_unusable(
    cli: Cli,
    env: Env,
    s3_env: S3Env,
    proxy: FaultProxy,
    sleeps: Sleeps,
    monkeypatch: Any,
    problem: str,
) -> None:
    src = source_tree(env.tmp / "www")
    if problem == "denied":
        proxy.inject(Fault("deny", times=None))
    else:
        monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", s3_env.bucket + "-missing")
    result, _ = backup(cli, src)
    assert result.exit_code == 1
    result.assert_one_error(s3_env.bucket)
    assert len(env.archives("www")) == 1 and len(env.manifests("www")) == 1


# ---------------------------------------------------------------- what lands in S3


@pytest.mark.parametrize("mode", ["stream", "after"])
def test_objects_carry_metadata_tags_storage_class_checksums_and_conditional_writes(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any, mode: str
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_UPLOAD", mode)
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    monkeypatch.setenv("CLOUDBACKUP_S3_TAGS", "team=ops,env=prod")
    monkeypatch.setenv("CLOUDBACKUP_S3_STORAGE_CLASS", "STANDARD_IA")
    small = source_tree(env.tmp / "small")
    big = source_tree(env.tmp / "big", big=11 * MiB)
    result, _ = backup(cli, small, big)
    assert result.exit_code == 0, result.stderr

    for source in ("small", "big"):
        manifest = local_manifest(env, source)
        archive_key, manifest_key, *_ = keys_of(s3_env, manifest)
        head = s3_env.client.head_object(
            Bucket=s3_env.bucket, Key=archive_key, ChecksumMode="ENABLED"
        )
        expected = {
            "sha256": manifest["sha256"],
            "source": source,
            "host": HOST,
            "created-at": manifest["created_at"],
            "cloudbackup-version": manifest["tool_version"],
        }
        if mode == "stream" and source == "big":
            # Parts left while the archive was written: its SHA-256 did not exist yet when
            # S3 took the metadata. It is on the manifest object, and S3's composite
            # checksum (asserted below) covers the bytes.
            del expected["sha256"]
        assert head["Metadata"] == expected
        assert head["StorageClass"] == "STANDARD_IA"
        assert head.get("ChecksumSHA256")
        assert tags(s3_env, archive_key) == {
            "cloudbackup:source": source,
            "cloudbackup:host": HOST,
            "cloudbackup:kind": "archive",
            "team": "ops",
            "env": "prod",
        }
        mhead = s3_env.client.head_object(
            Bucket=s3_env.bucket, Key=manifest_key, ChecksumMode="ENABLED"
        )
        assert mhead.get("StorageClass", "STANDARD") == "STANDARD"
        assert mhead.get("ChecksumSHA256")
        assert mhead["Metadata"]["sha256"] == manifest["sha256"]
        remote_manifest = json.loads(
            s3_env.client.get_object(Bucket=s3_env.bucket, Key=manifest_key)["Body"].read()
        )
        assert remote_manifest["sha256"] == manifest["sha256"]
        assert (
            head["ChecksumSHA256"].split("-")[0]
            == (remote_manifest["upload"]["checksum"].split("-")[0])
        )
        assert tags(s3_env, manifest_key) == {
            "cloudbackup:source": source,
            "cloudbackup:host": HOST,
            "cloudbackup:kind": "manifest",
        }
    # The big one went multipart, the small one in one PUT.
    assert proxy.count("CreateMultipartUpload") == 1
    assert proxy.count("UploadPart") == 3
    # Every object write carries its SHA-256, and it is the SHA-256 of what was sent.
    assert_checksummed(proxy.requests("PutObject") + proxy.requests("UploadPart"))
    for request in proxy.requests("UploadPart"):
        assert request.headers.get("x-amz-sdk-checksum-algorithm") == "SHA256"
    (create,) = proxy.requests("CreateMultipartUpload")
    assert create.headers.get("x-amz-checksum-algorithm") == "SHA256"
    assert create.headers.get("x-amz-checksum-type") == "COMPOSITE"
    # Conditional writes: an existing backup object is never overwritten.
    for request in proxy.requests("PutObject") + proxy.requests("CompleteMultipartUpload"):
        assert request.headers.get("if-none-match") == "*", request.path
    proxy.clear()
    verified = cli("verify", "--where", "remote")
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("ok ") == 2
    assert proxy.count("GetObject") == 0


def test_a_50mb_archive_goes_multipart_in_parallel_and_arrives_intact(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy
) -> None:
    src = source_tree(env.tmp / "media", big=50 * MiB)
    # A little latency per part makes the overlap of parallel parts observable.
    proxy.inject(Fault("delay", operation="UploadPart", times=None, seconds=0.3))
    result, _ = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    manifest = local_manifest(env, "media")
    archive_key, *_ = keys_of(s3_env, manifest)
    parts = proxy.requests("UploadPart")
    assert len(parts) == 7  # 50 MiB in 8 MiB parts
    assert proxy.max_in_flight["UploadPart"] >= 2
    assert sorted(p.part_number or 0 for p in parts) == list(range(1, 8))
    (archive,) = env.archives("media")
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"] == sha256_file(archive)
    record = json.loads((env.source_dir("media") / f"{manifest['id']}.upload.json").read_bytes())
    assert record["part_count"] == 7 and record["part_size"] == 8 * MiB
    assert record["checksum"].endswith("-7") and record["verified_at"]


# ---------------------------------------------------------------- crash and resume


def test_kill_during_upload_then_resume_without_resending_parts(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, sleeps: Sleeps, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "db", big=60 * MiB)
    assert cli("backup", "--no-upload", src).exit_code == 0
    manifest = local_manifest(env, "db")
    part_count = -(-manifest["size"] // (5 * MiB))
    assert part_count >= 12
    record_path = env.source_dir("db") / f"{manifest['id']}.upload.json"

    # Parts 1-4 go through; later parts hang in the proxy, so the upload is mid-way.
    proxy.inject(
        Fault("hold", operation="UploadPart", when=lambda r: (r.part_number or 0) > 4, times=None)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", "upload"],
        cwd=env.work,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def mid_upload(p: FaultProxy) -> bool:
            done = {r.part_number for r in p.requests("UploadPart") if r.status == 200}
            return done >= {1, 2, 3, 4} and any(
                r.action == "hold" for r in p.requests("UploadPart")
            )

        if not proxy.wait_for(mid_upload, timeout=30) or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the upload did not reach the middle: {proc.stderr.read()!r}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    proxy.release()
    record = json.loads(record_path.read_bytes())
    assert record["upload_id"] and not record.get("verified_at")
    assert s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
    proxy.clear()

    result = cli("upload", "--json")
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["ok"] and entry["parts_reused"] == 4, entry
    assert entry["parts_sent"] == part_count - 4, entry
    ops = proxy.operations()
    assert "ListParts" in ops and ops.index("ListParts") < ops.index("UploadPart")
    assert proxy.count("CreateMultipartUpload") == 0  # resumed, not started over
    resent = sorted(r.part_number or 0 for r in proxy.requests("UploadPart"))
    assert resent == list(range(5, part_count + 1))  # completed parts 1-4 were not sent again
    assert proxy.count("CompleteMultipartUpload") == 1
    archive_key, *_ = keys_of(s3_env, manifest)
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"]
    assert not s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")

    listed = json.loads(cli("list", "--where", "all", "--json").stdout)["backups"]
    assert [(b["id"], b["local"], b["remote"], b["verified"]) for b in listed] == [
        (manifest["id"], True, True, True)
    ]


def test_list_where_remote_shows_an_uploaded_backup_verified(
    cli: Cli, env: Env, remote: RemoteEnv
) -> None:
    assert cli("backup", source_tree(env.tmp / "www")).exit_code == 0
    listed = json.loads(cli("list", "--where", "remote", "--json").stdout)["backups"]
    assert [(b["remote"], b["verified"]) for b in listed] == [(True, True)]


# ---------------------------------------------------------------- verify without downloading


def test_list_and_verify_issue_no_get_and_tampering_is_caught(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    result, _ = backup(cli, source_tree(env.tmp / "small"), source_tree(env.tmp / "big", 11 * MiB))
    assert result.exit_code == 0, result.stderr
    proxy.clear()

    listed = cli("list", "--where", "remote", "--json")
    assert listed.exit_code == 0
    assert len(json.loads(listed.stdout)["backups"]) == 2
    assert cli("list", "--json").exit_code == 0
    verified = cli("verify", "--where", "remote", "--json")
    assert verified.exit_code == 0, verified.stdout
    assert all(r["ok"] for r in json.loads(verified.stdout)["results"])
    assert proxy.count("GetObject") == 0  # HEADs and LISTs only
    assert proxy.count("HeadObject") == 4  # manifest + archive, per backup
    assert proxy.count("ListObjectsV2") == 3

    # Tamper with the big archive behind our back: same size, same metadata, other bytes
    # (S3 now reports another checksum, or none; the compat test covers a store without them).
    big = tamper_with_archive(env, s3_env, "big")
    for deep in ((), ("--deep",)):
        tampered = cli("verify", "--where", "remote", "--json", *deep, big["id"])
        assert tampered.exit_code == 3, tampered.stdout
        (outcome,) = json.loads(tampered.stdout)["results"]
        assert not outcome["ok"] and "checksum" in outcome["detail"]

    # A size change is caught without downloading anything.
    small = local_manifest(env, "small")
    small_key, *_ = keys_of(s3_env, small)
    head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=small_key)
    s3_env.client.put_object(
        Bucket=s3_env.bucket, Key=small_key, Body=b"short", Metadata=head["Metadata"]
    )
    proxy.clear()
    shallow = cli("verify", "--where", "remote", "--json", small["id"])
    assert shallow.exit_code == 3
    (outcome,) = json.loads(shallow.stdout)["results"]
    assert "size" in outcome["detail"]
    assert proxy.count("GetObject") == 0


# ---------------------------------------------------------------- host claim


def test_a_second_machine_cannot_write_under_a_claimed_host(
    cli: Cli, env: Env, remote: RemoteEnv, monkeypatch: Any
) -> None:
    monkeypatch.setattr("cloudbackup.context.machine_id", lambda *a, **k: "a" * 32)
    assert cli("backup", source_tree(env.tmp / "www")).exit_code == 0
    claim = f"{remote.prefix}/{HOST}/.host-id"
    assert remote.get(claim).strip() == b"a" * 32

    monkeypatch.setattr("cloudbackup.context.machine_id", lambda *a, **k: "b" * 32)
    result, doc = backup(cli, source_tree(env.tmp / "www"))
    assert result.exit_code == 1
    result.assert_one_error("claimed by another machine", HOST)
    assert doc["results"][0]["uploaded"] is False
    assert len(env.archives("www")) == 2  # kept locally
    assert len([k for k in remote.keys() if k.endswith(".tar.zst")]) == 1

    # Without --host, `upload` refuses too; with the host given explicitly (a DR machine,
    # a central job) the claim is not enforced.
    refused = cli("upload")
    assert refused.exit_code == 1
    refused.assert_one_error("claimed by another machine")
    uploaded = cli("upload", "--host", HOST, "--json")
    assert uploaded.exit_code == 0, uploaded.stderr
    assert [r["ok"] for r in json.loads(uploaded.stdout)["results"]] == [True]
    assert len([k for k in remote.keys() if k.endswith(".tar.zst")]) == 2
    # The claim still names the first machine.
    assert remote.get(claim).strip() == b"a" * 32


# ---------------------------------------------------------------- compat mode and object lock


def test_compat_mode_sends_no_checksums_and_no_tags(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_COMPAT", "1")
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    monkeypatch.setenv("CLOUDBACKUP_S3_TAGS", "team=ops")
    result, _ = backup(cli, source_tree(env.tmp / "small"), source_tree(env.tmp / "big", 11 * MiB))
    assert result.exit_code == 0, result.stderr
    writes = [
        r
        for r in proxy.requests()
        if r.operation
        in ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload")
    ]
    assert {r.operation for r in writes} == {
        "PutObject",
        "UploadPart",
        "CreateMultipartUpload",
        "CompleteMultipartUpload",
    }
    for request in writes:
        sent = [
            h for h in request.headers if h.startswith(("x-amz-checksum", "x-amz-sdk-checksum"))
        ]
        assert sent == [], (request.operation, sent)
        assert "x-amz-tagging" not in request.headers
    for source in ("small", "big"):
        archive_key, manifest_key, *_ = keys_of(s3_env, local_manifest(env, source))
        assert tags(s3_env, archive_key) == {}
        assert tags(s3_env, manifest_key) == {}
    verified = cli("verify", "--where", "remote")
    assert verified.exit_code == 0, verified.stdout

    # Without S3 checksums, tampering that keeps size and metadata passes the HEAD checks;
    # --deep streams the object and catches it.
    big = tamper_with_archive(env, s3_env, "big")
    assert cli("verify", "--where", "remote", big["id"]).exit_code == 0
    proxy.clear()
    deep = cli("verify", "--where", "remote", "--deep", "--json", big["id"])
    assert deep.exit_code == 3, deep.stdout
    (outcome,) = json.loads(deep.stdout)["results"]
    assert not outcome["ok"] and "sha256" in outcome["detail"]
    assert proxy.count("GetObject") >= 1


def test_object_lock_retention_on_archive_and_manifest(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    bucket = s3_env.bucket + "-locked"
    s3_env.client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", bucket)
    monkeypatch.setenv("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:30d")
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    result, _ = backup(cli, source_tree(env.tmp / "small"), source_tree(env.tmp / "big", 11 * MiB))
    assert result.exit_code == 0, result.stderr
    for source in ("small", "big"):
        manifest = local_manifest(env, source)
        created = datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00"))
        until = created + timedelta(days=30)
        archive_key, manifest_key, *_ = keys_of(s3_env, manifest)
        for key in (archive_key, manifest_key):
            (write,) = [
                r
                for r in proxy.requests()
                if r.key == key and r.operation in ("PutObject", "CreateMultipartUpload")
            ]
            assert write.headers.get("x-amz-object-lock-mode") == "GOVERNANCE"
            sent_until = write.headers["x-amz-object-lock-retain-until-date"]
            assert datetime.fromisoformat(sent_until.replace("Z", "+00:00")) == until
            if write.operation == "CreateMultipartUpload":
                continue  # moto 5.2 drops the lock of multipart uploads; the request had it
            head = s3_env.client.head_object(Bucket=bucket, Key=key)
            assert head.get("ObjectLockMode") == "GOVERNANCE", key
            assert head["ObjectLockRetainUntilDate"].astimezone(UTC) == until, key
            # (moto 5.2 answers GetObjectRetention with a 500, so HEAD is the witness here.)
    assert proxy.count("CreateMultipartUpload") == 1  # the big archive went multipart


# ---------------------------------------------------------------- streamed upload


def record_progress(monkeypatch: Any) -> list[str]:
    """The labels of the progress displays the CLI opens."""
    labels: list[str] = []

    def factory() -> Callable[[str, int | None], Callable[[int], None]]:
        def make(label: str, total: int | None) -> Callable[[int], None]:
            labels.append(label)
            return lambda n: None

        return make

    monkeypatch.setattr("cloudbackup.cli.commands._progress_factory", factory)
    return labels


def gate_after(monkeypatch: Any, name: str, wait: Callable[[], bool]) -> list[bool]:
    """Hold the archive writer right after the entry ``name``: ``wait()`` runs before the
    next entry is read (with everything before it on disk), and its result is recorded."""
    import cloudbackup.ops.backup as operations

    outcomes: list[bool] = []
    real = operations.write_archive

    def gated_write_archive(entries: Any, *args: Any, **kwargs: Any) -> Any:
        def gated() -> Iterator[Any]:
            for entry in entries:
                yield entry
                if entry.arcname.endswith(name):
                    outcomes.append(wait())

        return real(gated(), *args, **kwargs)

    monkeypatch.setattr(operations, "write_archive", gated_write_archive)
    return outcomes


def test_parts_leave_while_the_archive_is_still_being_written(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    # zstd's workers hold up to a few jobs (~30 MiB) before output appears: 64 MiB of
    # input puts several parts on disk by the time the writer is held.
    src = source_tree(env.tmp / "www", big=64 * MiB)
    (src / "zz-last.txt").write_text("written after the first parts left\n")

    def first_part_in_s3() -> bool:
        return proxy.wait_for(
            lambda p: any(r.status == 200 for r in p.requests("UploadPart")), timeout=30
        )

    # The writer stops after the big file until part 1 is in S3: that can only happen when
    # parts are sent while the archive is still being written.
    gate = gate_after(monkeypatch, "big.bin", first_part_in_s3)
    labels = record_progress(monkeypatch)
    # Completed only once the archive is durable and its manifest written.
    manifest_there: list[bool] = []
    proxy.inject(
        Fault(
            "delay",
            operation="CompleteMultipartUpload",
            when=lambda r: manifest_there.append(bool(env.manifests("www"))) is None,
        )
    )
    result, doc = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert gate == [True]
    assert manifest_there == [True]
    # The streamed upload has its display; none follows for an upload already done.
    assert labels[0] == "archive www" and labels[1].startswith("upload www-") and len(labels) == 2
    (entry,) = doc["results"]
    assert entry["ok"] and entry["uploaded"], entry
    manifest = local_manifest(env, "www")
    archive_key, manifest_key, *_ = keys_of(s3_env, manifest)
    (archive,) = env.archives("www")
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"] == sha256_file(archive)
    assert proxy.count("CreateMultipartUpload") == 1
    parts = sorted(r.part_number or 0 for r in proxy.requests("UploadPart"))
    assert parts == list(range(1, -(-manifest["size"] // (5 * MiB)) + 1))
    assert proxy.count("CompleteMultipartUpload") == 1
    assert [r.key for r in proxy.requests("PutObject")][-1] == manifest_key  # manifest last
    record = json.loads((env.source_dir("www") / f"{manifest['id']}.upload.json").read_bytes())
    assert record["verified_at"] and record["upload_id"] is None
    assert record["checksum"].endswith(f"-{len(parts)}")
    verified = cli("verify", "--where", "remote", "--deep")
    assert verified.exit_code == 0, verified.stdout
    assert f"ok   remote {manifest['id']}" in verified.stdout


def test_after_mode_uploads_once_the_archive_is_complete(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    monkeypatch.setenv("CLOUDBACKUP_S3_UPLOAD", "after")
    src = source_tree(env.tmp / "www", big=12 * MiB)
    (src / "zz-last.txt").write_text("last\n")
    gate = gate_after(monkeypatch, "big.bin", lambda: proxy.count("UploadPart") == 0)
    labels = record_progress(monkeypatch)
    result, _ = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert gate == [True]  # nothing was sent while the archive was being written
    assert labels[0] == "archive www" and labels[1].startswith("upload www-")
    manifest = local_manifest(env, "www")
    archive_key, *_ = keys_of(s3_env, manifest)
    head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=archive_key)
    assert head["Metadata"]["sha256"] == manifest["sha256"]
    assert proxy.count("UploadPart") == 3


def test_a_refused_archive_aborts_its_streamed_upload(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "www", big=20 * MiB)
    assert backup(cli, src)[0].exit_code == 0
    first = local_manifest(env, "www")
    for doc in list((src / "docs").iterdir())[:15]:
        doc.unlink()  # 20 → 5 small files: the shrink guard refuses the next archive
    proxy.clear()
    result, doc = backup(cli, src)
    assert result.exit_code == 1
    assert "shrank" in doc["results"][0]["error"]
    # Parts had left while the archive was written; the refusal aborted that upload.
    assert proxy.count("UploadPart") >= 1
    assert proxy.count("AbortMultipartUpload") == 1
    assert proxy.count("CompleteMultipartUpload") == 0
    assert not s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
    keys = [
        o["Key"] for o in s3_env.client.list_objects_v2(Bucket=s3_env.bucket).get("Contents", [])
    ]
    assert {k for k in keys if "/www/" in k} == set(keys_of(s3_env, first))
    assert sorted(p.name for p in env.files("www")) == sorted(
        [
            first["archive"],
            f"{first['id']}.index.zst",
            f"{first['id']}.manifest.json",
            f"{first['id']}.upload.json",
        ]
    )  # the refused archive's index (written in the same pass) went with it


def test_a_streamed_upload_that_fails_is_finished_from_the_local_archive(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, sleeps: Sleeps, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    monkeypatch.setenv("CLOUDBACKUP_RETRY_ATTEMPTS", "1")
    src = source_tree(env.tmp / "www", big=20 * MiB)
    proxy.inject(Fault("slowdown", operation="UploadPart", when=lambda r: r.part_number == 2))
    result, doc = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert "finishing it from the local archive" in result.stderr
    assert doc["results"][0]["uploaded"] is True
    manifest = local_manifest(env, "www")
    archive_key, *_ = keys_of(s3_env, manifest)
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"]
    # The same multipart upload was resumed: its parts were listed, part 1 not sent again.
    assert proxy.count("CreateMultipartUpload") == 1
    assert proxy.count("ListParts") == 1
    sent = [r.part_number for r in proxy.requests("UploadPart") if r.status == 200]
    assert sent.count(1) == 1 and sent.count(2) == 1
    assert not s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")


def test_a_streamed_upload_left_uncompleted_is_completed_by_upload(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "www", big=20 * MiB)
    proxy.inject(
        Fault("error", operation="CompleteMultipartUpload", status=403, code="AccessDenied")
    )
    result, _ = backup(cli, src)
    assert result.exit_code == 1
    line = result.assert_one_error("AccessDenied", "local archive is kept")
    assert "upload failed" in line
    manifest = local_manifest(env, "www")
    record_path = env.source_dir("www") / f"{manifest['id']}.upload.json"
    assert json.loads(record_path.read_bytes())["upload_id"]
    part_count = proxy.count("UploadPart")
    assert part_count == -(-manifest["size"] // (5 * MiB))
    proxy.clear()

    result = cli("upload", "--json")
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["ok"] and entry["parts_reused"] == part_count and entry["parts_sent"] == 0
    assert proxy.count("UploadPart") == 0 and proxy.count("CreateMultipartUpload") == 0
    archive_key, *_ = keys_of(s3_env, manifest)
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"]
    assert (
        "sha256" not in s3_env.client.head_object(Bucket=s3_env.bucket, Key=archive_key)["Metadata"]
    )
    assert cli("verify", "--where", "remote").exit_code == 0


def test_an_archive_that_outgrows_the_part_count_is_uploaded_whole(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setattr("cloudbackup.storage.parts.MAX_PARTS", 3)
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "www", big=22 * MiB)  # 5 parts of 5 MiB
    result, _ = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert "uploading it whole instead" in result.stderr
    # The stream stopped before part 4 and was aborted; the whole archive then went up in
    # parts large enough for the limit, with its sha256 metadata.
    creates = proxy.requests("CreateMultipartUpload")
    assert len(creates) == 2 and proxy.count("AbortMultipartUpload") == 1
    streamed = [
        r.part_number for r in proxy.requests("UploadPart") if r.started < creates[1].started
    ]
    assert max(streamed) == 3
    manifest = local_manifest(env, "www")
    archive_key, *_ = keys_of(s3_env, manifest)
    head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=archive_key)
    assert head["Metadata"]["sha256"] == manifest["sha256"]
    assert remote_sha256(s3_env, archive_key) == manifest["sha256"]


def test_a_kill_during_a_streamed_backup_leaves_nothing_behind_after_the_next_run(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    src = source_tree(env.tmp / "www", big=64 * MiB)
    # Part 2 hangs in the proxy; the kill comes while the archive is still being written
    # (the writer is held after the big file by a slow source read, see below).
    proxy.inject(Fault("hold", operation="UploadPart", when=lambda r: r.part_number == 2))
    script = (
        "import time, cloudbackup.ops.backup as o\n"
        "real = o.write_archive\n"
        "def slow(entries, *a, **k):\n"
        "    def gen():\n"
        "        for e in entries:\n"
        "            yield e\n"
        "            if e.arcname.endswith('big.bin'):\n"
        "                time.sleep(60)\n"
        "    return real(gen(), *a, **k)\n"
        "o.write_archive = slow\n"
        "from cloudbackup.cli import main\n"
        f"main(['backup', {str(src)!r}])\n"
    )
    (src / "zz-last.txt").write_text("last\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=env.work,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from tests.conftest import kill_when

    kill_when(proc, lambda: any(r.action == "hold" for r in proxy.requests("UploadPart")))
    proxy.release()
    # The archive and its index, both half-written.
    (partial,) = env.files("www", "*.tar.zst.partial")
    assert [p.name for p in env.files("www", "*.partial")] == [
        partial.name.replace(".tar.zst.partial", ".index.zst.partial"),
        partial.name,
    ]
    (record,) = env.files("www", "*.upload.json")
    upload_id = json.loads(record.read_bytes())["upload_id"]
    uploads = s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [upload_id]
    proxy.clear()

    (src / "zz-last.txt").unlink()
    result, _ = backup(cli, src)
    assert result.exit_code == 0, result.stderr
    assert not partial.exists() and env.files("www", "*.partial") == []
    assert "aborted the upload of" in result.stderr
    # The new backup may reuse the id (same second); every record left is of a kept backup.
    (manifest_path,) = env.manifests("www")
    (record,) = env.files("www", "*.upload.json")
    assert record.name == manifest_path.name.replace(".manifest.json", ".upload.json")
    assert json.loads(record.read_bytes())["verified_at"]
    uploads = s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads", [])
    assert upload_id not in [u["UploadId"] for u in uploads]
    assert not uploads
    assert len(env.manifests("www")) == 1


def test_a_local_error_during_one_upload_fails_that_source_only(
    cli: Cli, env: Env, s3_env: S3Env, proxy: FaultProxy, monkeypatch: Any
) -> None:
    import errno

    from cloudbackup.ops import upload as transfer

    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    real = transfer.upload_backup

    def disk_full_for_a(ctx: Any, ref: Any, streamed: Any = None) -> Any:
        if ref.source == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(ctx, ref, streamed)

    monkeypatch.setattr(transfer, "upload_backup", disk_full_for_a)
    a = source_tree(env.tmp / "a", big=12 * MiB)  # streamed: its parts were already sent
    b = source_tree(env.tmp / "b")
    result, doc = backup(cli, a, b)
    assert result.exit_code == 1
    line = result.assert_one_error("No space left on device", "local archive is kept")
    assert "upload failed" in line
    by_source = {r["source"]: r for r in doc["results"]}
    assert by_source["a"]["uploaded"] is False and by_source["b"]["uploaded"] is True
    assert len(env.archives("a")) == 1 and len(env.manifests("a")) == 1
    # The source after it was backed up and uploaded, and nothing was left half-way.
    assert proxy.count("CompleteMultipartUpload") == 1
    assert not s3_env.client.list_multipart_uploads(Bucket=s3_env.bucket).get("Uploads")
