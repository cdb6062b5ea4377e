"""archive: round trips through the SYSTEM tar, checksums, links, odd names, files that change
while read, special files, excludes and glob sources."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbackup import config
from cloudbackup.core.model import COMPRESSION_EXT, BackupId, Manifest, archive_name
from cloudbackup.fs.dirs import Dir
from cloudbackup.fs.walk import FileEntry
from cloudbackup.ops import backup as operations
from cloudbackup.storage.local import LocalStore
from cloudbackup.stream import compress, pipeline
from cloudbackup.stream import tarwriter as archive
from tests.conftest import make_tree
from tests.manifests import load_manifest

FIXED_NOW = datetime(2026, 11, 21, 2, 15, tzinfo=UTC)
COMPRESSIONS = ("zstd", "gzip", "xz", "bzip2", "none")
TAR_EXTRACT = {
    "zstd": ["tar", "--zstd", "-xf"],
    "gzip": ["tar", "-xzf"],
    "xz": ["tar", "-xJf"],
    "bzip2": ["tar", "-xjf"],
    "none": ["tar", "-xf"],
}


# ---------------------------------------------------------------- helpers


@dataclass
class Backup:
    result: operations.SourceResult
    manifest: Manifest
    archive: Path


def backup_with(
    spec: str,
    local_dir: Path,
    *,
    compression: str = "zstd",
    exclude: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    allow_shrink: bool = True,
) -> Backup:
    """One backup through operations.backup, as the CLI runs it (no upload)."""
    env = {
        "CLOUDBACKUP_LOCAL_DIR": str(local_dir),
        "CLOUDBACKUP_HOST": "testhost",
        "CLOUDBACKUP_COMPRESSION": compression,
        **(environ or {}),
    }
    settings_ = config.load(
        {"sources": [spec], "extra_exclude": list(exclude)}, env, {}, hostname="x", home=local_dir
    )
    ctx = operations.Context(
        settings=settings_,
        local=LocalStore(settings_.local_dir),
        now=lambda: FIXED_NOW,
        machine_id="m",
    )
    options = operations.BackupOptions(allow_shrink=allow_shrink)
    (result,) = operations.backup(ctx, settings_.sources, options)
    assert result.ok, result.error
    assert result.id is not None
    directory = settings_.local_dir / "testhost" / result.source
    manifest = load_manifest(directory / f"{result.id}.manifest.json")
    expected = archive_name(
        BackupId.parse(result.id), compression, incremental=manifest.level > 0
    )
    assert manifest.archive == expected
    return Backup(result, manifest, directory / expected)


def system_extract(path: Path, compression: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*TAR_EXTRACT[compression], os.fspath(path), "-C", os.fspath(dest)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Everything a restore must reproduce, keyed by the byte path relative to root."""
    out: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path), int(st_.st_mtime))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), int(st_.st_mtime))
            else:
                with open(path, "rb") as handle:
                    content = handle.read()
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), int(st_.st_mtime), content)
    return out


def assert_manifest_matches_file(b: Backup) -> None:
    data = b.archive.read_bytes()
    assert b.manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert b.manifest.size == len(data) == b.result.size
    assert b.manifest.archive == b.archive.name


def members(b: Backup) -> list[tarfile.TarInfo]:
    with b.archive.open("rb") as raw:
        stream = compress.open_decompressed(raw, b.manifest.compression)
        data = stream.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", errors="surrogateescape") as tar:
        return tar.getmembers()


def member_names(b: Backup) -> list[str]:
    return [m.name for m in members(b)]


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks forever)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- hypothesis round trip

names = st.text(
    alphabet=st.one_of(
        st.sampled_from(" abcXYZ019._-~#é日本語ß\u00a0"),
        st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"),
    ),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 200)
mtimes = st.integers(0, 2**33)
files = st.tuples(st.just("file"), st.binary(max_size=3000), st.integers(0, 0o777), mtimes)
links = st.tuples(
    st.just("link"),
    st.text(
        alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        min_size=1,
        max_size=40,
    ),
)


def dirs(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.tuples(
        st.just("dir"),
        st.dictionaries(names, children, max_size=4),
        st.integers(0o500, 0o777),
        mtimes,
    )


trees = st.dictionaries(names, st.recursive(files | links, dirs, max_leaves=10), max_size=6)


def build(root: Path, tree: dict[str, Any]) -> None:
    for name, node in tree.items():
        path = root / name
        if node[0] == "file":
            _, content, mode, mtime = node
            path.write_bytes(content)
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))
        elif node[0] == "link":
            os.symlink(node[1], path)
        else:
            _, children, mode, mtime = node
            path.mkdir()
            build(path, children)
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, compression=st.sampled_from(COMPRESSIONS))
def test_round_trip_through_system_tar(tree: dict[str, Any], compression: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, local, out = Path(tmp, "src"), Path(tmp, "local"), Path(tmp, "out")
        src.mkdir()
        build(src, tree)
        before = snapshot(src)
        b = backup_with(str(src), local, compression=compression)
        assert_manifest_matches_file(b)
        system_extract(b.archive, compression, out)
        assert snapshot(out) == before
        regular = [v for v in before.values() if v[0] == "file"]
        assert b.manifest.file_count == sum(1 for v in before.values() if v[0] != "dir")
        assert b.manifest.uncompressed_bytes == sum(len(v[3]) for v in regular)
        assert b.manifest.warnings == []


FIXED_TREE = {
    "index.html": "<h1>hi</h1>\n",
    "with space/über straße.txt": "unicode\n",
    "empty.bin": "",
    "big.bin": os.urandom(300_000),
    "deep/a/b/c/d.txt": "deep\n",
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_each_codec_through_the_cli_and_system_tar(
    compression: str, env: Any, cli: Any, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "www", FIXED_TREE)
    (src / "emptydir").mkdir()
    (src / "deep/a").chmod(0o750)
    (src / "index.html").chmod(0o640)
    (src / "link").symlink_to("with space/über straße.txt")
    (src / "abs-link").symlink_to("/etc/hostname")
    for path in [*src.rglob("*")][::-1]:
        os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    before = snapshot(src)
    result = cli("backup", "--no-upload", "--compression", compression, src)
    assert result.exit_code == 0, result.stderr
    (path,) = env.archives("www")
    manifest = load_manifest(env.manifests("www")[0])
    assert path.name == manifest.id + COMPRESSION_EXT[compression]
    assert manifest.compression == compression
    assert_manifest_matches_file(
        Backup(operations.SourceResult("www", size=manifest.size), manifest, path)
    )
    system_extract(path, compression, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before


# ---------------------------------------------------------------- links and names


def test_hard_links_stored_as_links(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": "shared content\n", "sub/other.txt": "x"})
    os.link(src / "a.txt", src / "b.txt")
    os.link(src / "a.txt", src / "sub/c.txt")
    b = backup_with(str(src), tmp_path / "local")
    by_name = {m.name: m for m in members(b)}
    assert by_name["a.txt"].isreg() and by_name["a.txt"].size == 15
    for name in ("b.txt", "sub/c.txt"):
        assert by_name[name].islnk(), name
        assert by_name[name].linkname == "a.txt"
    assert b.manifest.members["hardlinks"] == 2
    assert b.manifest.uncompressed_bytes == 15 + 1  # the shared data once
    system_extract(b.archive, "zstd", tmp_path / "out")
    inodes = {os.stat(tmp_path / "out" / n).st_ino for n in ("a.txt", "b.txt", "sub/c.txt")}
    assert len(inodes) == 1
    assert (tmp_path / "out/sub/c.txt").read_text() == "shared content\n"


def test_non_utf8_names_survive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(src)
    os.mkdir(raw + b"/d\xff\xfe")
    with open(raw + b"/caf\xe9.txt", "wb") as handle:
        handle.write(b"latin-1 name")
    with open(raw + b"/d\xff\xfe/\x80\x81", "wb") as handle:
        handle.write(b"inside")
    os.symlink(b"target\xe9", raw + b"/link\xe9")
    before = snapshot(src)
    b = backup_with(str(src), tmp_path / "local", compression="gzip")
    assert os.fsdecode(b"caf\xe9.txt") in member_names(b)
    out = tmp_path / "out"
    system_extract(b.archive, "gzip", out)
    assert snapshot(out) == before
    assert os.path.exists(os.fsencode(out) + b"/d\xff\xfe/\x80\x81")


def test_long_names(tmp_path: Path) -> None:
    deep = "/".join(["d" * 50] * 6)
    src = make_tree(tmp_path / "src", {f"{deep}/{'f' * 200}.txt": "long"})
    b = backup_with(str(src), tmp_path / "local")
    assert f"{deep}/{'f' * 200}.txt" in member_names(b)
    system_extract(b.archive, "zstd", tmp_path / "out")
    assert (tmp_path / "out" / deep / f"{'f' * 200}.txt").read_text() == "long"


def test_numeric_owners_only(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"f": "x"})
    os.chown(src / "f", 4321, 8765)
    (member,) = members(backup_with(str(src), tmp_path / "local"))
    assert (member.uid, member.gid, member.uname, member.gname) == (4321, 8765, "", "")


# ---------------------------------------------------------------- files that change while read


def _write_entries(
    tmp_path: Path, entries: list[FileEntry], *, prefetch: bool = False
) -> tuple[archive.ArchiveStats, list[tuple[str, str]]]:
    warnings: list[tuple[str, str]] = []
    with Dir.root(tmp_path) as directory:
        stats = pipeline.write_archive(
            entries,
            directory,
            "out.tar.partial",
            compression="none",
            level=None,
            warn=lambda c, m: warnings.append((c, m)),
            prefetch=prefetch,
        )
    return stats, warnings


def _lying_entry(path: Path, arcname: str, size: int) -> FileEntry:
    st_ = os.lstat(path)
    fields = list(st_)
    fields[stat.ST_SIZE] = size
    extra = {name: getattr(st_, name) for name in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
    return FileEntry(str(path), arcname, os.stat_result(fields, extra))


def _read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("actual", "claimed", "expected", "word"),
    [
        (b"0123456789" * 10, 250, b"0123456789" * 10 + bytes(150), "shrank"),
        (b"0123456789" * 10, 37, b"0123456789" * 3 + b"0123456", "grew"),
        (b"", 10, bytes(10), "shrank"),
        (b"0123456789", 0, b"", "grew"),  # an empty file is read too: it may have grown
        (b"x" * 512, 511, b"x" * 511, "grew"),  # the byte beyond falls in the padding
        (b"x" * 1025, 1024, b"x" * 1024, "grew"),  # ... or beyond the padded member
    ],
)
def test_file_changing_size_is_padded_or_truncated(
    tmp_path: Path, actual: bytes, claimed: int, expected: bytes, word: str
) -> None:
    changing = tmp_path / "changing.log"
    changing.write_bytes(actual)
    after = tmp_path / "after.txt"
    after.write_bytes(b"must stay intact")
    entries = [
        _lying_entry(changing, "changing.log", claimed),
        _lying_entry(after, "after.txt", 16),
    ]
    stats, warnings = _write_entries(tmp_path, entries)
    assert [c for c, _ in warnings] == ["changed"]
    assert word in warnings[0][1] and "changing.log" in warnings[0][1]
    assert stats.warnings == [warnings[0][1]]
    assert stats.unreadable == 0
    content = _read_members(tmp_path / "out.tar.partial")
    assert content == {"changing.log": expected, "after.txt": b"must stay intact"}
    listing = subprocess.run(
        ["tar", "-tvf", tmp_path / "out.tar.partial"], capture_output=True, text=True
    )
    assert listing.returncode == 0 and "after.txt" in listing.stdout


@pytest.mark.parametrize("size", [1000, 200_000])
def test_a_read_error_completes_the_member_with_zeros_and_the_tar_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A read that fails part way (EIO from a failing disk) leaves a member of exactly its
    header's size (the part read, then zeros) and the members after it intact."""
    monkeypatch.setattr(archive, "CHUNK", 64 * 1024)  # the large file takes several reads
    failing = tmp_path / "failing.bin"
    failing.write_bytes(b"a" * size)
    after = tmp_path / "after.txt"
    after.write_bytes(b"must stay intact")
    original = os.readv
    calls = {"n": 0}

    def flaky(fd: int, buffers: list[memoryview]) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(failing):
            calls["n"] += 1
            if calls["n"] == 2 or size < 64 * 1024:
                raise OSError(errno.EIO, "Input/output error")
        return original(fd, buffers)

    monkeypatch.setattr(archive.os, "readv", flaky)
    entries = [
        FileEntry(str(failing), "failing.bin", os.lstat(failing)),
        FileEntry(str(after), "after.txt", os.lstat(after)),
    ]
    stats, warnings = _write_entries(tmp_path, entries)
    assert warnings == [
        ("unreadable", f"{failing}: read error (Input/output error); rest filled with zeros")
    ]
    content = _read_members(tmp_path / "out.tar.partial")
    assert content["after.txt"] == b"must stay intact"
    data = content["failing.bin"]
    assert len(data) == size
    read_first = 0 if size < 64 * 1024 else len(data.rstrip(b"\0"))
    assert data == b"a" * read_first + bytes(size - read_first)
    assert size < 64 * 1024 or 0 < read_first < size
    assert stats.file_count == 2 and stats.unreadable == 1


def test_an_archive_that_cannot_be_written_stops_and_blames_no_input_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or any failure downstream of the tar buffer) while a file's data is being
    read is the archive's error, raised as it is: not a read error of that file, with the
    backup going on."""

    class FullDisk:
        def put(self, chunk: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archive, "CHUNK", 64 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * 200_000)
    small = tmp_path / "small.txt"
    small.write_bytes(b"s" * 60_000)
    warnings: list[tuple[str, str]] = []
    for name in ("big.bin", "small.txt"):
        path = tmp_path / name
        out = archive.TarOut(compress.make_compressor("none", None), FullDisk(), None)  # type: ignore[arg-type]
        out.write(bytes(10_000))  # the next member does not fit: it flushes first
        with pytest.raises(OSError) as raised:
            archive.write_tar(
                [FileEntry(str(path), name, os.lstat(path))],
                out,
                archive.ArchiveStats(),
                lambda c, m: warnings.append((c, m)),
            )
        assert raised.value.errno == errno.ENOSPC
    assert warnings == []


def test_o_noatime_is_asked_only_for_files_the_process_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """O_NOATIME is refused on files of others (EPERM) unless privileged: the writer asks
    for it only where it is allowed, so such files cost no refused open first."""
    others = tmp_path / "others.txt"
    others.write_bytes(b"others")
    own = tmp_path / "own.txt"
    own.write_bytes(b"own")
    flags_seen: dict[str, list[int]] = {}
    real_open = os.open

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        flags_seen.setdefault(os.path.basename(str(path)), []).append(flags)
        return real_open(path, flags, *args, **kwargs)

    euid = os.lstat(others).st_uid + 1
    monkeypatch.setattr(archive, "_EUID", euid)  # neither root nor the owner of others.txt
    st = os.lstat(own)
    fields = list(st)
    fields[stat.ST_UID] = euid  # as if the process owned this one
    extra = {name: getattr(st, name) for name in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
    entries = [
        FileEntry(str(others), "others.txt", os.lstat(others)),
        FileEntry(str(own), "own.txt", os.stat_result(fields, extra)),
    ]
    monkeypatch.setattr(archive.os, "open", recording_open)
    stats, warnings = _write_entries(tmp_path, entries)
    monkeypatch.undo()
    assert warnings == [] and stats.file_count == 2
    noatime = getattr(os, "O_NOATIME", 0)
    assert [f & noatime for f in flags_seen["others.txt"]] == [0]
    assert [f & noatime for f in flags_seen["own.txt"]] == [noatime]
    assert _read_members(tmp_path / "out.tar.partial") == {
        "others.txt": b"others",
        "own.txt": b"own",
    }


def test_file_growing_during_backup_is_warned_in_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src", {"app.log": "line\n" * 100, "z.txt": "z"})
    original = archive._open_nofollow

    def open_and_append(path: str, **kwargs: Any) -> int:
        fd = original(path, **kwargs)
        if path.endswith("app.log"):
            with open(path, "ab") as handle:
                handle.write(b"more\n" * 50)
        return fd

    monkeypatch.setattr(archive, "_open_nofollow", open_and_append)
    b = backup_with(str(src), tmp_path / "local")
    assert b.result.exit_code == 1  # completed with warnings, as GNU tar exits 1
    assert any("grew" in w and "app.log" in w for w in b.manifest.warnings)
    system_extract(b.archive, "zstd", tmp_path / "out")
    assert (tmp_path / "out/app.log").read_bytes() == b"line\n" * 100
    assert (tmp_path / "out/z.txt").read_bytes() == b"z"


def test_unreadable_file_is_skipped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src", {"ok.txt": "ok", "secret.key": "k"})
    original = archive._open_nofollow

    def deny(path: str, **kwargs: Any) -> int:
        if path.endswith("secret.key"):
            raise PermissionError(13, "Permission denied", path)
        return original(path, **kwargs)

    monkeypatch.setattr(archive, "_open_nofollow", deny)
    b = backup_with(str(src), tmp_path / "local")
    assert b.result.exit_code == 1
    assert member_names(b) == ["ok.txt"]
    assert any("secret.key" in w and "Permission denied" in w for w in b.manifest.warnings)


# ---------------------------------------------------------------- special files, excludes


def test_fifo_skipped_with_a_note_and_never_opened(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": "a"})
    os.mkfifo(src / "pipe")
    with time_limit(20):
        b = backup_with(str(src), tmp_path / "local")
    assert member_names(b) == ["a.txt"]
    assert any("pipe" in w and "FIFO" in w for w in b.manifest.warnings)
    assert b.result.exit_code == 0


def test_local_dir_and_log_file_inside_source_are_excluded(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"data.txt": "d", "cloudbackup.log": "log"})
    local = src / "var" / "backups"
    environ = {"CLOUDBACKUP_LOG_FILE": str(src / "cloudbackup.log")}
    first = backup_with(str(src), local, environ=environ)
    assert sorted(member_names(first)) == ["data.txt", "var"]
    second = backup_with(str(src), local, environ=environ)
    assert second.result.id != first.result.id
    assert sorted(member_names(second)) == ["data.txt", "var"]


def test_excludes(tmp_path: Path) -> None:
    src = make_tree(
        tmp_path / "src",
        {
            "keep.txt": "k",
            "a.tmp": "t",
            "deep/er/b.tmp": "t",
            "node_modules/x/index.js": "n",
            "web/node_modules/y.js": "n",
            "a/cache/blob": "c",
            "a/b/cache/c/blob": "c",
            "cachefile": "kept",
            "sub/x.txt": "gone",
            "sub/y.txt": "kept",
            "other/sub/x.txt": "kept: pattern with / is anchored",
        },
    )
    b = backup_with(
        str(src), tmp_path / "local", exclude=("*.tmp", "node_modules", "**/cache/**", "sub/x.txt")
    )
    files = {m.name for m in members(b) if not m.isdir()}
    assert files == {"keep.txt", "cachefile", "sub/y.txt", "other/sub/x.txt"}
    dirs_ = {m.name for m in members(b) if m.isdir()}
    assert not any("node_modules" in d for d in dirs_)


def test_exclude_from_environment_and_option_combine(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.tmp": "t", "b.bak": "b", "c.txt": "c"})
    b = backup_with(
        str(src), tmp_path / "local", exclude=("*.bak",), environ={"CLOUDBACKUP_EXCLUDE": "*.tmp"}
    )
    assert member_names(b) == ["c.txt"]


def test_glob_source_members_relative_to_base_with_parents(tmp_path: Path) -> None:
    base = make_tree(
        tmp_path / "opt/app/config",
        {
            "app.yaml": "a: 1\n",
            "db/pg.json": "{}",
            "db/notes.txt": "no",
            "db/replica/r.yaml": "r: 1\n",
            "unrelated/readme.md": "no",
        },
    )
    os.chmod(base / "db", 0o710)
    os.chmod(base / "db/replica", 0o700)
    for path in [*base.rglob("*")][::-1]:
        os.utime(path, (1_600_000_000, 1_600_000_000))
    b = backup_with(f"conf={base}/**/*.{{yaml,json}}", tmp_path / "local")
    assert b.manifest.kind == "glob"
    assert member_names(b) == ["app.yaml", "db", "db/pg.json", "db/replica", "db/replica/r.yaml"]
    out = tmp_path / "out"
    system_extract(b.archive, "zstd", out)
    restored = snapshot(out)
    original = snapshot(base)
    assert set(restored) == {b"app.yaml", b"db", b"db/pg.json", b"db/replica", b"db/replica/r.yaml"}
    for key, value in restored.items():
        assert value == original[key], key


def test_write_archive_removes_partial_on_error(tmp_path: Path) -> None:
    def broken() -> Iterator[FileEntry]:
        path = tmp_path / "f"
        path.write_text("x")
        yield FileEntry(str(path), "f", os.lstat(path))
        raise RuntimeError("boom")

    partial = tmp_path / "x.tar.zst.partial"
    with pytest.raises(RuntimeError), Dir.root(tmp_path) as directory:
        pipeline.write_archive(
            broken(), directory, partial.name, compression="zstd", level=3, warn=lambda c, m: None
        )
    assert not partial.exists()


def test_walk_archive_counts_like_the_writer(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a": "12345", "d/b": "678"})
    (src / "l").symlink_to("a")
    b = backup_with(str(src), tmp_path / "local", compression="xz")
    with b.archive.open("rb") as raw:
        walked = pipeline.walk_archive(compress.open_decompressed(raw, "xz"))
    assert (
        (walked.file_count, walked.uncompressed_bytes)
        == (
            b.manifest.file_count,
            b.manifest.uncompressed_bytes,
        )
        == (3, 8)
    )


# ---------------------------------------------------------------- prefetch


class Advice:
    """Records posix_fadvise(WILLNEED) calls: (file name, offset, length)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.paths: list[str] = []  # where each file advised really was

    def __call__(self, fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        path = os.readlink(f"/proc/self/fd/{fd}")
        self.paths.append(path)
        self.calls.append((os.path.basename(path), offset, length))


def test_prefetch_opens_and_asks_for_upcoming_files_and_keeps_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advice = Advice()
    monkeypatch.setattr(archive, "_FADVISE", advice)
    monkeypatch.setattr(archive, "PREFETCH_FILES", 3)
    names = [f"f{i}" for i in range(8)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode() * 10)
    (tmp_path / "empty").write_bytes(b"")
    entries = [FileEntry(str(tmp_path / n), n, os.lstat(tmp_path / n)) for n in [*names, "empty"]]
    gen = archive.prefetched(iter(entries))
    first, fd = next(gen)
    # The first entry is handed out once the window of 3 is open and asked for, with the
    # descriptor the writer reads from.
    assert [c[0] for c in advice.calls] == ["f0", "f1", "f2"]
    assert first.arcname == "f0" and os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "f0")
    os.close(fd)
    rest = list(gen)
    for _, fd in rest:
        if fd >= 0:
            os.close(fd)
    assert [e.arcname for e, _ in rest] == [*names[1:], "empty"]  # same entries, same order
    assert rest[-1][1] == -1  # the empty file is neither opened nor asked for
    assert [c[0] for c in advice.calls] == names
    assert {c[1:] for c in advice.calls} == {(0, 20)}


def _descriptors_under(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{path}/")
    return count


def test_prefetch_holds_a_bounded_window_of_descriptors_and_closes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-ahead keeps at most a quarter of RLIMIT_NOFILE open, whatever
    PREFETCH_FILES says, and closing it early (an error in the writer) leaks none."""
    import resource

    monkeypatch.setattr(archive, "_FADVISE", Advice())
    monkeypatch.setattr(archive, "PREFETCH_FILES", 10_000)
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(200):
        (tree / f"f{i:03}").write_bytes(b"x")
    entries = [FileEntry(str(p), p.name, os.lstat(p)) for p in sorted(tree.iterdir())]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        assert archive.window_files() == 64
        gen = archive.prefetched(iter(entries))
        most = 0
        for index, (_entry, fd) in enumerate(gen):
            most = max(most, _descriptors_under(tree))
            os.close(fd)
            if index == 100:
                break
        assert most == 64
        assert _descriptors_under(tree) == 63  # the window ahead of the writer
        gen.close()
        assert _descriptors_under(tree) == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_prefetch_opens_walked_files_through_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Walked entries are opened by the read-ahead helper relative to their directory's
    descriptor: a directory swapped for a symlink after the walk listed it changes nothing."""
    from cloudbackup.core.patterns import PathMatcher
    from cloudbackup.sources.base import SourceContext
    from cloudbackup.sources.directory import walk_tree

    advice = Advice()
    monkeypatch.setattr(archive, "_FADVISE", advice)
    root = make_tree(tmp_path / "src", {f"sub/f{i}": f"data {i}" for i in range(5)})
    outside = make_tree(tmp_path / "outside", {f"f{i}": f"OUTSIDE {i}" for i in range(5)})
    ctx = SourceContext(tmp_path, "x", PathMatcher(()), frozenset(), lambda c, m: None)
    entries = list(walk_tree(str(root), ctx))
    (root / "sub").rename(tmp_path / "moved")
    (root / "sub").symlink_to(outside)
    stats, warnings = _write_entries(tmp_path, entries, prefetch=True)
    assert warnings == [] and stats.file_count == 5
    assert _read_members(tmp_path / "out.tar.partial") == {
        f"sub/f{i}": f"data {i}".encode() for i in range(5)
    }
    deadline = time.monotonic() + 5
    while len(advice.calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(name for name, _, _ in advice.calls) == [f"f{i}" for i in range(5)]
    assert {os.path.dirname(path) for path in advice.paths} == {str(tmp_path / "moved")}


def test_a_file_replaced_by_a_fifo_after_the_walk_is_skipped_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive, "_FADVISE", Advice())
    data = tmp_path / "data"
    data.write_bytes(b"x" * 100)
    entry = FileEntry(str(data), "data", os.lstat(data))
    data.unlink()
    os.mkfifo(data)  # after the walk: neither the prefetch helper nor the reader may block
    started = time.monotonic()
    with time_limit(20):
        stats, warnings = _write_entries(tmp_path, [entry], prefetch=True)
    assert time.monotonic() - started < 10
    assert stats.file_count == 0
    assert warnings == [("vanished", f"{data}: replaced by a special file while reading; skipped")]


def test_a_large_file_is_read_ahead_in_a_sliding_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advice = Advice()
    monkeypatch.setattr(archive, "_FADVISE", advice)
    monkeypatch.setattr(archive, "PREFETCH_BYTES", 64 * 1024)
    monkeypatch.setattr(archive, "CHUNK", 16 * 1024)  # reads smaller than the window
    big = tmp_path / "big"
    payload = os.urandom(1024 * 1024)
    big.write_bytes(payload)
    stats, warnings = _write_entries(
        tmp_path, [FileEntry(str(big), "big", os.lstat(big))], prefetch=True
    )
    assert warnings == [] and stats.uncompressed_bytes == len(payload)
    assert _read_members(tmp_path / "out.tar.partial")["big"] == payload
    offsets = sorted(offset for name, offset, _ in advice.calls if name == "big")
    # The head by the prefetch helper, then 32 KiB steps kept ahead of the reads to the end.
    assert offsets[0] == 0
    assert offsets[1:] == list(range(64 * 1024, len(payload), 32 * 1024))


def test_a_file_under_a_kernel_lease_is_read_once_the_lease_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-blocking open of a leased file (Samba, NFS server) fails with EWOULDBLOCK: the
    archive must wait for the lease to break and read the file, not skip it as unreadable."""
    import fcntl
    import threading

    set_lease = getattr(fcntl, "F_SETLEASE", 1024)
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease holder's break notice
    leased = tmp_path / "leased.txt"
    leased.write_bytes(b"held by a lease\n")
    holder = os.open(leased, os.O_RDWR)
    try:
        fcntl.fcntl(holder, set_lease, fcntl.F_WRLCK)
        released = threading.Timer(0.3, fcntl.fcntl, (holder, set_lease, fcntl.F_UNLCK))
        released.start()
        with time_limit(30):
            stats, warnings = _write_entries(
                tmp_path, [FileEntry(str(leased), "leased.txt", os.lstat(leased))]
            )
        released.join()
    finally:
        os.close(holder)
        signal.signal(signal.SIGIO, previous)
    assert warnings == []
    assert _read_members(tmp_path / "out.tar.partial") == {"leased.txt": b"held by a lease\n"}
