"""The remote store protocol, pinned: every test runs against S3Store (the session's moto
server, through the fault proxy) and DirectoryStore (a tmp dir), as restic tests its
backends. Then what only the directory destination has to prove: nothing under it is ever
followed through a link, and a part changed on disk is never published."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.core.errors import (
    IntegrityError,
    NotFound,
    PermanentStorageError,
    TransientStorageError,
)
from cloudbackup.storage.base import (
    PartInfo,
    UploadInfo,
    UploadSpec,
    VerifyMethod,
    checksums_match,
    composite_checksum,
    sha256_b64,
)
from cloudbackup.storage.directory import DirectoryStore
from cloudbackup.storage.parts import MultipartStore
from cloudbackup.storage.retry import RetryPolicy
from cloudbackup.storage.s3 import S3Store, make_client
from tests.conftest import S3Env
from tests.s3_helpers import Fault, FaultProxy, Sleeps
from tests.test_s3_unit import Writer

MiB = 1024**2
PART = 5 * MiB  # S3's smallest part


@dataclass
class StoreEnv:
    kind: str  # "s3" | "dir"
    store: S3Store | DirectoryStore
    sleeps: Sleeps
    break_next_read: Callable[[], None]  # the next GET body breaks half-way
    reads: Callable[[], list[int]]  # the offset each GET (or reopen) started at
    root: Path | None = None
    proxy: FaultProxy | None = None


@pytest.fixture(params=["s3", "dir"])
def store_env(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreEnv]:
    sleeps = Sleeps()
    policy = RetryPolicy(attempts=3, sleep=sleeps)
    if request.param == "s3":
        s3_env: S3Env = request.getfixturevalue("s3_env")
        with FaultProxy(s3_env.endpoint) as proxy:
            client = make_client(endpoint_url=proxy.endpoint, compat=False)
            store = S3Store(client, s3_env.bucket, policy=policy, concurrency=2, part_size=PART)

            def s3_reads() -> list[int]:
                offsets = []
                for r in proxy.requests("GetObject"):
                    ranged = r.headers.get("range", "bytes=0-")
                    offsets.append(int(ranged[6:].split("-")[0]))
                return offsets

            yield StoreEnv(
                "s3",
                store,
                sleeps,
                lambda: proxy.inject(Fault("truncate", operation="GetObject")),
                s3_reads,
                proxy=proxy,
            )
        return
    from cloudbackup.storage import directory

    root = tmp_path / "dest"
    root.mkdir()
    offsets: list[int] = []
    armed: list[bool] = []
    real_read = directory._FileBody.read

    def read(self: Any, size: int = -1, /) -> bytes:
        if armed and self.handle.tell() >= os.fstat(self.handle.fileno()).st_size // 2:
            armed.clear()
            raise self.error(OSError(errno.EIO, "Input/output error"))
        return real_read(self, size)

    real_init = directory._FileBody.__init__

    def init(self: Any, handle: Any, error: Any) -> None:
        offsets.append(handle.tell())
        real_init(self, handle, error)

    monkeypatch.setattr(directory._FileBody, "read", read)
    monkeypatch.setattr(directory._FileBody, "__init__", init)
    store_ = DirectoryStore(root, policy=policy, concurrency=2, part_size=PART)
    yield StoreEnv("dir", store_, sleeps, lambda: armed.append(True), lambda: offsets, root)


def data_of(size: int, seed: int = 0) -> bytes:
    """Bytes where every 5 MiB part differs (a reused part cannot match by accident)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    data = bytearray((block * (size // len(block) + 1))[:size])
    for offset in range(0, size, PART):
        data[offset : offset + 8] = offset.to_bytes(8, "big")
    return bytes(data)


def parts_of(data: bytes) -> list[bytes]:
    return [data[i : i + PART] for i in range(0, len(data), PART)]


def upload(store: MultipartStore, key: str, path: Path, **kwargs: Any) -> Any:
    with path.open("rb") as file:
        return store.upload_file(key, file, kwargs.pop("spec", UploadSpec()), **kwargs)


# ---------------------------------------------------------------- objects


def test_put_get_head_list_delete(store_env: StoreEnv) -> None:
    store = store_env.store
    store.put_bytes("p/h/s/a.json", b'{"a": 1}')
    assert store.get_bytes("p/h/s/a.json") == b'{"a": 1}'
    head = store.head("p/h/s/a.json")
    assert head is not None and head.key == "p/h/s/a.json" and head.size == 8
    assert store.head("p/h/s/missing.json") is None
    (info,) = list(store.list("p/"))
    assert (info.key, info.size) == ("p/h/s/a.json", 8) and isinstance(info.modified, datetime)
    store.delete("p/h/s/a.json")
    assert list(store.list("p/")) == [] and store.head("p/h/s/a.json") is None
    store.delete("p/h/s/a.json")  # deleting what is gone is fine
    with pytest.raises(NotFound):
        store.get_bytes("p/h/s/a.json")


def test_a_write_never_overwrites(store_env: StoreEnv) -> None:
    store = store_env.store
    store.put_bytes("p/h/.host-id", b"first\n")
    with pytest.raises(PermanentStorageError) as caught:
        store.put_bytes("p/h/.host-id", b"second\n")
    assert caught.value.code == "PreconditionFailed"
    assert store.get_bytes("p/h/.host-id") == b"first\n"


def test_list_by_prefix_in_key_order(store_env: StoreEnv) -> None:
    store = store_env.store
    keys = ["a/b/x2", "a/b/x1", "a/bc/y", "a/c", "a/b.d", "b/z"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("")] == sorted(keys)
    assert [o.key for o in store.list("a/b")] == ["a/b.d", "a/b/x1", "a/b/x2", "a/bc/y"]
    assert [o.key for o in store.list("a/b/")] == ["a/b/x1", "a/b/x2"]
    assert [o.key for o in store.list("a/b/x1")] == ["a/b/x1"]
    assert list(store.list("nothing/")) == []


def test_s3_lists_in_pages(s3_env: S3Env) -> None:
    """(A directory is listed whole; S3 one page per ``list_page_size`` objects.)"""
    with FaultProxy(s3_env.endpoint) as proxy:
        client = make_client(endpoint_url=proxy.endpoint, compat=False)
        store = S3Store(client, s3_env.bucket)
        store.list_page_size = 2
        for n in range(5):
            store.put_bytes(f"k/{n}", b"x")
        proxy.clear()
        assert [o.key for o in store.list("k/")] == [f"k/{n}" for n in range(5)]
        assert proxy.count("ListObjectsV2") == 3


def test_key_names_and_capabilities(store_env: StoreEnv) -> None:
    store = store_env.store
    if isinstance(store, S3Store):
        assert store.describe("p/h/k") == f"s3://{store.bucket}/p/h/k"
        assert store.verify_method is VerifyMethod.HEAD and store.keeps_metadata
    else:
        assert store_env.root is not None
        assert store.describe("p/h/k") == f"file://{store_env.root}/p/h/k"
        assert store.verify_method is VerifyMethod.REHASH and not store.keeps_metadata
    assert store.where == "remote"


# ---------------------------------------------------------------- streaming reads


def test_open_streams_the_object(store_env: StoreEnv) -> None:
    data = os.urandom(3 * MiB + 17)
    store_env.store.put_bytes("o/big", data)
    with store_env.store.open("o/big", size=len(data)) as body:
        chunks = list(iter(lambda: body.read(256 * 1024), b""))
    assert b"".join(chunks) == data and len(chunks) > 1
    with pytest.raises(NotFound):
        store_env.store.open("o/missing")


def test_open_resumes_from_the_offset_reached_after_a_mid_body_failure(
    store_env: StoreEnv,
) -> None:
    data = os.urandom(2 * MiB + 5)
    store_env.store.put_bytes("o/big", data)
    store_env.break_next_read()
    with store_env.store.open("o/big") as body:
        got = b"".join(iter(lambda: body.read(64 * 1024), b""))
    assert got == data
    first, again = store_env.reads()[-2:]
    assert first == 0 and 0 < again < len(data)  # asked again from where it broke
    assert len(store_env.sleeps.waits) == 1


def test_a_read_that_keeps_failing_gives_up_after_the_policy_attempts(
    store_env: StoreEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_env.store.put_bytes("o/k", b"x" * 1000)

    class Broken:
        def read(self, size: int = -1, /) -> bytes:
            raise TransientStorageError("reset")

        def close(self) -> None:
            pass

    body = store_env.store.open("o/k")
    body.body = Broken()  # type: ignore[attr-defined]
    monkeypatch.setattr(body, "opener", lambda offset: Broken())
    with pytest.raises(TransientStorageError, match="gave up after 3 attempts"):
        body.read(10)


# ---------------------------------------------------------------- multipart


def test_a_file_goes_up_in_parts_with_the_composite_checksum(
    store_env: StoreEnv, tmp_path: Path
) -> None:
    data = data_of(11 * MiB)
    path = tmp_path / "a"
    path.write_bytes(data)
    created: list[tuple[str, int]] = []
    outcome = upload(
        store_env.store,
        "p/h/s/a.tar.zst",
        path,
        on_created=lambda uid, size: created.append((uid, size)),
    )
    assert (outcome.part_count, outcome.part_size, outcome.parts_sent) == (3, PART, 3)
    assert outcome.checksum == composite_checksum([sha256_b64(p) for p in parts_of(data)])
    assert created and created[0][1] == PART
    assert store_env.store.get_bytes("p/h/s/a.tar.zst") == data
    assert store_env.store.list_uploads("p/") == []
    if outcome.sha256 is not None:  # a store that hashed the object as it wrote it
        assert outcome.sha256 == hashlib.sha256(data).hexdigest()


def test_a_small_file_is_one_write(store_env: StoreEnv, tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(b"small archive")
    outcome = upload(store_env.store, "p/h/s/small.tar", path)
    assert outcome.part_count == 1 and outcome.checksum == sha256_b64(b"small archive")
    assert store_env.store.get_bytes("p/h/s/small.tar") == b"small archive"


class Interrupted(Exception):
    pass


def test_an_interrupted_upload_resumes_reusing_only_the_parts_that_match(
    store_env: StoreEnv, tmp_path: Path
) -> None:
    store = store_env.store
    path = tmp_path / "a"
    path.write_bytes(data_of(17 * MiB))  # 4 parts
    created: list[tuple[str, int]] = []
    sent = 0

    def crash_after_two(n: int) -> None:
        nonlocal sent
        sent += 1
        if sent == 2:
            raise Interrupted

    store.concurrency = 1
    with pytest.raises(Interrupted):
        upload(
            store,
            "p/h/s/a",
            path,
            on_created=lambda uid, size: created.append((uid, size)),
            progress=crash_after_two,
        )
    ((upload_id, part_size),) = created
    (info,) = store.list_uploads("p/h/")
    assert info == UploadInfo("p/h/s/a", upload_id, info.initiated)
    assert isinstance(info.initiated, datetime)
    listed = store.list_parts("p/h/s/a", upload_id)
    assert [(p.number, p.size) for p in listed] == [(1, PART), (2, PART)]
    for part, data in zip(listed, parts_of(path.read_bytes()), strict=False):
        assert isinstance(part, PartInfo)
        assert part.checksum_sha256 in (None, sha256_b64(data))  # moto keeps none
    # Part 2's bytes change locally: it must be sent again; part 1 is reused.
    data = bytearray(path.read_bytes())
    data[PART + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    outcome = upload(store, "p/h/s/a", path, upload_id=upload_id, part_size=part_size)
    assert (outcome.parts_reused, outcome.parts_sent) == (1, 3)
    assert store.get_bytes("p/h/s/a") == bytes(data)
    head = store.head("p/h/s/a")
    assert head is not None and head.size == len(data)
    assert outcome.checksum == composite_checksum([sha256_b64(p) for p in parts_of(bytes(data))])
    assert store.list_uploads("p/") == []


def test_resuming_a_finished_upload_sends_nothing(store_env: StoreEnv, tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_bytes(data_of(11 * MiB))
    first = upload(store_env.store, "p/h/s/a", path)
    assert first.upload_id is not None
    again = upload(store_env.store, "p/h/s/a", path, upload_id=first.upload_id, part_size=PART)
    assert again.already_present and again.parts_sent == 0
    assert checksums_match(again.checksum, first.checksum)


def test_abort_removes_the_upload_and_is_idempotent(store_env: StoreEnv) -> None:
    store = store_env.store
    upload_id = store.create_upload("p/h/s/a", UploadSpec())
    assert [u.upload_id for u in store.list_uploads("p/h/s/a")] == [upload_id]
    store.abort("p/h/s/a", upload_id)
    assert store.list_uploads("p/") == []
    store.abort("p/h/s/a", upload_id)  # gone already: fine
    with pytest.raises(PermanentStorageError) as caught:
        store.list_parts("p/h/s/a", upload_id)
    assert caught.value.code in ("NoSuchUpload", "NoSuchKey", "404", "NotFound")
    assert list(store.list("p/")) == []  # nothing was ever published


def test_complete_never_overwrites_and_accepts_only_the_same_bytes(
    store_env: StoreEnv, tmp_path: Path
) -> None:
    store = store_env.store
    data = data_of(11 * MiB)
    path = tmp_path / "a"
    path.write_bytes(data)
    upload(store, "p/h/s/same", path)
    store.put_bytes("p/h/s/other", b"someone else's object")
    # The same bytes already there: accepted (a retried complete), nothing left over.
    outcome = upload(store, "p/h/s/same", path)
    assert store.get_bytes("p/h/s/same") == data and outcome.part_count == 3
    # Different bytes: refused, the object untouched; the upload is left for an operator
    # to look into (the stale-upload sweep aborts it after 7 days).
    with pytest.raises(PermanentStorageError, match="already exists and differs"):
        upload(store, "p/h/s/other", path)
    assert store.get_bytes("p/h/s/other") == b"someone else's object"
    assert [u.key for u in store.list_uploads("p/")] == ["p/h/s/other"]


def test_a_growing_file_is_sent_as_it_grows(store_env: StoreEnv, tmp_path: Path) -> None:
    store = store_env.store
    data = data_of(17 * MiB)
    writer = Writer(tmp_path / "growing", data)
    sent: list[int] = []
    result: list[Any] = []
    uploader = threading.Thread(
        target=lambda: result.append(
            store.upload_growing("p/h/s/g", writer.tail, UploadSpec(), PART, progress=sent.append)
        )
    )
    uploader.start()
    writer.write_to(11 * MiB)
    deadline = 100
    while len(sent) < 2 and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert sent[:2] == [PART, PART]  # parts 1 and 2 left before the file was complete
    writer.finish()
    uploader.join(30)
    (parts,) = result
    assert parts.count == 4
    outcome = store.complete_parts("p/h/s/g", parts, len(data), PART, UploadSpec())
    assert store.get_bytes("p/h/s/g") == data
    assert outcome.checksum == composite_checksum([sha256_b64(p) for p in parts_of(data)])


def test_a_growing_file_of_one_part_creates_nothing(store_env: StoreEnv, tmp_path: Path) -> None:
    writer = Writer(tmp_path / "small", b"z" * PART)
    writer.finish()
    assert store_env.store.upload_growing("p/h/s/z", writer.tail, UploadSpec(), PART) is None
    assert store_env.store.list_uploads("p/") == []


def test_a_write_probe_leaves_nothing_behind(store_env: StoreEnv) -> None:
    store = store_env.store
    probe = store.probe_write("p/h/.cloudbackup-check-1", UploadSpec())
    assert probe.how and probe.refused == ()
    assert list(store.list("")) == [] and store.list_uploads("") == []
    if store_env.root is not None:
        assert list(store_env.root.iterdir()) == []  # not even a directory


# ---------------------------------------------------------------- the directory, hostile


@pytest.fixture
def dest(tmp_path: Path) -> tuple[DirectoryStore, Path, Path]:
    root = tmp_path / "dest"
    victim = tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "secret").write_text("not yours")
    return DirectoryStore(root, policy=RetryPolicy(attempts=1)), root, victim


def test_a_symlinked_directory_under_the_destination_is_never_followed(
    dest: tuple[DirectoryStore, Path, Path],
) -> None:
    store, root, victim = dest
    (root / "p").mkdir()
    (root / "p" / "h").symlink_to(victim)
    assert list(store.list("")) == [] and store.head("p/h/secret") is None
    with pytest.raises(PermanentStorageError) as caught:
        store.put_bytes("p/h/s/x.json", b"{}")
    assert caught.value.code == "NotFollowed" and "symlink" in str(caught.value)
    with pytest.raises(PermanentStorageError):
        store.get_bytes("p/h/secret")
    with pytest.raises(PermanentStorageError):
        store.create_upload("p/h/s/a", UploadSpec())
    assert sorted(p.name for p in victim.iterdir()) == ["secret"]


def test_a_symlinked_file_is_not_an_object(dest: tuple[DirectoryStore, Path, Path]) -> None:
    store, root, victim = dest
    (root / "p").mkdir()
    (root / "p" / "m.json").symlink_to(victim / "secret")
    assert list(store.list("")) == [] and store.head("p/m.json") is None
    with pytest.raises(PermanentStorageError):
        store.get_bytes("p/m.json")
    with pytest.raises(PermanentStorageError) as caught:  # never written through either
        store.put_bytes("p/m.json", b"{}")
    assert caught.value.code == "PreconditionFailed"
    assert (victim / "secret").read_text() == "not yours"


def test_keys_never_leave_the_destination(dest: tuple[DirectoryStore, Path, Path]) -> None:
    store, _, victim = dest
    for key in ("../victim/secret", "p/../../victim/x", "/abs", "p//x", "p/.~upload-x/name"):
        with pytest.raises(PermanentStorageError, match="bad key"):
            store.put_bytes(key, b"x")
    assert sorted(p.name for p in victim.iterdir()) == ["secret"]


def test_a_missing_destination_is_never_created(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "not-mounted", policy=RetryPolicy(attempts=1))
    with pytest.raises(PermanentStorageError) as caught:
        store.put_bytes("p/h/.host-id", b"m\n")
    assert caught.value.code == "NoSuchDestination" and "mount" in str(caught.value)
    assert not (tmp_path / "not-mounted").exists()


def test_a_part_changed_on_disk_is_never_published(
    dest: tuple[DirectoryStore, Path, Path], tmp_path: Path
) -> None:
    store, root, _ = dest
    path = tmp_path / "a"
    path.write_bytes(data_of(11 * MiB))
    created: list[str] = []

    def tamper(n: int) -> None:
        if len(created) == 1 and n:
            (part,) = root.rglob(".~upload-*/part-00001")
            part.write_bytes(b"tampered" + part.read_bytes()[8:])
            created.append("done")

    store.concurrency = 1
    with pytest.raises(IntegrityError, match="part 1 changed"):
        upload(
            store,
            "p/h/s/a",
            path,
            on_created=lambda uid, size: created.append(uid),
            progress=tamper,
        )
    assert store.head("p/h/s/a") is None
    assert [
        p.name for p in (root / "p" / "h" / "s").iterdir() if not p.name.startswith(".~up")
    ] == []


def test_a_transient_disk_error_is_retried(
    dest: tuple[DirectoryStore, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = dest
    sleeps = Sleeps()
    store.policy = RetryPolicy(attempts=3, sleep=sleeps)
    from cloudbackup.fs import dirs

    real = dirs.Dir.write_atomic
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky(self: Any, *args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        real(self, *args, **kwargs)

    monkeypatch.setattr(dirs.Dir, "write_atomic", flaky)
    store.put_bytes("p/k", b"v")
    assert store.get_bytes("p/k") == b"v" and len(sleeps.waits) == 1


def test_a_file_planted_among_the_parts_does_not_fail_a_complete_upload(
    dest: tuple[DirectoryStore, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The object is published before the parts are removed: a leftover is a warning."""
    store, root, _ = dest
    path = tmp_path / "a"
    path.write_bytes(data_of(11 * MiB))

    def plant(upload_id: str, part_size: int) -> None:
        (root / "p" / "h" / "s" / f".~upload-{upload_id}" / "planted").write_text("x")

    outcome = upload(store, "p/h/s/a", path, on_created=plant)
    assert outcome.part_count == 2 and store.get_bytes("p/h/s/a") == path.read_bytes()
    assert "cannot remove the parts of the finished upload" in caplog.text
