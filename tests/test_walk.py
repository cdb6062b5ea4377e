"""walk: directory handles, the bounded window of descriptors, reopening with identity
checks, and the plain iterative visit used by restore."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.core.patterns import PathMatcher
from cloudbackup.fs import walk
from cloudbackup.fs.walk import ENTER, LEAVE, OTHER, DirCursor, DirTable, Replaced, visit_tree
from cloudbackup.sources.base import SourceContext
from cloudbackup.sources.directory import walk_tree
from tests.test_hostile_tree import deep_cleanup, make_chain

__all__ = ["deep_cleanup"]  # a fixture, used below

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def ctx_for(tmp: Path) -> tuple[SourceContext, list[tuple[str, str]]]:
    warnings: list[tuple[str, str]] = []
    ctx = SourceContext(
        spool_dir=tmp,
        backup_id="x-20261121T021500Z",
        exclude=PathMatcher(()),
        skip_inodes=frozenset(),
        warn=lambda category, message: warnings.append((category, message)),
    )
    return ctx, warnings


def test_the_walk_holds_a_bounded_number_of_descriptors_whatever_the_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deep_cleanup: list[Path]
) -> None:
    monkeypatch.setattr(walk, "default_capacity", lambda: 8)
    deep_cleanup.append(tmp_path / "src")
    make_chain(tmp_path / "src", 600)
    ctx, warnings = ctx_for(tmp_path)
    baseline = open_descriptors()
    peak = 0
    kept = []  # entries stay alive (a read-ahead window) without holding descriptors
    cursor = DirCursor()
    for entry in walk_tree(str(tmp_path / "src"), ctx):
        kept.append(entry)
        if entry.parent is not None and len(kept) % 7 == 0:
            cursor.fd_for(entry.parent)  # another user of the handles, as the writer is
        peak = max(peak, open_descriptors() - baseline)
    cursor.release()
    assert warnings == []
    assert len(kept) == 600 * 2
    assert kept[599].arcname == "/".join(["d"] * 600)
    assert kept[600].arcname == "/".join(["d"] * 599 + ["f"])  # the deepest file first
    assert kept[-1].arcname == "f"
    assert peak <= 8 + 3, peak  # the window, the root, a listing's descriptor
    del kept, entry
    assert open_descriptors() <= baseline  # nothing leaks once the entries are gone


def test_a_closed_directory_is_reopened_by_name_and_must_be_the_same(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for name in "abcdefgh":
        (root / name / "inner").mkdir(parents=True)
    table = DirTable(str(root), capacity=4)
    top = table.open_root()
    assert top.fd is not None
    handles = {}
    for name in "abcdefgh":
        st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
        handles[name] = top.open_child(name, st, top.fd)
    assert handles["a"].fd is None  # evicted: the window holds 4
    assert table.open_count() == 4
    fd = handles["a"].pin()
    try:
        assert os.listdir(fd) == ["inner"]
        assert os.fstat(fd).st_ino == os.stat(root / "a").st_ino
    finally:
        handles["a"].unpin()
    # "b" (closed) is moved away and another directory takes its name: never opened as "b".
    assert handles["b"].fd is None
    (root / "b").rename(tmp_path / "moved")
    (root / "b").mkdir()
    (root / "b" / "planted").write_text("x")
    with pytest.raises(Replaced) as caught:
        handles["b"].pin()
    assert caught.value.filename == f"{root}/b"
    # A symlink in its place is not followed either.
    (root / "b" / "planted").unlink()
    (root / "b").rmdir()
    (root / "b").symlink_to(tmp_path / "moved")
    with pytest.raises(Replaced):
        handles["b"].pin()


def test_a_closed_directory_is_reopened_through_dotdot_from_the_last_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_chain(tmp_path / "src", 60, file_after=False)
    table = DirTable(str(tmp_path / "src"), capacity=4)
    handle = table.open_root()
    chain = [handle]
    for _ in range(60):
        fd = handle.pin()
        st = os.stat("d", dir_fd=fd, follow_symlinks=False)
        child = handle.open_child("d", st, fd)
        handle.unpin()
        chain.append(child)
        handle = child
    assert [h.fd is not None for h in chain[55:]] == [False, False, True, True, True, True]
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    cursor = DirCursor()
    cursor.fd_for(chain[60])
    fd = cursor.fd_for(chain[55])  # five levels up from the one in use
    assert opened == ["..", ".."]  # 59 to 57 are still open: only 56 and 55 are opened
    assert os.fstat(fd).st_ino == chain[55].ino
    # The directory in use moved elsewhere: its ".." is no longer the recorded parent, so
    # the parent is found by name from its nearest open ancestor (and checked) instead.
    cursor.fd_for(chain[30])
    assert chain[29].fd is None and chain[30].fd is not None
    holder = tmp_path / "holder"
    holder.mkdir()
    os.rename(os.fsencode(tmp_path / "src") + b"/d" * 30, holder / "d")
    opened.clear()
    fd = cursor.fd_for(chain[29])
    assert opened[0] == ".." and "d" in opened[1:]
    assert os.fstat(fd).st_ino == chain[29].ino
    cursor.release()


def test_visit_tree_is_iterative_bounded_and_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deep_cleanup: list[Path]
) -> None:
    monkeypatch.setattr(walk, "default_capacity", lambda: 16)
    deep_cleanup.append(tmp_path / "t")
    make_chain(tmp_path / "t", 2000)
    baseline = open_descriptors()
    kinds = {ENTER: 0, LEAVE: 0, OTHER: 0}
    depth = peak = 0
    for visit in visit_tree(str(tmp_path / "t")):
        kinds[visit.kind] += 1
        depth += {ENTER: 1, LEAVE: -1, OTHER: 0}[visit.kind]
        assert os.fstat(visit.fd).st_ino == visit.parent.ino  # the holder's descriptor
        peak = max(peak, open_descriptors() - baseline)
    assert kinds == {ENTER: 2000, LEAVE: 2000, OTHER: 2000}
    assert depth == 0
    assert peak <= 16 + 3, peak
