"""The walked tree is untrusted: swapped directories, depth, files that change size while
read, and what GNU tar keeps (sub-second mtimes, extended attributes, paths over 4,096
bytes). Each case goes through the CLI (backup, then restore) and failed before the walk
and the writer went by directory descriptor.

Swaps are deterministic: they happen when the walk hands out a given entry (a wrapper
around the source's entries), never after a sleep.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.core.model import Manifest
from cloudbackup.fs.tree import LinkInPath, empty_tree, open_directory, remove_tree, tally_tree
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import SourceContext
from cloudbackup.sources.directory import DirectorySource
from cloudbackup.stream import compress
from tests.conftest import CliResult, Env, make_tree
from tests.manifests import load_manifest

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
IS_ROOT = os.geteuid() == 0
NS = 1_000_000_000

Key = tuple[str, ...]


# ---------------------------------------------------------------- helpers


def make_chain(root: Path, depth: int, *, file_after: bool = True) -> None:
    """``root/d/d/.../d`` ``depth`` levels deep, through descriptors (any path length).
    With ``file_after``, each level also holds ``f`` (sorted after ``d``: the walk reads it
    on its way back up)."""
    root.mkdir()
    fd = os.open(root, DIR)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            if file_after:
                out = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(out, b"%d" % level)
                os.close(out)
            child = os.open("d", DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def rm_deep(path: Path) -> None:
    """Remove a tree of any depth (pytest's own cleanup uses shutil.rmtree, which recurses):
    iterative, by descriptor, one directory open at a time (back up through "..")."""
    if not os.path.lexists(path):
        return
    names: list[str] = []  # the path from ``path`` down to the open directory
    fd = os.open(path, DIR)
    os.fchmod(fd, 0o700)
    while True:
        subdir = None
        for name in os.listdir(fd):
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                subdir = name
                break
            os.unlink(name, dir_fd=fd)
        if subdir is not None:
            child = os.open(subdir, DIR, dir_fd=fd)
            os.fchmod(child, 0o700)
            os.close(fd)
            fd = child
            names.append(subdir)
            continue
        if not names:
            os.close(fd)
            break
        parent = os.open("..", DIR, dir_fd=fd)
        os.close(fd)
        fd = parent
        os.rmdir(names.pop(), dir_fd=fd)
    os.rmdir(path)


@pytest.fixture
def deep_cleanup() -> Iterator[list[Path]]:
    """Paths to remove with ``rm_deep`` after the test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        rm_deep(path)


def _xattrs(fd: int) -> dict[str, bytes]:
    return {name: os.getxattr(fd, name) for name in sorted(os.listxattr(fd))}


def tree_snapshot(root: Path) -> dict[Key, tuple[Any, ...]]:
    """Type, mode, mtime in ns, xattrs and content (or link target) of everything under
    ``root``; iterative and by descriptor, so any depth and path length works."""
    out: dict[Key, tuple[Any, ...]] = {}
    stack: list[tuple[Key, int]] = [((), os.open(root, DIR))]
    while stack:
        rel, fd = stack.pop()
        try:
            for name in sorted(os.listdir(fd)):
                key = (*rel, name)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    out[key] = ("l", os.readlink(name, dir_fd=fd), st.st_mtime_ns)
                elif stat.S_ISDIR(st.st_mode):
                    child = os.open(name, DIR, dir_fd=fd)
                    out[key] = ("d", mode, st.st_mtime_ns, _xattrs(child))
                    stack.append((key, child))
                else:
                    data_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                    with open(data_fd, "rb") as handle:
                        out[key] = ("f", mode, st.st_mtime_ns, _xattrs(data_fd), handle.read())
        finally:
            os.close(fd)
    return out


def on_entry(monkeypatch: pytest.MonkeyPatch, actions: dict[str, Callable[[], None]]) -> None:
    """Run ``actions[arcname]`` when a directory source's walk hands out that entry."""
    original = DirectorySource.entries

    def entries(self: DirectorySource, ctx: SourceContext) -> Iterator[FileEntry]:
        for entry in original(self, ctx):
            action = actions.get(entry.arcname)
            if action is not None:
                action()
            yield entry

    monkeypatch.setattr(DirectorySource, "entries", entries)


def archived(
    env: Env, source: str
) -> tuple[Manifest, dict[str, tarfile.TarInfo], dict[str, bytes]]:
    """The single backup of ``source``: its manifest, members and regular files' data."""
    (path,) = env.archives(source)
    (manifest_path,) = env.manifests(source)
    manifest = load_manifest(manifest_path)
    with path.open("rb") as raw:
        data = compress.open_decompressed(raw, manifest.compression).read()
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", errors="surrogateescape") as tar:
        for member in tar:
            members[member.name] = member
            if member.isreg():
                reader = tar.extractfile(member)
                assert reader is not None
                contents[member.name] = reader.read()
    return manifest, members, contents


def backup_ok(cli: Callable[..., CliResult], *args: Any) -> CliResult:
    result = cli("backup", "--no-upload", *args)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def restore_ok(cli: Callable[..., CliResult], source: str, target: Path) -> CliResult:
    result = cli("restore", source, "--to", target)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


# ---------------------------------------------------------------- swapped directories


def archived_names(env: Env, source: str) -> list[list[str]]:
    """The member names of every archive of ``source``, oldest first."""
    names = []
    for path in env.archives(source):
        with path.open("rb") as raw:
            data = compress.open_decompressed(raw, "zstd").read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            names.append(sorted(tar.getnames()))
    return names


@pytest.fixture
def alice(env: Env) -> tuple[Path, Path]:
    """``home/alice/proj/config`` (a user's tree in a root-run glob source) and a root-only
    directory holding a secret ``key.yaml``."""
    home = env.tmp / "home" / "alice"
    make_tree(home / "proj" / "config", {"app.yaml": "a: 1\n", "sub/b.yaml": "b: 2\n"})
    rootonly = make_tree(env.tmp / "rootonly", {"key.yaml": "secret: hunter2\n"})
    rootonly.chmod(0o700)
    return home, rootonly


@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_symlink_swapped_into_a_glob_prefix_fails_the_source_and_is_never_followed(
    env: Env, cli: Callable[..., CliResult], alice: tuple[Path, Path], where: str
) -> None:
    home, rootonly = alice
    spec = f"conf={home}/proj/config/**/*.yaml"
    other = make_tree(env.tmp / "www", {"index.html": "hi"})
    backup_ok(cli, spec)
    assert archived_names(env, "conf") == [["app.yaml", "sub", "sub/b.yaml"]]
    if where == "last":  # mv config config.old && ln -s /rootonly config
        link = home / "proj" / "config"
        os.rename(link, home / "proj" / "config.old")
        link.symlink_to(rootonly)
    else:  # mv proj proj.old && ln -s /elsewhere proj (whose config/ is root-only)
        link = home / "proj"
        os.rename(link, home / "proj.old")
        elsewhere = env.tmp / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "config").symlink_to(rootonly)
        link.symlink_to(elsewhere)
    result = cli("backup", "--no-upload", "--json", spec, other)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = result.assert_one_error("conf", str(link), "symlink")
    assert "hunter2" not in line
    by_source = {r["source"]: r for r in json.loads(result.stdout)["results"]}
    assert by_source["conf"]["ok"] is False and by_source["www"]["ok"] is True
    assert len(env.archives("conf")) == 1  # no new archive of conf
    for path in env.archives("conf"):
        with path.open("rb") as raw:
            assert b"hunter2" not in compress.open_decompressed(raw, "zstd").read()


def test_a_glob_prefix_swapped_after_it_was_opened_is_walked_as_opened(
    env: Env,
    cli: Callable[..., CliResult],
    alice: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefix is opened once and the walk gets that descriptor: a swap between the two
    changes nothing."""
    from cloudbackup.sources import glob as glob_module

    home, rootonly = alice
    real_walk = glob_module.walk_tree

    def walk_tree(*args: Any, **kwargs: Any) -> Iterator[FileEntry]:
        os.rename(home / "proj" / "config", home / "proj" / "config.old")
        (home / "proj" / "config").symlink_to(rootonly)
        return real_walk(*args, **kwargs)

    monkeypatch.setattr(glob_module, "walk_tree", walk_tree)
    backup_ok(cli, f"conf={home}/proj/config/**/*.yaml")
    assert archived_names(env, "conf") == [["app.yaml", "sub", "sub/b.yaml"]]


def test_a_directory_swapped_for_a_symlink_when_the_walk_reaches_it_is_never_followed(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mv src/a_user src/a_user.old && ln -s /outside src/a_user`` right after the walk saw
    ``a_user`` as a directory: the walk lists the directory it opened, never the link."""
    src = make_tree(env.tmp / "src", {"a_user/notes.txt": "mine", "z.txt": "z"})
    outside = make_tree(env.tmp / "outside", {"shadow": "root-only secret"})

    def swap() -> None:
        (src / "a_user").rename(src / "a_user.old")
        (src / "a_user").symlink_to(outside)

    on_entry(monkeypatch, {"a_user": swap})
    backup_ok(cli, src)
    _, members, contents = archived(env, "src")
    assert sorted(members) == ["a_user", "a_user/notes.txt", "z.txt"]
    assert contents["a_user/notes.txt"] == b"mine"
    assert b"root-only secret" not in contents.values()


def test_a_parent_swapped_after_its_files_were_listed_is_read_from_the_original(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory of a listed file becomes a symlink before the file is read: the file
    is read through the directory opened by the walk, not through the link."""
    src = make_tree(env.tmp / "src", {"a_user/data.txt": "original data", "b.txt": "b"})
    outside = make_tree(env.tmp / "outside", {"data.txt": "SECRET FROM OUTSIDE"})

    def swap() -> None:
        (src / "a_user").rename(src / "a_user.old")
        (src / "a_user").symlink_to(outside)

    on_entry(monkeypatch, {"a_user/data.txt": swap})
    backup_ok(cli, src)
    _, _, contents = archived(env, "src")
    assert contents == {"a_user/data.txt": b"original data", "b.txt": b"b"}


def test_an_ancestor_replaced_while_deep_in_the_walk_is_never_read_by_its_new_name(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With few descriptors, the walk closes ``a`` while deep below it; ``a`` is then moved
    and a planted directory takes its name. Back up in ``a``, the walk finds its way to the
    directory it was listing (checked by device and inode), never to the planted one."""
    import cloudbackup.fs.walk

    monkeypatch.setattr(cloudbackup.fs.walk, "default_capacity", lambda: 4)
    deep = "a/b/c/d/e/f/g"
    src = make_tree(env.tmp / "src", {f"{deep}/marker": "m", "a/zz.txt": "original"})

    def replace() -> None:
        (src / "a").rename(env.tmp / "a.moved")
        make_tree(src / "a", {"zz.txt": "PLANTED", "extra.txt": "PLANTED"})

    on_entry(monkeypatch, {f"{deep}/marker": replace})
    backup_ok(cli, src)
    _, _, contents = archived(env, "src")
    assert contents == {f"{deep}/marker": b"m", "a/zz.txt": b"original"}


# ---------------------------------------------------------------- depth


def test_a_2000_level_tree_is_backed_up_and_restored(
    env: Env, cli: Callable[..., CliResult], deep_cleanup: list[Path]
) -> None:
    src = env.tmp / "deep"
    deep_cleanup += [src, env.tmp / "out"]
    make_chain(src, 2000)
    before = tree_snapshot(src)
    result = backup_ok(cli, "--json", src)
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["ok"] and entry["warnings"] == [] and entry["file_count"] == 2000
    restore_ok(cli, "deep", env.tmp / "out")
    assert tree_snapshot(env.tmp / "out") == before


def test_tally_and_remove_handle_any_depth_and_path_length(
    tmp_path: Path, deep_cleanup: list[Path]
) -> None:
    deep = tmp_path / "deep"
    deep_cleanup += [deep, tmp_path / "wide"]  # in case remove_tree fails
    make_chain(deep, 2500)  # 2,500 levels: paths of 5,000 bytes
    wide = tmp_path / "wide"
    make_chain(wide, 30, file_after=False)
    long_dir = os.fsencode(wide) + b"/d" * 30
    fd = os.open(long_dir, DIR)
    for _ in range(20):  # 20 names of 250 bytes: a path over 5,000 bytes
        os.mkdir("x" * 250, dir_fd=fd)
        child = os.open("x" * 250, DIR, dir_fd=fd)
        os.close(fd)
        fd = child
    out = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd)
    os.write(out, b"12345")
    os.close(out)
    os.fchmod(fd, 0o555)  # read-only directories, as a restore may leave them
    os.close(fd)
    tally = tally_tree(deep)
    assert (tally.files, tally.bytes, tally.dirs) == (
        2500,
        sum(len(b"%d" % i) for i in range(2500)),
        2500,
    )
    tally = tally_tree(wide)
    assert (tally.files, tally.bytes, tally.dirs) == (1, 5, 50)
    remove_tree(deep)
    remove_tree(wide)
    assert sorted(os.listdir(tmp_path)) == []


def test_open_directory_never_follows_a_symlink_on_the_way(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "link").symlink_to(outside)
    for create in (False, True):
        with pytest.raises(LinkInPath) as caught:
            open_directory(tmp_path / "a" / "link" / "new", create=create)
        assert caught.value.filename == str(tmp_path / "a" / "link")
    assert os.listdir(outside) == []
    with pytest.raises(FileNotFoundError) as missing:
        open_directory(tmp_path / "a" / "x" / "y")
    assert missing.value.filename == str(tmp_path / "a" / "x")
    fd = open_directory(tmp_path / "a" / "x" / ".." / "made" / "here", create=True)
    try:
        assert os.path.samefile(f"/proc/self/fd/{fd}", tmp_path / "a" / "made" / "here")
    finally:
        os.close(fd)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        open_directory(tmp_path / "file" / "below", create=True)


def test_trees_through_a_descriptor_are_counted_and_emptied_never_through_links(
    tmp_path: Path,
) -> None:
    outside = make_tree(tmp_path / "outside", {"keep": "x"})
    root = make_tree(tmp_path / "root", {"a/f": "12345", "g": "1"})
    (root / "link").symlink_to(outside)
    os.chmod(root / "a", 0o500)
    fd = os.open(root, DIR)
    try:
        os.rename(root, tmp_path / "moved")  # by name it is gone; the descriptor holds it
        tally = tally_tree(fd)
        assert (tally.files, tally.bytes, tally.dirs) == (3, 6, 1)
        empty_tree(fd)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)
    assert os.listdir(outside) == ["keep"]
    (tmp_path / "dirlink").symlink_to(outside)
    dir_fd = os.open(tmp_path, DIR)
    try:
        remove_tree("dirlink", dir_fd=dir_fd)  # the link goes, not what it points to
        remove_tree("moved", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert os.listdir(outside) == ["keep"]


# ---------------------------------------------------------------- one source's failure


def test_an_unexpected_error_in_one_source_never_stops_the_next(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    trees = [make_tree(env.tmp / name, {"f.txt": name}) for name in ("first", "broken", "last")]
    original = DirectorySource.entries

    def entries(self: DirectorySource, ctx: SourceContext) -> Iterator[FileEntry]:
        if self.name == "broken":
            raise RecursionError("maximum recursion depth exceeded while walking")
        yield from original(self, ctx)

    monkeypatch.setattr(DirectorySource, "entries", entries)
    result = cli("backup", "--no-upload", "--json", *trees)
    assert result.exit_code == 1
    line = result.assert_one_error("broken", "RecursionError")
    assert "maximum recursion depth" in line
    outcome = {r["source"]: r for r in json.loads(result.stdout)["results"]}
    assert outcome["first"]["ok"] and outcome["last"]["ok"]
    assert not outcome["broken"]["ok"] and "RecursionError" in outcome["broken"]["error"]
    assert len(env.archives("first")) == len(env.archives("last")) == 1
    assert env.files("broken") == []  # no partial file left behind


# ---------------------------------------------------------------- files that change size


def test_a_file_that_shrinks_while_read_is_padded_and_the_backup_exits_1(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "src", {"app.log": b"0123456789" * 100, "z.txt": "intact"})
    on_entry(monkeypatch, {"app.log": lambda: os.truncate(src / "app.log", 100)})
    result = cli("backup", "--no-upload", src)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "app.log: shrank from 1000 to 100 bytes while reading; padded with zeros" in result.stderr
    )
    assert "ok (warnings)" in result.stdout
    manifest, _, contents = archived(env, "src")
    assert any("shrank" in w for w in manifest.warnings)
    assert contents == {"app.log": b"0123456789" * 10 + bytes(900), "z.txt": b"intact"}
    listing = subprocess.run(
        ["tar", "--zstd", "-tvf", env.archives("src")[0]], capture_output=True, text=True
    )
    assert listing.returncode == 0 and "z.txt" in listing.stdout


def test_a_file_that_grows_while_read_is_truncated_and_the_backup_exits_1(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "src", {"app.log": b"x" * 1000, "z.txt": "intact"})

    def grow() -> None:
        with open(src / "app.log", "ab") as handle:
            handle.write(b"y" * 500)

    on_entry(monkeypatch, {"app.log": grow})
    result = cli("backup", "--no-upload", src)
    assert result.exit_code == 1, result.stderr
    assert "app.log: grew from 1000 to 1500 bytes while reading; truncated" in result.stderr
    _, _, contents = archived(env, "src")
    assert contents == {"app.log": b"x" * 1000, "z.txt": b"intact"}
    restore_ok(cli, "src", env.tmp / "out")
    assert (env.tmp / "out/app.log").read_bytes() == b"x" * 1000


def test_a_shrinking_file_makes_the_run_exit_1_and_status_warn(
    env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "src", {"app.log": b"0123456789" * 100})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(src))
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    on_entry(monkeypatch, {"app.log": lambda: os.truncate(src / "app.log", 10)})
    run = cli("run")
    assert run.exit_code == 1, run.stderr
    assert "shrank" in run.stderr
    status = cli("status", "--json")
    assert status.exit_code == 1
    (host,) = json.loads(status.stdout)["hosts"]
    (row,) = host["sources"]
    assert row["state"] == "WARNING"
    assert "completed with warnings" in cli("status").stdout


# ---------------------------------------------------------------- fidelity


def _fidelity_tree(root: Path) -> None:
    make_tree(root, {"docs/a.txt": "alpha", "docs/b.bin": os.urandom(3000), "top.txt": "t"})
    os.symlink("docs/a.txt", root / "link")
    os.setxattr(root / "docs/a.txt", "user.comment", b"plain words")
    os.setxattr(root / "docs/a.txt", "user.blob", b"\x00\xff\xfe binary\n=value")
    os.setxattr(root / "docs", "user.dirattr", b"on a directory")
    if IS_ROOT:
        os.setxattr(root / "top.txt", "trusted.origin", b"root only")
    times = {
        "docs/a.txt": 1_700_000_000_123_456_789,
        "docs/b.bin": 1_600_000_000_000_000_001,
        "top.txt": 1_500_000_000_999_999_999,
        "link": 1_650_000_000_500_000_000,
        "docs": 1_400_000_000_000_000_007,
    }
    for rel, ns in times.items():
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)


def test_xattrs_and_nanosecond_mtimes_round_trip(env: Env, cli: Callable[..., CliResult]) -> None:
    src = env.tmp / "src"
    _fidelity_tree(src)
    before = tree_snapshot(src)
    assert before[("docs", "a.txt")][3] == {
        "user.blob": b"\x00\xff\xfe binary\n=value",
        "user.comment": b"plain words",
    }
    backup_ok(cli, src)
    _, members, _ = archived(env, "src")
    assert members["docs/a.txt"].pax_headers["mtime"] == "1700000000.123456789"
    assert members["docs/a.txt"].pax_headers["SCHILY.xattr.user.comment"] == "plain words"
    restore_ok(cli, "src", env.tmp / "out")
    assert tree_snapshot(env.tmp / "out") == before


def test_gnu_tar_restores_our_xattrs_and_nanosecond_mtimes(
    env: Env, cli: Callable[..., CliResult]
) -> None:
    src = env.tmp / "src"
    _fidelity_tree(src)
    before = tree_snapshot(src)
    backup_ok(cli, src)
    (path,) = env.archives("src")
    listing = subprocess.run(["tar", "--zstd", "-tvf", path], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert {line.split()[-1] for line in listing.stdout.splitlines() if "->" not in line} >= {
        "docs/a.txt",
        "docs/b.bin",
        "top.txt",
    }
    out = env.tmp / "gnu"
    out.mkdir()
    extract = subprocess.run(
        ["tar", "--zstd", "--xattrs", "--xattrs-include=*", "-xf", path, "-C", out],
        capture_output=True,
        text=True,
    )
    assert extract.returncode == 0, extract.stderr
    assert tree_snapshot(out) == before


def test_a_path_longer_than_4096_bytes_is_backed_up_and_restored(
    env: Env, cli: Callable[..., CliResult]
) -> None:
    src = env.tmp / "src"
    src.mkdir()
    fd = os.open(src, DIR)
    for _ in range(20):
        os.mkdir("n" * 250, dir_fd=fd)
        child = os.open("n" * 250, DIR, dir_fd=fd)
        os.close(fd)
        fd = child
    out = os.open("far.txt", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
    os.write(out, b"far away")
    os.close(out)
    os.close(fd)
    (src / "near.txt").write_text("near")
    before = tree_snapshot(src)
    assert max(len("/".join(key)) for key in before) > 5000
    backup_ok(cli, src)
    _, _, contents = archived(env, "src")
    assert contents["/".join(["n" * 250] * 20 + ["far.txt"])] == b"far away"
    restore_ok(cli, "src", env.tmp / "out")
    assert tree_snapshot(env.tmp / "out") == before


def test_a_deep_tree_planted_in_the_local_dir_does_not_stop_listing_or_backups(
    env: Env, cli: Callable[..., CliResult], deep_cleanup: list[Path]
) -> None:
    """The local dir is untrusted too: its listing (list, backup's id choice, prune) walks
    it iteratively."""
    src = make_tree(env.tmp / "src", {"f.txt": "x"})
    backup_ok(cli, src)
    planted = env.local_dir / "testhost" / "src" / "junk"
    deep_cleanup.append(planted)
    make_chain(planted, 2000)
    backup_ok(cli, src)
    listed = cli("list", "--where", "local", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert len(json.loads(listed.stdout)["backups"]) == 2
