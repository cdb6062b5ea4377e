"""The safe streaming extractor: round trips, malicious archives, corrupt streams."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbackup.core.errors import IntegrityError
from cloudbackup.fs.tree import tally_tree
from cloudbackup.stream.extract import CHUNK_SIZE, ExtractResult, extract
from tests.test_hostile_tree import deep_cleanup

__all__ = ["deep_cleanup"]  # a fixture

MTIME = 1_700_000_000
IS_ROOT = os.geteuid() == 0


class Pipe:
    """A non-seekable stream with only read(), optionally returning short reads."""

    def __init__(self, data: bytes, max_read: int | None = None) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._max = max_read

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self._data) - self._pos
        if self._max is not None:
            size = min(size, self._max)
        chunk = bytes(self._data[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk


class Tar:
    """Hand-crafted archives, malicious ones included (tarfile writes whatever it is given)."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(
            fileobj=self.buf,
            mode="w",
            format=fmt,
            encoding="utf-8",
            errors="surrogateescape",
        )

    def _info(self, name: str, kind: bytes, mode: int, mtime: float) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = mtime
        return info

    def file(
        self,
        name: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        mtime: float = MTIME,
        uid: int = 0,
        gid: int = 0,
    ) -> Tar:
        info = self._info(name, tarfile.REGTYPE, mode, mtime)
        info.size = len(data)
        info.uid, info.gid = uid, gid
        self.tf.addfile(info, io.BytesIO(data))
        return self

    def dir(self, name: str, *, mode: int = 0o755, mtime: float = MTIME) -> Tar:
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, mtime))
        return self

    def symlink(self, name: str, target: str, *, mtime: float = MTIME) -> Tar:
        info = self._info(name, tarfile.SYMTYPE, 0o777, mtime)
        info.linkname = target
        self.tf.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> Tar:
        info = self._info(name, tarfile.LNKTYPE, 0o644, MTIME)
        info.linkname = target
        self.tf.addfile(info)
        return self

    def special(self, name: str, kind: bytes) -> Tar:
        info = self._info(name, kind, 0o600, MTIME)
        info.devmajor, info.devminor = 1, 3
        self.tf.addfile(info)
        return self

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


@pytest.fixture()
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Iterator[Path]:
    """A sibling of the target that no extraction may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "sentinel").write_bytes(b"keep")
    os.utime(path / "sentinel", (MTIME, MTIME))
    before = set(os.listdir(tmp_path.parent))
    yield path
    assert (path / "sentinel").read_bytes() == b"keep"
    assert set(os.listdir(tmp_path)) <= {"outside", "target", "src"}, "written outside the target"
    assert set(os.listdir(tmp_path.parent)) == before, "written outside the target"
    assert sorted(os.listdir(path)) == ["sentinel"]
    assert os.stat(path / "sentinel").st_mtime == MTIME


def _listing(root: Path) -> set[str]:
    """Every path under ``root`` (no symlink followed), relative, as strings."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def run(data: bytes, target: Path, **kwargs: object) -> ExtractResult:
    return extract(Pipe(data), target, **kwargs)  # type: ignore[arg-type]


def snapshot(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Type, mode, mtime, content or link target of everything under ``root``, by bytes name."""
    out: dict[bytes, tuple[object, ...]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, broot)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("l", os.readlink(path), st_.st_mtime)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("d", stat.S_IMODE(st_.st_mode), st_.st_mtime)
            else:
                with open(path, "rb") as handle:
                    content = handle.read()
                out[rel] = ("f", stat.S_IMODE(st_.st_mode), st_.st_mtime, content)
    return out


def make_writable(root: str | Path) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


def as_unprivileged(work: Callable[[Path], None]) -> None:
    """Run ``work(target)`` as an ordinary user: directly when not root, else in a child
    process that dropped to nobody, so permission handling is exercised either way."""
    base = Path(tempfile.mkdtemp(prefix="cloudbackup-extract-"))
    try:
        target = base / "target"
        target.mkdir()
        if not IS_ROOT:
            work(target)
            return
        os.chmod(base, 0o711)
        os.chown(target, 65534, 65534)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's result is its exit code
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                work(target)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged extraction failed"
    finally:
        make_writable(base)
        shutil.rmtree(base)


# --- round trips ----------------------------------------------------------------------------


def _source_tree(src: Path) -> None:
    (src / "empty dir").mkdir()
    (src / "docs").mkdir()
    (src / "docs" / "read me.txt").write_text("spaces\n")
    (src / "docs" / "ünïcödé ✓.md").write_text("unicode\n")
    os.mkdir(os.fsencode(src / "docs") + b"/caf\xe9-latin1")
    with open(os.fsencode(src / "docs") + b"/caf\xe9-latin1/\xff\xfe.bin", "wb") as handle:
        handle.write(b"\x00\x01 non-utf-8 name")
    (src / "bin").mkdir()
    (src / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "bin" / "tool", 0o750)
    (src / "secret").write_bytes(b"s3cr3t")
    os.chmod(src / "secret", 0o600)
    (src / "big.bin").write_bytes(os.urandom(CHUNK_SIZE * 2 + 12345))
    (src / "data").write_bytes(b"linked data")
    os.link(src / "data", src / "docs" / "hard link to data")
    os.symlink("docs/read me.txt", src / "relative link")
    os.symlink("/etc/alternatives/editor", src / "absolute link")
    os.symlink("does/not/exist", src / "docs" / "dangling")
    os.symlink("../docs", src / "bin" / "dir link")
    (src / "ro").mkdir()
    (src / "ro" / "inner").mkdir()
    (src / "ro" / "inner" / "file").write_text("inside a read-only dir\n")
    for index, path in enumerate(sorted(_listing(src), key=len, reverse=True)):
        os.utime(src / path, (MTIME + index, MTIME + index), follow_symlinks=False)
    os.chmod(src / "ro" / "inner", 0o555)
    os.chmod(src / "ro", 0o500)
    os.chmod(src, 0o751)
    os.utime(src, (MTIME - 7, MTIME - 7))


def _archive(src: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tf:
        tf.add(src, arcname=".")
    return buf.getvalue()


def test_round_trip(tmp_path: Path, target: Path, outside: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    try:
        _source_tree(src)
        data = _archive(src)
        progress: list[int] = []
        result = extract(Pipe(data, max_read=7000), target, progress=progress.append)  # type: ignore[arg-type]
        assert result.refused == []
        assert snapshot(target) == snapshot(src)
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o751  # the "./" member
        assert os.stat(target).st_mtime == MTIME - 7
        linked = os.lstat(target / "data"), os.lstat(target / "docs" / "hard link to data")
        assert linked[0].st_ino == linked[1].st_ino
        assert result.files == 8
        assert result.hardlinks == 1
        assert result.symlinks == 4
        assert result.dirs == 6
        file_sizes = [
            os.lstat(os.path.join(dirpath, name)).st_size
            for dirpath, _, names in os.walk(os.fsencode(src))
            for name in names
            if os.path.isfile(os.path.join(dirpath, name))
            and not os.path.islink(os.path.join(dirpath, name))
        ]
        assert result.bytes == sum(file_sizes) - len(b"linked data")  # a hard link is no data
        assert sum(progress) == result.bytes
        assert max(progress) <= CHUNK_SIZE
    finally:
        make_writable(tmp_path)


def test_round_trip_as_an_unprivileged_user_with_read_only_dirs() -> None:
    data = (
        Tar()
        .dir("ro", mode=0o555, mtime=MTIME + 1)
        .dir("ro/sub", mode=0o500, mtime=MTIME + 2)
        .file("ro/sub/f", b"x", mode=0o400)
        .symlink("ro/sub/link", "f", mtime=MTIME + 3)
        .dir("none", mode=0o000, mtime=MTIME + 4)
        .file("none/g", b"y")
        .file("setuid", b"z", mode=0o4755)
        .bytes()
    )

    def work(target: Path) -> None:
        result = run(data, target)
        assert result.refused == []
        assert (result.files, result.dirs, result.symlinks) == (3, 3, 1)

    as_unprivileged(work)
    # Check the result as root (or as ourselves), where every directory can be read.
    base = Path(tempfile.mkdtemp())
    try:
        run(data, base, same_owner=False)
        snap = snapshot(base)
        assert snap[b"ro"] == ("d", 0o555, MTIME + 1)
        assert snap[b"ro/sub"] == ("d", 0o500, MTIME + 2)
        assert snap[b"ro/sub/f"] == ("f", 0o400, MTIME, b"x")
        assert snap[b"ro/sub/link"] == ("l", b"f", MTIME + 3)
        assert snap[b"none"] == ("d", 0o000, MTIME + 4)
        assert snap[b"setuid"] == ("f", 0o755, MTIME, b"z")  # no setuid bit for a non-owner
    finally:
        make_writable(base)
        shutil.rmtree(base)


def test_owners_and_setuid_bits(target: Path) -> None:
    data = (
        Tar()
        .dir("d", mode=0o2775)
        .file("d/suid", b"x", mode=0o4755, uid=1234, gid=5678)
        .symlink("d/link", "suid")
        .bytes()
    )
    result = run(data, target)  # same_owner defaults to "running as root"
    st_ = os.lstat(target / "d" / "suid")
    if IS_ROOT:
        assert (st_.st_uid, st_.st_gid) == (1234, 5678)
        assert stat.S_IMODE(st_.st_mode) == 0o4755
        assert stat.S_IMODE(os.stat(target / "d").st_mode) == 0o2775
        assert os.lstat(target / "d" / "link").st_uid == 0
    else:
        assert st_.st_uid == os.geteuid()
        assert stat.S_IMODE(st_.st_mode) == 0o755
    assert result.warnings == []


def test_same_owner_false_keeps_our_owner_and_strips_setuid(target: Path) -> None:
    data = Tar().file("suid", b"x", mode=0o6755, uid=1234, gid=5678).bytes()
    run(data, target, same_owner=False)
    st_ = os.stat(target / "suid")
    assert st_.st_uid == os.geteuid()
    assert stat.S_IMODE(st_.st_mode) == 0o755


def test_names_are_normalised_and_non_utf8_names_survive(target: Path, outside: Path) -> None:
    data = (
        Tar()
        .file("./a.txt", b"a")
        .file("././b//c/./d.txt", b"d")
        .file("caf\udce9/\udcff.bin", b"raw bytes")
        .dir("trailing/")
        .bytes()
    )
    result = run(data, target)
    assert result.refused == []
    assert (target / "a.txt").read_bytes() == b"a"
    assert (target / "b" / "c" / "d.txt").read_bytes() == b"d"
    assert open(os.fsencode(target) + b"/caf\xe9/\xff.bin", "rb").read() == b"raw bytes"
    assert (target / "trailing").is_dir()


def test_fractional_and_old_mtimes(target: Path) -> None:
    data = Tar().file("new", b"", mtime=MTIME + 0.5).file("old", b"", mtime=0).bytes()
    run(data, target)
    assert os.stat(target / "new").st_mtime_ns == (MTIME * 10**9) + 500_000_000
    assert os.stat(target / "old").st_mtime == 0


def _pax_member(tar: Tar, name: str, kind: bytes, pax: dict[str, str], data: bytes = b"") -> None:
    info = tar._info(name, kind, 0o644 if kind == tarfile.REGTYPE else 0o755, MTIME)
    info.size = len(data)
    if kind == tarfile.SYMTYPE:
        info.linkname = "f"
    info.pax_headers = pax
    tar.tf.addfile(info, io.BytesIO(data))


def test_pax_mtimes_are_restored_to_the_nanosecond(target: Path) -> None:
    """tarfile reads a PAX mtime as a float (about 0.2 us of precision today): the extractor
    reads the string itself."""
    tar = Tar()
    _pax_member(tar, "d", tarfile.DIRTYPE, {"mtime": "1400000000.000000007"})
    _pax_member(tar, "d/f", tarfile.REGTYPE, {"mtime": "1700000000.123456789"}, b"x")
    _pax_member(tar, "d/link", tarfile.SYMTYPE, {"mtime": "1650000000.5"})
    _pax_member(tar, "old", tarfile.REGTYPE, {"mtime": "-1.25"})
    _pax_member(tar, "odd", tarfile.REGTYPE, {"mtime": "1700000000.1234567891234"})
    run(tar.bytes(), target)
    mtimes = {
        name: os.lstat(target / name).st_mtime_ns for name in ("d", "d/f", "d/link", "old", "odd")
    }
    assert mtimes == {
        "d": 1_400_000_000_000_000_007,
        "d/f": 1_700_000_000_123_456_789,
        "d/link": 1_650_000_000_500_000_000,
        "old": -1_250_000_000,
        "odd": 1_700_000_000_123_456_789,  # digits past the nanosecond dropped
    }


def test_xattrs_are_restored_and_refusals_reported_once(target: Path) -> None:
    tar = Tar()
    blob = b"\x00\xff binary\n=value".decode("utf-8", "surrogateescape")
    _pax_member(tar, "d", tarfile.DIRTYPE, {"SCHILY.xattr.user.dir": "on a directory"})
    _pax_member(
        tar,
        "d/f",
        tarfile.REGTYPE,
        {"SCHILY.xattr.user.comment": "plain", "SCHILY.xattr.user.blob": blob},
        b"data",
    )
    too_long = "SCHILY.xattr.user." + "x" * 300  # over XATTR_NAME_MAX: every filesystem refuses
    for index in range(3):
        _pax_member(tar, f"refused{index}", tarfile.REGTYPE, {too_long: "v"}, b"r")
    result = run(tar.bytes(), target)
    assert result.refused == [] and result.files == 4
    assert os.getxattr(target / "d", "user.dir") == b"on a directory"
    assert os.getxattr(target / "d/f", "user.comment") == b"plain"
    assert os.getxattr(target / "d/f", "user.blob") == b"\x00\xff binary\n=value"
    (warning,) = result.warnings
    assert warning.startswith("cannot set extended attribute user.xxx")
    assert "'refused0' (and 2 more):" in warning


def test_a_2000_level_archive_is_extracted_with_a_few_descriptors(
    target: Path, monkeypatch: pytest.MonkeyPatch, deep_cleanup: list[Path]
) -> None:
    from cloudbackup.stream import extract as extract_module

    deep_cleanup.append(target)

    monkeypatch.setattr(extract_module, "default_capacity", lambda: 8)
    tar = Tar()
    names = ["d" * (k % 3 + 1) for k in range(2000)]
    for depth in range(1, 2001):
        tar.dir("/".join(names[:depth]), mode=0o750)
    for depth in range(2000, 0, -1):  # the files on the way back up: directories reopened
        tar.file("/".join([*names[:depth], "f"]), b"%d" % depth)
    data = tar.bytes()
    assert run(data, target, dry_run=True).files == 2000
    opened = 0
    real_open = os.open

    def counting_open(*args: object, **kwargs: object) -> int:
        nonlocal opened
        opened += 1
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    result = run(data, target)
    monkeypatch.undo()
    assert result.refused == [] and result.files == 2000 and result.dirs == 2000
    assert opened < 4 * 4000  # linear in the members, not quadratic in the depth
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, name in enumerate(names, start=1):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o750
            with open(os.open("f", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as handle:
                assert handle.read() == b"%d" % depth
    finally:
        os.close(fd)


def test_a_directory_reopened_after_eviction_is_not_made_again_unless_it_is_gone(
    target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory whose descriptor left the cache is reopened without a mkdir first; if
    it went away meanwhile, it is made again (and its files land in the new one)."""
    from cloudbackup.stream import extract as extract_module

    monkeypatch.setattr(extract_module, "default_capacity", lambda: 2)
    made: list[str] = []
    real_mkdir = os.mkdir

    def counting_mkdir(name: str, *args: object, **kwargs: object) -> None:
        made.append(name)
        real_mkdir(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", counting_mkdir)
    tree = extract_module._RealTree(target, same_owner=False, progress=None, warnings=[])
    attrs = extract_module._Attrs(0o644, 0, os.getuid(), os.getgid())
    try:
        tree.write_file(("a", "f"), b"1", 1, attrs)
        for name in ("b", "c", "d"):  # "a" leaves the cache of 2
            tree.write_file((name, "f"), b"2", 1, attrs)
        assert ("a",) not in tree._fds
        tree.write_file(("a", "g"), b"3", 1, attrs)
        assert made == ["a", "b", "c", "d"]
        for name in ("b", "c", "d"):
            tree.write_file((name, "g"), b"4", 1, attrs)
        shutil.rmtree(target / "a")
        tree.write_file(("a", "h"), b"5", 1, attrs)
        assert made == ["a", "b", "c", "d", "a"]
    finally:
        tree.close()
    assert (target / "a" / "h").read_bytes() == b"5"
    assert sorted(os.listdir(target / "a")) == ["h"]


def test_a_file_streams_in_chunks(target: Path) -> None:
    size = 3 * CHUNK_SIZE + 1
    data = Tar().file("big", b"\xab" * size).bytes()
    progress: list[int] = []
    result = run(data, target, progress=progress.append)
    assert result.bytes == size
    assert progress == [CHUNK_SIZE] * 3 + [1]
    assert os.path.getsize(target / "big") == size


def test_directory_members_after_their_children(target: Path) -> None:
    # find -depth order: the directory's attributes still win.
    data = Tar().file("d/f", b"x").dir("d", mode=0o700, mtime=MTIME + 9).bytes()
    result = run(data, target)
    assert result.dirs == 1
    st_ = os.stat(target / "d")
    assert (stat.S_IMODE(st_.st_mode), st_.st_mtime) == (0o700, MTIME + 9)


def test_implicit_parent_directories_get_a_default_mode(target: Path) -> None:
    run(Tar().file("x/y/z", b"1").bytes(), target)
    assert stat.S_IMODE(os.stat(target / "x").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(target / "x" / "y").st_mode) == 0o755


# --- duplicates -----------------------------------------------------------------------------


def test_a_later_regular_file_replaces_an_earlier_one(target: Path) -> None:
    data = Tar().file("f", b"first").hardlink("h", "f").file("f", b"second", mode=0o600).bytes()
    result = run(data, target)
    assert result.refused == []
    assert (target / "f").read_bytes() == b"second"
    assert (target / "h").read_bytes() == b"first"  # like tar: the old inode stays linked
    assert stat.S_IMODE(os.stat(target / "f").st_mode) == 0o600
    # Counted as on disk: two names, both inodes' bytes (the first one lives on as "h").
    assert (result.replaced, result.replaced_bytes) == (1, 0)
    assert result.on_disk() == (2, len(b"first") + len(b"second"))
    again = run(Tar().file("g", b"12345").file("g", b"1").bytes(), target)
    assert (again.files, again.replaced, again.replaced_bytes) == (2, 1, 5)
    assert again.on_disk() == (1, 1)


def test_a_file_never_replaces_a_directory_nor_the_reverse(target: Path, outside: Path) -> None:
    data = (
        Tar()
        .dir("d")
        .file("d/keep", b"k")
        .file("d", b"not a dir")
        .file("f", b"file")
        .dir("f")
        .file("f/below", b"x")
        .hardlink("d", "f")
        .bytes()
    )
    result = run(data, target)
    assert (target / "d" / "keep").read_bytes() == b"k"
    assert (target / "f").read_bytes() == b"file"
    assert len(result.refused) == 4
    assert all("'d'" in line or "'f" in line for line in result.refused)


def test_symlink_and_file_of_the_same_name_the_later_wins(target: Path) -> None:
    data = (
        Tar()
        .symlink("s", "/etc/passwd")
        .file("s", b"file after symlink")
        .file("t", b"file before symlink")
        .symlink("t", "s")
        .symlink("u", "first")
        .symlink("u", "second")
        .bytes()
    )
    result = run(data, target)
    assert result.refused == []
    assert (target / "s").read_bytes() == b"file after symlink"
    assert os.readlink(target / "t") == "s"
    assert os.readlink(target / "u") == "second"
    assert result.symlinks == 2


# --- malicious archives ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../x", "path escapes the target"),
        ("a/../../x", "path escapes the target"),
        ("a/..", "path escapes the target"),
        ("..", "path escapes the target"),
        ("/tmp/cloudbackup-evil", "path is absolute"),
        ("//x", "path is absolute"),
    ],
)
def test_escaping_names_are_refused(target: Path, outside: Path, name: str, reason: str) -> None:
    data = Tar().file("before", b"1").file(name, b"evil").file("after", b"2").bytes()
    result = run(data, target)
    assert result.refused == [f"refused {name!r}: {reason}"]
    assert sorted(os.listdir(target)) == ["after", "before"]
    assert result.files == 2
    assert not os.path.exists("/tmp/cloudbackup-evil")


def test_absolute_name_into_the_outside_dir(target: Path, outside: Path) -> None:
    data = Tar().file(str(outside / "evil"), b"evil").dir(str(outside / "d")).bytes()
    result = run(data, target)
    assert len(result.refused) == 2
    assert os.listdir(target) == []


def test_symlink_to_outside_then_a_file_through_it(target: Path, outside: Path) -> None:
    data = Tar().symlink("a", str(outside)).file("a/evil", b"evil").file("ok", b"fine").bytes()
    result = run(data, target)
    # The file went into a real directory "a"; the symlink then collides and is refused.
    assert (target / "a" / "evil").read_bytes() == b"evil"
    assert not (target / "a").is_symlink()
    assert (target / "ok").read_bytes() == b"fine"
    assert len(result.refused) == 1
    assert result.refused[0].startswith("refused 'a': ")
    assert result.symlinks == 0


def test_relative_symlink_out_then_a_file_through_it(target: Path, outside: Path) -> None:
    data = Tar().symlink("a", "../outside").file("a/evil", b"evil").bytes()
    result = run(data, target)
    assert len(result.refused) == 1
    assert not (target / "a").is_symlink()


def test_symlink_chain_to_outside(target: Path, outside: Path) -> None:
    data = (
        Tar()
        .symlink("a", "b")
        .symlink("b", "c")
        .symlink("c", str(outside))
        .file("a/x", b"1")
        .file("b/y", b"2")
        .file("c/z", b"3")
        .symlink("d", "a")
        .file("d/w", b"4")
        .bytes()
    )
    result = run(data, target)
    assert sorted(result.refused) == sorted(
        f"refused {name!r}: symlink collides with {name!r}, which is a directory" for name in "abcd"
    )
    assert {p for p in _listing(target)} == {"a", "a/x", "b", "b/y", "c", "c/z", "d", "d/w"}


def test_symlink_beneath_a_symlink_is_refused(target: Path, outside: Path) -> None:
    data = (
        Tar()
        .symlink("l", str(outside))
        .symlink("l/inner", "/etc/passwd")
        .symlink("m", "../outside")
        .symlink("m/sentinel", "x")
        .bytes()
    )
    result = run(data, target)
    assert os.readlink(target / "l") == str(outside)
    assert os.readlink(target / "m") == "../outside"
    assert sorted(result.refused) == [
        "refused 'l/inner': 'l' is not a directory",
        "refused 'm/sentinel': 'm' is not a directory",
    ]


def test_symlink_to_dir_then_hard_link_through_it(target: Path, outside: Path) -> None:
    data = (
        Tar()
        .file("f", b"data")
        .symlink("l", str(outside))
        .hardlink("l/x", "f")  # a real directory "l" is made; the symlink then collides
        .hardlink("h", "l/sentinel")  # "l/sentinel" was never extracted
        .hardlink("g", "l")  # a symlink is not a regular file
        .bytes()
    )
    result = run(data, target)
    assert (target / "l" / "x").read_bytes() == b"data"
    assert not (target / "l").is_symlink()
    assert not (target / "h").exists()
    assert not (target / "g").exists()
    assert len(result.refused) == 3
    assert result.hardlinks == 1


@pytest.mark.parametrize(
    ("linkname", "reason"),
    [
        ("/etc/passwd", "hard link target is absolute ('/etc/passwd')"),
        ("../x", "hard link target escapes the target ('../x')"),
        ("a/../../outside/sentinel", "hard link target escapes the target"),
        ("missing", "hard link target 'missing' is not a regular file restored before it"),
        ("later", "hard link target 'later' is not a regular file restored before it"),
        ("dir", "hard link target 'dir' is not a regular file restored before it"),
    ],
)
def test_bad_hard_links_are_refused(
    target: Path, outside: Path, linkname: str, reason: str
) -> None:
    data = (
        Tar()
        .dir("dir")
        .hardlink("evil", linkname)
        .file("later", b"x")
        .hardlink("good", "later")
        .bytes()
    )
    result = run(data, target)
    assert len(result.refused) == 1
    assert result.refused[0].startswith(f"refused 'evil': {reason}")
    assert not (target / "evil").exists()
    assert (target / "good").read_bytes() == b"x"
    assert os.stat(target / "later").st_nlink == 2


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (tarfile.CHRTYPE, "character device members are not restored"),
        (tarfile.BLKTYPE, "block device members are not restored"),
        (tarfile.FIFOTYPE, "FIFO members are not restored"),
    ],
)
def test_devices_and_fifos_are_refused(target: Path, kind: bytes, reason: str) -> None:
    data = Tar().special("dev/null", kind).file("after", b"x").bytes()
    result = run(data, target)
    assert result.refused == [f"refused 'dev/null': {reason}"]
    assert not (target / "dev").exists()
    assert (target / "after").read_bytes() == b"x"


def test_unknown_member_types_and_odd_roots_are_refused(target: Path) -> None:
    data = (
        Tar()
        .special("weird", b"Z")
        .file(".", b"a file standing for the target")
        .symlink("./", "/")
        .bytes()
    )
    result = run(data, target)
    assert len(result.refused) == 3
    assert "unsupported member type" in result.refused[0]
    assert os.listdir(target) == []


def test_an_existing_symlink_in_the_target_is_never_followed(target: Path, outside: Path) -> None:
    # The target is meant to be empty; even so nothing resolves through a link found there.
    os.symlink(str(outside), target / "a")
    os.symlink(str(outside / "sentinel"), target / "s")
    data = (
        Tar()
        .file("a/evil", b"evil")
        .dir("a/d")
        .file("s", b"overwrite?")
        .file("f", b"data")
        .hardlink("a/h", "f")
        .symlink("a/l", "x")
        .bytes()
    )
    result = run(data, target)
    assert len(result.refused) == 5
    assert (target / "f").read_bytes() == b"data"


# --- corrupt streams ------------------------------------------------------------------------


def _ustar_two_files() -> bytes:
    return Tar(tarfile.USTAR_FORMAT).file("one", b"1" * 10).file("two", b"2" * 10).bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda d: d[:1024], id="cut-at-a-member-boundary"),
        pytest.param(lambda d: d[: 1024 + 100], id="cut-inside-a-header"),
        pytest.param(lambda d: d[: 1024 + 512 + 5], id="cut-inside-data"),
        pytest.param(lambda d: d[: 512 + 5], id="cut-inside-the-first-data"),
        pytest.param(lambda d: d[:1024] + b"\x01" * 512 + d[1536:], id="corrupt-second-header"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: b"this is not a tar archive" * 100, id="garbage"),
        pytest.param(lambda d: d[:300], id="cut-inside-the-first-header"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_truncated_or_corrupt_archives(
    target: Path, mangle: Callable[[bytes], bytes], dry_run: bool
) -> None:
    with pytest.raises(IntegrityError) as caught:
        run(mangle(_ustar_two_files()), target, dry_run=dry_run)
    assert caught.value.exit_code == 3
    assert caught.value.message.startswith("archive is truncated or corrupt: ")


def test_truncated_big_member(target: Path) -> None:
    data = Tar().file("big", os.urandom(3 * CHUNK_SIZE)).bytes()
    with pytest.raises(IntegrityError):
        run(data[: 2 * CHUNK_SIZE], target)


def test_a_single_end_block_is_enough(target: Path) -> None:
    data = _ustar_two_files()
    end = 512 * 4
    assert data[end:] == bytes(len(data) - end)
    result = run(data[: end + 512], target)
    assert result.files == 2


def test_stream_errors_propagate(target: Path) -> None:
    class Broken:
        def read(self, size: int = -1) -> bytes:
            raise OSError("zstd: corrupted block")

    with pytest.raises(OSError, match="corrupted block"):
        extract(Broken(), target)  # type: ignore[arg-type]


# --- include and dry run --------------------------------------------------------------------


def _selection_archive(tar: Tar | None = None) -> bytes:
    return (
        (tar or Tar())
        .dir("etc", mode=0o750, mtime=MTIME + 1)
        .dir("etc/app", mode=0o700, mtime=MTIME + 2)
        .file("etc/app/a.conf", b"a")
        .file("etc/app/b.txt", b"b")
        .dir("docs")
        .file("docs/x.md", b"x")
        .dir("docs/deep")
        .file("docs/deep/y.md", b"y")
        .symlink("docs/link", "x.md")
        .hardlink("docs/hard", "etc/app/b.txt")
        .file("top.txt", b"t")
        .bytes()
    )


def test_include_a_directory_brings_its_subtree(target: Path) -> None:
    result = run(_selection_archive(), target, include=["docs"])
    assert _listing(target) == {
        "docs",
        "docs/x.md",
        "docs/deep",
        "docs/deep/y.md",
        "docs/link",
    }
    # the hard link's target was not selected: reported, not silently dropped
    assert result.refused == [
        "refused 'docs/hard': hard link target 'etc/app/b.txt' is not a regular file "
        "restored before it"
    ]
    assert result.skipped_not_included == 5
    assert (result.files, result.dirs, result.symlinks) == (2, 2, 1)


def test_include_a_file_brings_its_parents_with_their_attributes(target: Path) -> None:
    result = run(_selection_archive(), target, include=["*.conf"])
    assert _listing(target) == {"etc", "etc/app", "etc/app/a.conf"}
    assert snapshot(target)[b"etc"] == ("d", 0o750, MTIME + 1)
    assert snapshot(target)[b"etc/app"] == ("d", 0o700, MTIME + 2)
    assert result.refused == []
    assert (result.files, result.dirs) == (1, 2)


def test_include_several_patterns(target: Path) -> None:
    result = run(_selection_archive(), target, include=["/top.txt", "etc/app/*.txt", "*.md"])
    assert _listing(target) == {
        "top.txt",
        "etc",
        "etc/app",
        "etc/app/b.txt",
        "docs",
        "docs/x.md",
        "docs/deep",
        "docs/deep/y.md",
    }
    assert result.files == 4


def test_include_nothing_matches(target: Path) -> None:
    result = run(_selection_archive(), target, include=["nope"])
    assert os.listdir(target) == []
    assert result.skipped_not_included == 11
    assert result == ExtractResult(skipped_not_included=11)


@pytest.mark.parametrize("include", [(), ("docs", "*.conf")])
def test_dry_run_writes_nothing_and_counts_like_the_real_run(
    tmp_path: Path, target: Path, outside: Path, include: tuple[str, ...]
) -> None:
    data = _selection_archive(
        Tar()
        .file("../escape", b"no")
        .symlink("a", str(outside))
        .file("a/evil", b"evil")
        .special("fifo", tarfile.FIFOTYPE)
        .hardlink("bad", "/etc/passwd")
        .file("dup", b"1")
        .file("dup", b"22")
        .dir("d")
        .file("d", b"collides")
    )
    dry_progress: list[int] = []
    dry = run(data, target, include=include, dry_run=True, progress=dry_progress.append)
    assert os.listdir(target) == []
    real_progress: list[int] = []
    real = run(data, target, include=include, progress=real_progress.append)
    assert dry == replace(real, replaced=0, replaced_bytes=0)  # a dry run counts no sizes
    assert sum(dry_progress) == sum(real_progress) == real.bytes
    if not include:
        assert len(real.refused) == 5
        assert (real.files, real.symlinks, real.hardlinks, real.dirs) == (8, 1, 1, 6)
        assert real.bytes == len(b"evil") + len(b"1") + len(b"22") + 5
        assert (real.replaced, real.replaced_bytes) == (1, len(b"1"))  # "dup"


def test_dry_run_needs_no_writable_target(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    result = run(_selection_archive(), missing, dry_run=True)
    assert result.files == 5
    assert not missing.exists()


# --- property: whatever the archive, nothing outside is touched --------------------------------

_COMPONENTS = st.sampled_from(["a", "b", "c d", "..", ".", "", "\udcff"])
_NAMES = st.tuples(st.booleans(), st.lists(_COMPONENTS, min_size=1, max_size=4)).map(
    lambda pair: ("/" if pair[0] else "") + "/".join(pair[1])
)
_LINK_TARGETS = st.sampled_from(
    ["OUTSIDE", "OUTSIDE/sentinel", "../outside", "..", "a", "a/b", "../../", ".", "/", ""]
)
_MEMBERS = st.lists(
    st.one_of(
        st.tuples(st.just("file"), _NAMES, st.binary(max_size=20)),
        st.tuples(st.just("dir"), _NAMES, st.sampled_from([0o755, 0o555, 0o000])),
        st.tuples(st.just("symlink"), _NAMES, _LINK_TARGETS),
        st.tuples(st.just("hardlink"), _NAMES, st.one_of(_NAMES, _LINK_TARGETS)),
        st.tuples(st.just("fifo"), _NAMES, st.none()),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=_MEMBERS, include=st.sampled_from([(), ("a",), ("b/*",)]))
def test_fuzzed_archives_never_write_outside(
    members: list[tuple[str, str, object]], include: tuple[str, ...]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        target, outside = base / "target", base / "outside"
        target.mkdir()
        outside.mkdir()
        (outside / "sentinel").write_bytes(b"keep")
        tar = Tar()
        for kind, name, extra in members:
            if kind == "file":
                assert isinstance(extra, bytes)
                tar.file(name, extra)
            elif kind == "dir":
                assert isinstance(extra, int)
                tar.dir(name, mode=extra)
            elif kind == "symlink":
                assert isinstance(extra, str)
                tar.symlink(name, extra.replace("OUTSIDE", str(outside)))
            elif kind == "hardlink":
                assert isinstance(extra, str)
                tar.hardlink(name, extra.replace("OUTSIDE", str(outside)))
            else:
                tar.special(name, tarfile.FIFOTYPE)
        data = tar.bytes()
        try:
            dry = run(data, target, include=include, dry_run=True)
            assert os.listdir(target) == []
            real = run(data, target, include=include, same_owner=False)
            # A dry run knows no sizes of what a later member replaces: it counts none.
            assert replace(real, warnings=[], replaced=0, replaced_bytes=0) == dry
            # A restore counts what it wrote from the extractor's totals: what a listing
            # of the target would count, whatever the duplicates and links.
            on_disk = tally_tree(target)
            assert real.on_disk() == (on_disk.files, on_disk.bytes)
        finally:
            make_writable(target)
        assert sorted(os.listdir(base)) == ["outside", "target"]
        assert os.listdir(outside) == ["sentinel"]
        assert (outside / "sentinel").read_bytes() == b"keep"
        # nothing but regular files, directories and symlinks was made
        for path in _listing(target):
            mode = os.lstat(target / path).st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)


def test_select_filters_members_by_path_on_top_of_include(target: Path) -> None:
    """A per-member filter (what a chain restore uses: each path only from the archive its
    index names): members it rejects are left out as --include leaves them out."""
    asked: list[str] = []

    def select(path: str) -> bool:
        asked.append(path)
        return path != "docs/x.md"

    result = run(_selection_archive(), target, include=["docs"], select=select)
    assert _listing(target) == {"docs", "docs/deep", "docs/deep/y.md", "docs/link"}
    assert "docs/x.md" in asked and "top.txt" not in asked  # --include decides first
    assert result.skipped_not_included == 6
    # Without --include, only the filter decides.
    again = target.parent / "again"
    again.mkdir()
    run(_selection_archive(), again, select=lambda path: path.startswith("etc"))
    assert _listing(again) == {"etc", "etc/app", "etc/app/a.conf", "etc/app/b.txt"}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
@pytest.mark.parametrize("same_owner", [True, False])
def test_modes_exact_whatever_the_umask_when_chmod_is_skipped(
    target: Path, umask: int, same_owner: bool
) -> None:
    """Files are created with their permission bits, and chmod'ed only when the umask took
    some away or they have setuid/setgid/sticky bits: the result is exact either way."""
    same_owner = same_owner and IS_ROOT  # (as another user: both runs without owners)
    modes = [0o644, 0o600, 0o640, 0o666, 0o777, 0o444, 0o000, 0o2755, 0o4755, 0o1700]
    tar = Tar()
    for mode in modes:
        tar.file(f"m{mode:04o}", b"x", mode=mode)
    old = os.umask(umask)
    try:
        run(tar.bytes(), target, same_owner=same_owner)
    finally:
        os.umask(old)
    mask = 0o7777 if same_owner else 0o1777
    for mode in modes:
        assert stat.S_IMODE((target / f"m{mode:04o}").lstat().st_mode) == mode & mask, oct(mode)


def test_owner_set_when_a_setgid_directory_gives_new_files_another_group(target: Path) -> None:
    """New files take the group of a setgid directory: an archive's gid 0 still needs its
    fchown then (the owner it is created with is not assumed to be ours)."""
    assert IS_ROOT, "the suite runs as root (CI's container): chown needs it"
    os.chown(target, 0, 4321)
    os.chmod(target, 0o2775)
    run(
        Tar().file("a", b"a", uid=0, gid=0).file("b", b"b", uid=0, gid=4321).bytes(),
        target,
        same_owner=True,
    )
    assert (target / "a").lstat().st_gid == 0
    assert (target / "b").lstat().st_gid == 4321


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_of_gnu_tar_are_extracted_through_tarfile(
    tmp_path: Path, target: Path, fmt: str
) -> None:
    """A sparse member (GNU's old type ``S``, or PAX sparse records) is not one of ours:
    tarfile parses it and maps its data from the same buffer; small and large ones alike."""
    src = tmp_path / "src"
    src.mkdir()
    contents = {}
    for name, size in (("small", 100_000), ("large", 3 * CHUNK_SIZE + 12_345)):
        with open(src / name, "wb") as handle:
            handle.write(b"head")
            handle.seek(size // 2)
            handle.write(b"middle")
            handle.truncate(size)
        contents[name] = (src / name).read_bytes()
    (src / "plain").write_bytes(b"after the sparse ones")
    contents["plain"] = b"after the sparse ones"
    archive = tmp_path / "a.tar"
    subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "-cf", str(archive), "-C", str(src), "small",
         "large", "plain"],
        check=True,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        assert any(member.issparse() for member in tar)
    result = run(archive.read_bytes(), target)
    assert result.refused == [] and result.files == 3
    assert {name: (target / name).read_bytes() for name in contents} == contents
