"""fs.dirs, the safe-directory primitives the local dir and the directory destination share:
component-by-component opening without following links, exclusive temp files, publishing
that never overwrites (on every way a filesystem offers), listings by lstat."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudbackup.fs import dirs
from cloudbackup.fs.dirs import TEMP_PREFIX, Dir, NotFollowed, walk_files


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Dir]:
    (tmp_path / "root").mkdir()
    with Dir.root(tmp_path / "root") as directory:
        yield directory


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def test_subdirectories_are_made_and_opened_without_following_links(
    root: Dir, tmp_path: Path
) -> None:
    with root.descend(["a", "b"], create=True) as b:
        assert b.path == root.path / "a" / "b"
        b.write_atomic("f", b"x")
    assert (root.path / "a" / "b" / "f").read_bytes() == b"x"
    (root.path / "link").symlink_to(tmp_path)
    with pytest.raises(NotFollowed) as caught:
        root.sub("link", create=True)
    assert caught.value.errno == errno.ELOOP and "never followed" in str(caught.value)
    (root.path / "file").write_text("")
    with pytest.raises(NotFollowed):
        root.descend(["file", "x"], create=True)
    with pytest.raises(FileNotFoundError):
        root.sub("missing")
    for bad in ("..", ".", "", "a/b"):
        with pytest.raises(ValueError):
            root.sub(bad)


def test_publishing_never_overwrites_anything(root: Dir, victim: Path) -> None:
    (root.path / "file").write_text("old")
    (root.path / "link").symlink_to(victim)
    (root.path / "dangling").symlink_to(root.path / "nothing")
    for name in ("file", "link", "dangling"):
        with pytest.raises(FileExistsError):
            root.write_atomic(name, b"new")
    assert (root.path / "file").read_text() == "old" and victim.read_text() == "precious\n"
    assert not (root.path / "nothing").exists()
    assert not [p for p in root.path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_replacing_replaces_a_link_itself_never_its_target(root: Dir, victim: Path) -> None:
    (root.path / "state.json").symlink_to(victim)
    root.write_atomic("state.json", b"{}", replace=True)
    assert not (root.path / "state.json").is_symlink()
    assert (root.path / "state.json").read_bytes() == b"{}" and victim.read_text() == "precious\n"


def test_temp_files_are_new_random_and_never_through_a_link(root: Dir, victim: Path) -> None:
    name, fd = root.create_temp()
    os.close(fd)
    other, fd = root.create_temp()
    os.close(fd)
    assert name != other and name.startswith(TEMP_PREFIX)
    (root.path / "planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        root.create("planted")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("way", ["renameat2", "link", "check-then-rename"])
def test_every_way_of_publishing_refuses_an_existing_name(
    root: Dir, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """Filesystems without RENAME_NOREPLACE (NFS, some FUSE) and without hard links
    (some SMB mounts) still never get a backup file overwritten."""
    if way != "renameat2":
        monkeypatch.setattr(dirs, "_renameat2", None)
    if way == "check-then-rename":
        def no_links(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    root.write_atomic("a", b"first")
    with pytest.raises(FileExistsError):
        root.write_atomic("a", b"second")
    assert (root.path / "a").read_bytes() == b"first"
    assert sorted(p.name for p in root.path.iterdir()) == ["a"]


def test_a_failed_write_leaves_no_temp_file(root: Dir, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        root.write_atomic("x", b"data")
    assert list(root.path.iterdir()) == []


def test_files_are_read_only_when_regular_and_never_through_a_link(
    root: Dir, victim: Path
) -> None:
    (root.path / "f").write_text("mine")
    assert root.read_file("f") == b"mine" and root.read_file("f", limit=2) == b"mi"
    (root.path / "link").symlink_to(victim)
    with pytest.raises(OSError) as caught:
        root.open_file("link")
    assert caught.value.errno == errno.ELOOP
    os.mkfifo(root.path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        root.open_file("fifo")  # and it did not block waiting for a writer


def test_walk_files_lists_regular_files_by_lstat_to_a_bounded_depth(
    root: Dir, victim: Path
) -> None:
    with root.descend(["h", "s"], create=True) as s:
        s.write_atomic("a", b"1")
        s.write_atomic("b", b"22")
        with s.sub("deeper", create=True) as deeper:
            deeper.write_atomic("c", b"3")
    (root.path / "h" / "s" / "link").symlink_to(victim)
    (root.path / "h" / "linked-dir").symlink_to(victim.parent)
    found = [(rel, name, st.st_size) for rel, name, st in walk_files(root, max_depth=2)]
    assert found == [(("h", "s"), "a", 1), (("h", "s"), "b", 2)]
    deep = [name for _, name, _ in walk_files(root, max_depth=3)]
    assert deep == ["a", "b", "c"]
    skipped = [name for _, name, _ in walk_files(root, max_depth=3, skip=lambda d, n: n == "a")]
    assert skipped == ["b", "c"]


def test_a_deep_planted_tree_does_not_stop_a_listing(root: Dir) -> None:
    path = root.path
    for _ in range(300):
        path = path / "d"
    path.mkdir(parents=True)
    (root.path / "top").write_text("x")
    assert [name for _, name, _ in walk_files(root, max_depth=16)] == ["top"]
