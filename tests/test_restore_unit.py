"""Unit tests of cloudbackup.restore: --at parsing, choosing the backup from listings,
the pipeline (streamed, hashed, resumed, checked), the on-disk tally, workspaces and results."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cloudbackup import config
from cloudbackup.context import Context
from cloudbackup.core.errors import (
    ConfigError,
    IntegrityError,
    PermanentStorageError,
    TransientStorageError,
    UsageError,
)
from cloudbackup.core.model import BackupId, archive_name, manifest_name
from cloudbackup.fs.tree import remove_tree, tally_tree
from cloudbackup.restore.apply import RestoreResult
from cloudbackup.restore.pipeline import (
    Fetch,
    InlineStage,
    Pipeline,
    ProcessStage,
    Stages,
    ThreadStage,
)
from cloudbackup.restore.select import find_backup, parse_at
from cloudbackup.restore.targets import Workspace as _Workspace
from cloudbackup.restore.targets import aside_name as _aside_name
from cloudbackup.restore.targets import regular_member as _regular_member
from cloudbackup.storage.base import ObjectInfo
from cloudbackup.storage.local import LocalStore
from cloudbackup.storage.retry import ResumingReader, RetryPolicy

NOW = datetime(2026, 11, 21, 2, 15, tzinfo=UTC)


# ---------------------------------------------------------------- --at


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T00:00:00Z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01t00:00:00z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T02:30:00+02:00", datetime(2026, 11, 1, 0, 30, tzinfo=UTC)),
        ("2026-11-01T00:30:00-01:00", datetime(2026, 11, 1, 1, 30, tzinfo=UTC)),
        ("2026-11-01T00:00:00.5Z", datetime(2026, 11, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-01", datetime(2026, 11, 1, 23, 59, 59, tzinfo=UTC)),
        (" 2026-02-28 ", datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_parse_at(text: str, expected: datetime) -> None:
    assert parse_at(text) == expected


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-11-01T00:00:00", "2026-02-30", "2026-11-01 00:00", "12:00Z"]
)
def test_parse_at_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_at(text)
    assert info.value.exit_code == 2
    assert "--at" in str(info.value)


# ---------------------------------------------------------------- choosing


class FakeRemote:
    """Just enough of a remote store for listing."""

    where = "remote"

    def __init__(self, keys: list[str], fail: bool = False) -> None:
        self.keys = keys
        self.fail = fail

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if self.fail:
            raise PermanentStorageError("s3://b: list: AccessDenied", code="AccessDenied")
        for key in self.keys:
            if key.startswith(prefix):
                yield ObjectInfo(key, 10, NOW)


def make_ctx(tmp_path: Path, remote: Any = None, host: str = "here") -> Context:
    settings = config.load(
        {},
        {"CLOUDBACKUP_LOCAL_DIR": str(tmp_path / "local"), "CLOUDBACKUP_HOST": host},
        {},
        hostname="unused",
        home=tmp_path,
    )
    return Context(
        settings=settings,
        local=LocalStore(settings.local_dir),
        now=lambda: NOW,
        machine_id="m",
        remote=remote,
    )


def local_backup(tmp_path: Path, host: str, backup_id: str) -> None:
    bid = BackupId.parse(backup_id)
    directory = tmp_path / "local" / host / bid.source
    directory.mkdir(parents=True, exist_ok=True)
    (directory / archive_name(bid, "zstd")).write_bytes(b"x")
    (directory / manifest_name(bid)).write_bytes(b"{}")


def remote_keys(host: str, *ids: str) -> list[str]:
    keys = []
    for text in ids:
        bid = BackupId.parse(text)
        keys += [
            f"cloudbackup/{host}/{bid.source}/{archive_name(bid, 'zstd')}",
            f"cloudbackup/{host}/{bid.source}/{manifest_name(bid)}",
        ]
    return keys


def test_find_newest_across_local_and_remote(tmp_path: Path) -> None:
    local_backup(tmp_path, "here", "www-20261119T000000Z")
    remote = FakeRemote(
        remote_keys("here", "www-20261119T000000Z", "www-20261120T000000Z")
        + remote_keys("here", "www-20261120T000000Z-2")
        + remote_keys("here", "other-20261125T000000Z")
    )
    ctx = make_ctx(tmp_path, remote)
    newest = find_backup(ctx, "www", host="here")
    assert newest.id == "www-20261120T000000Z-2"  # same second: the -2 is newer
    assert newest.local is None and newest.remote is not None
    both = find_backup(ctx, "www-20261119T000000Z", host="here")
    assert both.local is not None and both.remote is not None
    at = find_backup(ctx, "www", host="here", at=datetime(2026, 11, 19, 12, tzinfo=UTC))
    assert at.id == "www-20261119T000000Z"
    local_only = find_backup(ctx, "www", host="here", from_="local")
    assert local_only.id == "www-20261119T000000Z"


def test_find_on_a_fresh_machine_needs_no_local_dir(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, FakeRemote(remote_keys("old", "db-20261101T000000Z")))
    assert find_backup(ctx, "db", host="old").remote is not None
    assert not (tmp_path / "local").exists()


def test_find_errors(tmp_path: Path) -> None:
    remote = FakeRemote(
        remote_keys("web1", "www-20261120T000000Z") + remote_keys("web2", "www-20261121T000000Z")
    )
    ctx = make_ctx(tmp_path, remote)
    with pytest.raises(UsageError, match=r"source www not found for host here; hosts with it: "):
        find_backup(ctx, "www", host="here")
    with pytest.raises(UsageError, match="web1, web2 — pass --host"):
        find_backup(ctx, "www", host="here")
    with pytest.raises(UsageError, match="backup www-20261120T000000Z not found for host web2"):
        find_backup(ctx, "www-20261120T000000Z", host="web2")
    with pytest.raises(UsageError, match="source nothing not found"):
        find_backup(ctx, "nothing", host="web1")
    with pytest.raises(UsageError, match="at or before 2026-11-19T00:00:00Z"):
        find_backup(ctx, "www", host="web1", at=datetime(2026, 11, 19, tzinfo=UTC))
    with pytest.raises(UsageError, match="not a source name"):
        find_backup(ctx, "../etc", host="web1")
    with pytest.raises(UsageError, match="--from remote needs a bucket"):
        find_backup(make_ctx(tmp_path), "www", host="web1", from_="remote")


def test_unlistable_bucket_falls_back_to_local_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local_backup(tmp_path, "here", "www-20261119T000000Z")
    ctx = make_ctx(tmp_path, FakeRemote([], fail=True))
    with caplog.at_level(logging.WARNING, logger="cloudbackup"):
        logging.getLogger("cloudbackup").propagate = True
        try:
            assert find_backup(ctx, "www", host="here").id == "www-20261119T000000Z"
        finally:
            logging.getLogger("cloudbackup").propagate = False
    assert "cannot list the bucket" in caplog.text
    with pytest.raises(PermanentStorageError):
        find_backup(ctx, "www", host="here", from_="remote")


# ---------------------------------------------------------------- downloads


class Body:
    def __init__(self, data: bytes, fail_at: int | None = None, chunk: int = 7_777) -> None:
        self.data, self.pos, self.fail_at, self.chunk = data, 0, fail_at, chunk

    def read(self, size: int = -1, /) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise TransientStorageError("connection reset by peer")
        step = min(size if size >= 0 else len(self.data), self.chunk)
        out = self.data[self.pos : self.pos + step]
        self.pos += len(out)
        return out

    def close(self) -> None:
        pass


class DataRemote:
    """A store whose streams resume as every store's do (``ResumingReader`` under a retry
    policy); the first ``failures`` bodies break mid-stream."""

    def __init__(
        self, data: bytes, failures: int = 0, attempts: int = 3, stuck: bool = False
    ) -> None:
        self.data = data
        self.failures = failures
        self.stuck = stuck  # every body after the first breaks before its first byte
        self.opens: list[int] = []  # the offset of each request
        self.slept: list[float] = []
        self.policy = RetryPolicy(attempts=attempts, sleep=self.slept.append)

    def describe(self, key: str) -> str:
        return f"test://{key}"

    def open(self, key: str, *, size: int | None = None) -> ResumingReader:
        def opener(offset: int) -> Body:
            self.opens.append(offset)
            body = Body(self.data)
            body.pos = offset
            if len(self.opens) <= self.failures:
                stuck = self.stuck and len(self.opens) > 1
                body.fail_at = offset + (0 if stuck else len(self.data) // 4)
            return body

        return ResumingReader(opener, self.policy, f"get {key}")


DATA = os.urandom(300_000)
DIGEST = hashlib.sha256(DATA).hexdigest()


def fetch_archive(
    remote: DataRemote,
    key: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    progress: Any = None,
    stages: Any = (),
) -> Stages:
    """The bytes of ``key`` through the restore pipeline into the file ``dest`` (a
    consumer that writes what it reads), checked at the end: IntegrityError, and the
    file removed, unless they are what the manifest says."""
    clock = Stages()
    fetch = Fetch(
        lambda: remote.open(key, size=size),  # type: ignore[arg-type,return-value]
        size=size,
        sha256=sha256,
        describe=remote.describe(key),
        stages=clock,
        progress=progress,
    )
    try:
        with Pipeline(fetch, list(stages), clock) as pipe, dest.open("xb") as out:
            try:
                while chunk := pipe.stream.read(4096):
                    out.write(chunk)
                pipe.finish()
            except BaseException as exc:
                error = pipe.explain(exc)
                if error is exc:
                    raise
                raise error from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return clock


def test_pipeline_streams_and_verifies(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    seen: list[int] = []
    clock = fetch_archive(DataRemote(DATA), "k", dest, size=len(DATA), sha256=DIGEST, progress=seen.append)
    assert dest.read_bytes() == DATA and sum(seen) == len(DATA)
    assert set(clock.as_dict()) == {"read", "hash"}


def test_pipeline_inline_stage_transforms_and_is_timed(tmp_path: Path) -> None:
    import zlib

    packed = zlib.compress(DATA)

    class Inflate:
        def __init__(self, up: Any) -> None:
            self.up, self.d = up, zlib.decompressobj()

        def read(self, size: int = -1) -> bytes:
            while True:
                chunk = self.up.read(1000)
                if not chunk:
                    return self.d.flush()
                out = self.d.decompress(chunk)
                if out:
                    return out

    dest = tmp_path / "d"
    clock = fetch_archive(
        DataRemote(packed),
        "k",
        dest,
        size=len(packed),
        sha256=hashlib.sha256(packed).hexdigest(),
        stages=[InlineStage("inflate", Inflate)],
    )
    assert dest.read_bytes() == DATA
    assert list(clock.as_dict()) == ["inflate", "read", "hash"] or "inflate" in clock.as_dict()


def test_pipeline_resumes_from_the_offset_reached_after_a_mid_stream_reset(
    tmp_path: Path,
) -> None:
    remote = DataRemote(DATA, failures=2)
    dest = tmp_path / "d"
    fetch_archive(remote, "k", dest, size=len(DATA), sha256=DIGEST)
    assert dest.read_bytes() == DATA
    # Asked again from where each body broke, not from the start: 0, then 1/4, then 2/4.
    assert remote.opens[0] == 0 and 0 < remote.opens[1] < remote.opens[2] < len(DATA)
    assert len(remote.opens) == 3 and len(remote.slept) == 2
    # A body that breaks and a store that then serves nothing: given up after the
    # policy's attempts (consecutive failures without a byte of progress).
    broken = DataRemote(DATA, failures=5, stuck=True)
    with pytest.raises(TransientStorageError, match="gave up after 3 attempts"):
        fetch_archive(broken, "k", tmp_path / "e", size=len(DATA), sha256=DIGEST)
    assert len(broken.opens) == 3 and not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("size", "digest"),
    [(len(DATA), "0" * 64), (len(DATA) + 1, DIGEST), (len(DATA) - 1, DIGEST)],
)
def test_pipeline_mismatch_is_an_integrity_error(tmp_path: Path, size: int, digest: str) -> None:
    remote = DataRemote(DATA)
    dest = tmp_path / "d"
    with pytest.raises(IntegrityError) as info:
        fetch_archive(remote, "k", dest, size=size, sha256=digest)
    assert info.value.exit_code == 3
    assert not dest.exists() and remote.opens == [0]  # never retried into success


def test_pipeline_never_reads_past_the_manifest_size(tmp_path: Path) -> None:
    """An object longer than its manifest says is refused after one byte more, not read on."""
    remote = DataRemote(DATA * 4)
    read: list[int] = []
    with pytest.raises(IntegrityError, match="more than"):
        fetch_archive(remote, "k", tmp_path / "d", size=1000, sha256=DIGEST, progress=read.append)
    assert sum(read) == 1001


def test_pipeline_consumer_error_stops_the_fetch(tmp_path: Path) -> None:
    """The consumer fails part way: the fetch thread stops (it does not read on into a
    full queue), and the consumer's error is the one raised."""
    clock = Stages()
    remote = DataRemote(DATA * 40)
    fetch = Fetch(
        lambda: remote.open("k"),  # type: ignore[arg-type,return-value]
        size=len(DATA) * 40,
        sha256=DIGEST,
        describe="k",
        stages=clock,
    )
    with pytest.raises(ZeroDivisionError), Pipeline(fetch, [], clock) as pipe:
        try:
            pipe.stream.read(10)
            raise ZeroDivisionError
        except BaseException as exc:
            raise pipe.explain(exc) from None
    assert fetch.done()


# ---------------------------------------------------------------- tally, workspace, results


def test_tally_counts_entries_and_each_inode_once(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a/b").mkdir(parents=True)
    (root / "a/f").write_bytes(b"12345")
    (root / "a/b/g").write_bytes(b"123")
    os.link(root / "a/f", root / "a/b/hard")
    os.symlink("/nowhere", root / "link")
    os.symlink("a", root / "dirlink")
    (root / "empty").mkdir()
    tally = tally_tree(root)
    assert (tally.files, tally.bytes, tally.dirs) == (5, 8, 3)


def test_tally_counts_what_the_listing_types_and_stats_only_files_and_directories(
    tmp_path: Path,
) -> None:
    """A FIFO and symlinks count as entries by their type in the listing; regular files
    add their size (each inode once, however many links), directories count once each,
    at any place in the tree."""
    root = tmp_path / "t"
    (root / "d/e").mkdir(parents=True)
    os.mkfifo(root / "d/fifo")
    (root / "d/e/f").write_bytes(b"x" * 7)
    os.link(root / "d/e/f", root / "f2")
    os.link(root / "d/e/f", root / "d/f3")
    os.symlink("e", root / "d/link")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tally = tally_tree(fd)
    finally:
        os.close(fd)
    assert (tally.files, tally.bytes, tally.dirs) == (5, 7, 2)


def test_remove_tree_handles_read_only_directories(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "ro/inner").mkdir(parents=True)
    (root / "ro/inner/f").write_text("x")
    os.chmod(root / "ro/inner", 0o500)
    os.chmod(root / "ro", 0o500)
    remove_tree(root)
    assert not root.exists()
    remove_tree(root)  # already gone: fine


def test_workspace_removes_only_dead_restores_leftovers(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above the default pid_max: never alive
    stale_dir = tmp_path / f".site.restore-{dead_pid}-abcd1234"
    (stale_dir / "x").mkdir(parents=True)
    stale_file = tmp_path / f".site.cloudbackup-download-{dead_pid}-00ff.partial"
    stale_file.write_bytes(b"x")
    alive = tmp_path / f".site.restore-{os.getpid()}-0000"
    alive.mkdir()
    other = tmp_path / f".other.restore-{dead_pid}-abcd"
    other.mkdir()
    with _Workspace(tmp_path, "site") as ws:
        staging = ws.staging()
        (staging.path / "inner").mkdir()
        made = tmp_path / staging.name
        assert made.is_dir() and os.listdir(made) == ["inner"]
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert not stale_dir.exists() and not stale_file.exists()
    assert alive.exists() and other.exists()
    assert not made.exists()


def test_aside_name_never_reuses_a_name(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = _aside_name(fd, "site", "20261121T021500Z")
        assert first == "site.before-restore-20261121T021500Z"
        (tmp_path / first).mkdir()
        second = _aside_name(fd, "site", "20261121T021500Z")
        assert second == "site.before-restore-20261121T021500Z-2"
        (tmp_path / second).symlink_to("/nowhere")  # a dangling link takes the name too
        assert _aside_name(fd, "site", "20261121T021500Z").endswith("-3")
    finally:
        os.close(fd)


def test_result_dict_and_summary() -> None:
    result = RestoreResult("www-20261121T021500Z", "web1", "www", where_from="remote")
    keys = set(result.to_dict())
    assert {"id", "host", "source", "where_from", "target", "files", "bytes", "refused"} <= keys
    assert {"moved_aside", "seconds", "ok", "exit_code", "detail"} <= keys
    result.detail = "nothing restored"
    assert result.summary().startswith(
        "restore of www-20261121T021500Z (host web1) from remote FAILED"
    )
    result.files, result.detail = 3, "3 files; 1 member(s) refused"
    assert result.summary().startswith("PARTLY restored")
    result.ok = True
    assert result.summary().startswith("restored www-20261121T021500Z")
    result.dry_run = True
    assert result.summary().startswith("dry run:") and result.summary().endswith("nothing written")


# ---------------------------------------------------------------- single-file members


def test_a_single_file_member_must_be_a_regular_file_with_one_name(tmp_path: Path) -> None:
    with _Workspace(tmp_path, "t") as ws:
        held = ws.staging()
        _single_file_members(tmp_path, tmp_path / held.name, held)


def _single_file_members(tmp_path: Path, staging: Path, held: Any) -> None:
    (staging / "ok.out").write_text("data")
    member = _regular_member(held, "ok.out", "a.tar.zst")
    assert member.read_text() == "data" and os.path.samefile(member, staging / "ok.out")
    victim = tmp_path / "passwd"
    victim.write_text("root")
    (staging / "link.out").symlink_to(victim)
    (staging / "dir.out").mkdir()
    (staging / "first").write_text("x")
    os.link(staging / "first", staging / "hard.out")
    os.mkfifo(staging / "fifo.out")
    cases = {
        "link.out": "is a symlink",
        "dir.out": "is a directory",
        "hard.out": "is a hard link (2 names)",
        "fifo.out": "is a special file",
        "missing.out": "holds no regular file missing.out",
    }
    for name, words in cases.items():
        with pytest.raises(IntegrityError, match=re.escape(words)) as caught:
            _regular_member(held, name, "a.tar.zst")
        assert caught.value.exit_code == 3
    assert victim.read_text() == "root"


# ---------------------------------------------------------------- decompression stages


def _zstd_manifest(
    data: bytes, files: int = 1, size: int = 1 << 20, compression: str = "zstd"
) -> Any:
    class M:
        archive = "x.tar.zst"
        file_count = files
        uncompressed_bytes = size

    M.compression = compression  # type: ignore[attr-defined]
    return M


def test_decompression_is_placed_by_the_members_and_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloudbackup.restore import apply

    # By default, by the cores this process may run on (Linux, as the tests run).
    assert apply.SEVERAL_CORES == (len(os.sched_getaffinity(0)) > 1)
    many_small = _zstd_manifest(b"", 50_000, 200_000_000)  # 4 KB on average
    few_small = _zstd_manifest(b"", 1000, 4_000_000)  # a chain's link, say
    large = _zstd_manifest(b"", 10, 4_000_000)
    monkeypatch.setattr(apply, "SEVERAL_CORES", True)
    assert [apply.placement(m) for m in (many_small, few_small, large)] == [
        "child",
        "thread",
        "thread",
    ]
    assert isinstance(apply.decompress_stage(many_small, {}), apply.DecompressStage)
    assert isinstance(apply.decompress_stage(few_small, {}), ThreadStage)
    assert isinstance(apply.decompress_stage(large, {}, place="inline"), InlineStage)
    monkeypatch.setattr(apply, "SEVERAL_CORES", False)
    assert {apply.placement(m) for m in (many_small, few_small, large)} == {"inline"}
    assert isinstance(apply.decompress_stage(many_small, {}), InlineStage)


def _through_stage(
    packed: bytes,
    sha256: str,
    consume: Any = None,
    seen: list[Any] | None = None,
    place: str = "child",
    compression: str = "zstd",
    before: Sequence[Any] = (),
) -> tuple[bytes, Stages, Any]:
    """``packed`` through the fetch, the stages ``before`` and the decompression stage at
    ``place``, read to its end (after ``consume``, if given), as ``stream_archive`` does."""
    from cloudbackup.restore.apply import decompress_stage

    manifest = _zstd_manifest(packed, compression=compression)
    stage = decompress_stage(manifest, dict(os.environ), place=place)
    if seen is not None:
        seen.append(stage)
    clock = Stages()
    fetch = Fetch(
        lambda: io.BytesIO(packed), size=len(packed), sha256=sha256, describe="x", stages=clock
    )
    out = bytearray()
    with Pipeline(fetch, [*before, stage], clock) as pipe:
        try:
            if consume is not None:
                consume(pipe.stream)
            while chunk := pipe.stream.read(65536):
                out += chunk
            pipe.finish()
        except BaseException as exc:
            error = pipe.explain(exc, damaged=isinstance(exc, IntegrityError))
            if error is exc:
                raise
            raise error from None
    return bytes(out), clock, stage


_OFF_THE_CONSUMER = ["child", "thread"]


def test_decompression_child_streams_and_reports_its_cpu_time() -> None:
    import zstandard

    data = os.urandom(1 << 20) * 3
    packed = zstandard.ZstdCompressor().compress(data)
    out, clock, stage = _through_stage(packed, hashlib.sha256(packed).hexdigest())
    assert out == data
    assert {"read", "hash", "decompress"} <= set(clock.as_dict())
    assert stage._proc.returncode == 0


def test_decompression_thread_streams_in_pieces_and_reports_its_busy_time() -> None:
    import threading

    import zstandard

    data = os.urandom(1 << 20) * 5 + b"tail"
    packed = zstandard.ZstdCompressor().compress(data)
    pieces: list[int] = []

    def consume(stream: Any) -> None:
        while chunk := stream.read():
            pieces.append(len(chunk))
            assert threading.current_thread() is threading.main_thread()

    out, clock, stage = _through_stage(
        packed, hashlib.sha256(packed).hexdigest(), consume, place="thread"
    )
    assert sum(pieces) == len(data) and max(pieces) <= 1 << 20 and len(pieces) >= 6
    assert {"read", "hash", "decompress"} <= set(clock.as_dict())
    assert clock.as_dict()["decompress"] > 0
    assert not stage._thread.is_alive() and stage.failure() is None


@pytest.mark.parametrize("place", _OFF_THE_CONSUMER)
def test_decompression_corrupt_stream_is_an_integrity_error(place: str) -> None:
    """An archive whose bytes are the ones the manifest names, but not zstd: the child
    exits 3 (the thread stops) and the restore says the archive cannot be decompressed
    (exit 3)."""
    packed = b"\x28\xb5\x2f\xfd" + os.urandom(5000)
    with pytest.raises(IntegrityError, match="cannot decompress x.tar.zst") as info:
        _through_stage(packed, hashlib.sha256(packed).hexdigest(), place=place)
    assert info.value.exit_code == 3


@pytest.mark.parametrize("place", _OFF_THE_CONSUMER)
def test_decompression_of_a_damaged_archive_names_the_checksum(place: str) -> None:
    """A byte flipped in transit: the checksum, not the codec, is what the error names."""
    import zstandard

    good = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(300_000))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(IntegrityError, match="fails its checksum"):
        _through_stage(bytes(bad), hashlib.sha256(good).hexdigest(), place=place)


@pytest.mark.parametrize("place", _OFF_THE_CONSUMER)
def test_decompression_stops_when_the_consumer_fails(place: str) -> None:
    """The consumer gives up after one read, with 64 MiB to come: a child is killed and
    reaped (no zombie), a thread stops at its next hand-over (its queue is bounded and
    drained) without reading the rest; nothing of this restore runs on."""
    import zstandard

    packed = zstandard.ZstdCompressor().compress(os.urandom(1 << 20) * 64)

    def fail(stream: Any) -> None:
        stream.read(1000)
        raise ZeroDivisionError

    seen: list[Any] = []
    with pytest.raises(ZeroDivisionError):
        _through_stage(packed, hashlib.sha256(packed).hexdigest(), fail, seen, place=place)
    (stage,) = seen
    if place == "child":
        assert stage._proc.returncode == -9
        with pytest.raises(ProcessLookupError):
            os.kill(stage._proc.pid, 0)
    else:
        stage._thread.join(10)
        assert not stage._thread.is_alive() and stage.failure() is None


@pytest.mark.parametrize("place", _OFF_THE_CONSUMER)
def test_a_codec_failing_with_megabytes_left_to_read_never_stalls_the_restore(place: str) -> None:
    """The bytes are the ones the manifest names, but the stream stops decompressing after
    its first frame, with 12 MiB still to read: more than the fetch's queue holds. The
    stage's failure is reported (exit 3) once the rest was read to check it, and nothing
    waits for a consumer that is gone (a thread stage once left the fetch blocked on its
    full queue while the pipeline waited for the fetch)."""
    import threading

    import zstandard

    first = zstandard.ZstdCompressor().compress(os.urandom(1 << 20))
    rest = zstandard.ZstdCompressor().compress(os.urandom(12 << 20))
    packed = first + bytes(16) + rest  # no frame starts after the first: a codec error
    failures: list[BaseException] = []

    def run() -> None:
        try:
            _through_stage(packed, hashlib.sha256(packed).hexdigest(), place=place)
        except BaseException as exc:  # reported below
            failures.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the restore stalled"
    (error,) = failures
    assert isinstance(error, IntegrityError) and error.exit_code == 3
    assert "cannot decompress x.tar.zst" in error.message


def test_a_codec_failing_behind_a_child_never_stalls_the_restore() -> None:
    """A child stage first (as decryption is for an encrypted gzip archive: here ``cat``),
    then the decompression thread, whose codec fails after the first gzip member with
    12 MiB still to come, while the consumer is still writing what was queued: the child
    is then blocked writing into a pipe nobody reads, the fetch in its write to the child.
    The pipeline stops its stages before it waits for the fetch: the failure is reported."""
    import gzip
    import threading
    import time

    from cloudbackup.core.errors import CloudBackupError

    packed = gzip.compress(os.urandom(1 << 20)) + b"garbage!" + gzip.compress(os.urandom(12 << 20), 1)
    cat = ProcessStage(
        "decrypt", ["cat"], env=dict(os.environ), errors=lambda c, m: CloudBackupError(f"{c}")
    )

    def slowly(stream: Any) -> None:
        while stream.read(65536):
            time.sleep(0.01)  # the extractor, writing what the thread queued

    failures: list[BaseException] = []

    def run() -> None:
        try:
            _through_stage(
                packed,
                hashlib.sha256(packed).hexdigest(),
                slowly,
                place="thread",
                compression="gzip",
                before=[cat],
            )
        except BaseException as exc:  # reported below
            failures.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        cat.abort()  # do not leave the child behind
        raise AssertionError("the restore stalled")
    (error,) = failures
    assert isinstance(error, IntegrityError) and "cannot decompress x.tar.zst" in error.message
    assert cat._proc.poll() is not None  # the child is gone


@pytest.mark.parametrize("place", ["child", "thread", "inline"])
def test_a_corrupt_bzip2_stream_is_an_integrity_error(place: str) -> None:
    """bz2 reports corrupt data as a bare OSError (the type of a failed system call): it is
    a decompression error, exit 3, wherever decompression runs (inline, the consumer's
    restore maps it: ``DECOMPRESS_ERRORS``)."""
    import bz2

    from cloudbackup.stream.compress import DECOMPRESS_ERRORS

    packed = bytearray(bz2.compress(os.urandom(200_000) * 3))
    packed[len(packed) // 2] ^= 0xFF
    digest = hashlib.sha256(packed).hexdigest()  # the bytes the manifest names
    with pytest.raises(DECOMPRESS_ERRORS + (IntegrityError,)) as info:
        _through_stage(bytes(packed), digest, place=place, compression="bzip2")
    if place == "inline":
        assert isinstance(info.value, DECOMPRESS_ERRORS)
    else:
        assert isinstance(info.value, IntegrityError) and info.value.exit_code == 3
        assert "cannot decompress x.tar.zst" in info.value.message


def test_decompression_child_parses_the_headers_ahead_for_the_extractor(tmp_path: Path) -> None:
    """The child hands the tar headers to the extractor through a pipe of its own: the
    extraction takes them (all but the first member, tarfile's) and extracts the same."""
    import tarfile

    import zstandard

    from cloudbackup.stream import tarformat
    from cloudbackup.stream.extract import extract
    from cloudbackup.stream.hints import HeaderHints

    tar = io.BytesIO()
    for number in range(300):
        body = bytes([number % 256]) * (number * 37)
        name = f"d{number % 7}/f{number}"
        tar.write(tarformat.member_header(name, tarfile.REGTYPE, 0o640, 0, 0, len(body), 10**18))
        tar.write(body + bytes(-len(body) % 512))
    packed = zstandard.ZstdCompressor().compress(tar.getvalue() + bytes(1024))
    taken: list[int] = []
    original = HeaderHints.take

    def counted(self: HeaderHints, offset: int) -> Any:
        hinted = original(self, offset)
        taken.append(hinted is not None)
        return hinted

    def consume(stream: Any) -> None:
        (stage,) = seen
        result = extract(stream, tmp_path / "out", hints=stage.hints)
        assert (result.files, result.bytes, result.refused) == (300, 37 * 299 * 300 // 2, [])

    (tmp_path / "out").mkdir()
    seen: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HeaderHints, "take", counted)
        _through_stage(packed, hashlib.sha256(packed).hexdigest(), consume, seen)
    # Every member but the first (tarfile's); the end blocks are asked for, and no member.
    assert taken == [True] * 299 + [False]
    assert (tmp_path / "out" / "d5" / "f250").read_bytes() == bytes([250]) * (250 * 37)
    assert seen[0].hints._fd is None  # closed with the stage


def test_hints_that_outgrow_their_pipe_never_stall_the_restore(tmp_path: Path) -> None:
    """Many members with long names in little data: more hints per piece than the hint pipe
    holds (here its default 64 KiB). The child never waits on that pipe (hints are dropped
    or sent late, never blocking the data the extractor waits for): the restore finishes."""
    import tarfile
    import threading

    import zstandard

    from cloudbackup.restore import apply
    from cloudbackup.stream import tarformat
    from cloudbackup.stream.extract import extract

    tar = io.BytesIO()
    for number in range(6000):
        name = f"{'n' * 90}/{number:05}"
        tar.write(tarformat.member_header(name, tarfile.REGTYPE, 0o600, 0, 0, 0, 10**18))
    packed = zstandard.ZstdCompressor().compress(tar.getvalue() + bytes(1024))
    (tmp_path / "out").mkdir()
    done: list[Any] = []

    def consume(stream: Any) -> None:
        (stage,) = seen
        done.append(extract(stream, tmp_path / "out", hints=stage.hints))

    seen: list[Any] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            _through_stage(packed, hashlib.sha256(packed).hexdigest(), consume, seen)
        except BaseException as exc:  # reported below
            failures.append(exc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(apply, "widen", lambda fd: None)  # the kernel's default pipe size
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)
    if worker.is_alive():
        seen[0].abort()  # do not leave the child behind
        raise AssertionError("the restore stalled")
    assert failures == []
    assert done[0].files == 6000
