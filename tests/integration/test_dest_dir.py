"""The directory destination end to end (``CLOUDBACKUP_DEST=file:///...``): what differs from
a bucket. The bucket's layout on disk; parts that resume; verify by re-hashing (tampering
caught, with or without --deep); `check` leaving nothing behind; the settings that are
refused with it; a link planted in it never followed; an unmounted disk never filled.
(Every other end-to-end test runs over both destinations: the ``remote`` fixture.)"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, Env, RemoteEnv, make_tree

pytestmark = pytest.mark.slow

CLI = Callable[..., CliResult]
HOST = "testhost"
MiB = 1024**2


@pytest.fixture
def dest(env: Env, monkeypatch: pytest.MonkeyPatch) -> RemoteEnv:
    root = env.tmp / "nas" / "backups"
    root.mkdir(parents=True)
    monkeypatch.setenv("CLOUDBACKUP_DEST", root.as_uri())
    return RemoteEnv("dir", root=root)


def tree(env: Env, name: str, big: int = 0) -> Path:
    files: dict[str, bytes | str] = {f"docs/{i}.txt": f"line {i}\n" * 40 for i in range(10)}
    if big:
        files["big.bin"] = os.urandom(big)
    return make_tree(env.tmp / name, files)


def backup(cli: CLI, *args: Any) -> dict[str, Any]:
    result = cli("backup", "--json", *args)
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_the_bucket_layout_on_disk_and_the_same_upload_record(
    env: Env, cli: CLI, dest: RemoteEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_PART_SIZE", "5MiB")
    doc = backup(cli, tree(env, "www", big=12 * MiB))
    (row,) = doc["results"]
    assert row["uploaded"] is True
    ident = row["id"]
    (archive,) = env.archives("www")
    assert dest.keys() == sorted(
        [
            f"cloudbackup/{HOST}/.host-id",
            f"cloudbackup/{HOST}/www/{archive.name}",
            f"cloudbackup/{HOST}/www/{ident}.index.zst",
            f"cloudbackup/{HOST}/www/{ident}.manifest.json",
        ]
    )
    assert dest.get(f"cloudbackup/{HOST}/www/{archive.name}") == archive.read_bytes()
    remote_manifest = json.loads(dest.get(f"cloudbackup/{HOST}/www/{ident}.manifest.json"))
    upload = remote_manifest["upload"]
    assert (upload["part_size"], upload["part_count"]) == (5 * MiB, 3)
    assert upload["checksum_algorithm"] == "SHA256" and upload["checksum"].endswith("-3")
    assert remote_manifest["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    local_record = json.loads((env.source_dir("www") / f"{ident}.upload.json").read_text())
    assert local_record["checksum"] == upload["checksum"] and local_record["verified_at"]
    assert dest.uploads() == []
    assert dest.root is not None
    assert not [p for p in dest.root.rglob(".~*")], "a temp file or upload left behind"
    # Nothing is ever overwritten: the next backup gets its own files.
    assert cli("backup", tree(env, "www")).exit_code == 0
    assert dest.get(f"cloudbackup/{HOST}/www/{archive.name}") == archive.read_bytes()


def test_verify_re_hashes_and_catches_tampering(env: Env, cli: CLI, dest: RemoteEnv) -> None:
    doc = backup(cli, tree(env, "www", big=MiB))
    ident = doc["results"][0]["id"]
    verified = cli("verify", "--where", "remote", "--json")
    assert verified.exit_code == 0, verified.stdout
    (ok,) = json.loads(verified.stdout)["results"]
    assert ok["ok"] and "re-hashed" in ok["detail"]
    deep = cli("verify", "--where", "remote", "--deep", "--json")
    assert deep.exit_code == 0 and "files" in json.loads(deep.stdout)["results"][0]["detail"]

    (key,) = [k for k in dest.keys() if k.endswith(".tar.zst")]
    body = bytearray(dest.get(key))
    body[len(body) // 3] ^= 0x01  # one bit, same size: only the bytes can tell
    dest.put(key, bytes(body))
    for extra in ((), ("--deep",)):
        tampered = cli("verify", "--where", "remote", "--json", *extra, ident)
        assert tampered.exit_code == 3, tampered.stdout
        (outcome,) = json.loads(tampered.stdout)["results"]
        assert not outcome["ok"] and "sha256" in outcome["detail"]
    dest.put(key, b"short")
    short = cli("verify", "--where", "remote", "--json", ident)
    assert short.exit_code == 3 and "size" in json.loads(short.stdout)["results"][0]["detail"]


def test_check_probes_the_destination_and_leaves_nothing(
    env: Env, cli: CLI, dest: RemoteEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(tree(env, "www")))
    result = cli("check", "--json")
    assert result.exit_code == 0, result.stdout
    lines = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert lines["destination list"]["ok"] and "file://" in lines["destination list"]["detail"]
    assert lines["destination write"]["ok"]
    assert "nothing left behind" in lines["destination write"]["detail"]
    assert "unclaimed" in lines["host claim"]["detail"]
    assert dest.root is not None and list(dest.root.iterdir()) == []

    monkeypatch.setenv("CLOUDBACKUP_DEST", (dest.root / "unmounted").as_uri())
    missing = cli("check", "--json")
    assert missing.exit_code == 1
    lines = {c["check"]: c for c in json.loads(missing.stdout)["checks"]}
    assert not lines["destination list"]["ok"]
    assert "does not exist" in lines["destination list"]["detail"]
    assert not (dest.root / "unmounted").exists()


@pytest.mark.parametrize(
    ("variables", "culprit"),
    [
        ({"CLOUDBACKUP_S3_BUCKET": "my-bucket"}, "CLOUDBACKUP_S3_BUCKET"),
        ({"CLOUDBACKUP_S3_OBJECT_LOCK": "governance:30d"}, "Object Lock"),
        ({"CLOUDBACKUP_DEST": "s3://bucket/prefix"}, "file://"),
        ({"CLOUDBACKUP_DEST": "file://nas/backups"}, "CLOUDBACKUP_DEST"),
        ({"CLOUDBACKUP_DEST": "file:relative/path"}, "CLOUDBACKUP_DEST"),
        ({"CLOUDBACKUP_DEST": "file:///"}, "CLOUDBACKUP_DEST"),
        ({"CLOUDBACKUP_DEST": "file:///mnt/../etc"}, "CLOUDBACKUP_DEST"),
    ],
)
def test_settings_refused_with_a_directory_destination(
    env: Env,
    cli: CLI,
    dest: RemoteEnv,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    culprit: str,
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    result = cli("backup", tree(env, "www"))
    assert result.exit_code == 2
    result.assert_one_error(culprit)
    assert env.archives("www") == []


def test_a_link_planted_in_the_destination_is_never_followed(
    env: Env, cli: CLI, dest: RemoteEnv
) -> None:
    elsewhere = env.tmp / "elsewhere"
    elsewhere.mkdir()
    assert dest.root is not None
    (dest.root / "cloudbackup").mkdir()
    (dest.root / "cloudbackup" / HOST).symlink_to(elsewhere)
    result = cli("backup", "--json", tree(env, "www"))
    assert result.exit_code == 1
    line = result.assert_one_error("symlink")
    assert "never followed" in line or "local archive is kept" in line
    assert list(elsewhere.iterdir()) == []
    assert len(env.archives("www")) == 1  # kept locally: `upload` sends it later
    (dest.root / "cloudbackup" / HOST).unlink()
    uploaded = cli("upload", "--json")
    assert uploaded.exit_code == 0, uploaded.stderr
    assert [r["ok"] for r in json.loads(uploaded.stdout)["results"]] == [True]


def test_an_unmounted_destination_keeps_the_local_archive_and_is_never_created(
    env: Env, cli: CLI, dest: RemoteEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dest.root is not None
    unmounted = dest.root / "mnt-not-there"
    monkeypatch.setenv("CLOUDBACKUP_DEST", unmounted.as_uri())
    result = cli("backup", tree(env, "www"))
    assert result.exit_code == 1
    result.assert_one_error("does not exist", "mount")
    assert len(env.archives("www")) == 1 and not unmounted.exists()
    status = cli("status")
    assert status.exit_code == 3  # the destination cannot be listed
