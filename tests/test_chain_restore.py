"""Restore of an incremental backup (SPEC "Incremental archives", "Restore"): the chain
applied link by link into one staging dir, each path from the link the final index names;
deletions restored as deletions; --at, --include, --dry-run; a missing or damaged link is
exit 3 naming it, with nothing written to the target. And docs/RECOVERY.md's commands,
run with stock tar on a real chain."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudbackup.restore.chain import Membership
from tests.conftest import Clock, Env, make_tree

OLD = 1_600_000_000
ROOT = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, Any]:
    """What a restore must reproduce: type, mode, content or target of every path."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", st.st_mode & 0o7777)
            else:
                found[rel] = ("file", st.st_mode & 0o7777, path.read_bytes(), st.st_mtime_ns)
    return found


def age(root: Path) -> None:
    for path in [*root.rglob("*")]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


@pytest.fixture
def chain(env: Env, cli: Any, clock: Clock) -> tuple[Path, list[str], list[dict[str, Any]]]:
    """Four nights of a changing tree (a full, three incrementals); the ids and the tree as
    each backup saw it."""
    www = make_tree(
        env.tmp / "srv" / "www",
        {"index.html": "v1\n", "keep/a.txt": "a\n", "keep/b.txt": "b\n", "gone/x.txt": "x\n"},
    )
    os.symlink("index.html", www / "home.html")
    ids: list[str] = []
    states: list[dict[str, Any]] = []

    def night() -> None:
        age(www)
        result = cli("backup", "--json", www)
        assert result.exit_code == 0, result.stderr
        ids.append(json.loads(result.stdout)["results"][0]["id"])
        states.append(snapshot(www))
        clock.advance(days=1)

    night()
    (www / "index.html").write_text("v2, longer\n")  # changed
    (www / "new.txt").write_text("new\n")  # new
    night()
    shutil.rmtree(www / "gone")  # deleted
    (www / "home.html").unlink()
    os.symlink("new.txt", www / "home.html")  # a symlink retargeted
    (www / "keep" / "b.txt").rename(www / "keep" / "c.txt")  # renamed
    night()
    os.chmod(www / "keep" / "a.txt", 0o600)  # a mode alone
    (www / "index.html").write_text("v4\n")
    night()
    levels = [json.loads((env.source_dir("www") / f"{i}.manifest.json").read_text())["level"]
              for i in ids]
    assert levels == [0, 1, 2, 3]
    return www, ids, states


def test_the_chain_restores_the_newest_tree_exactly(
    env: Env, cli: Any, chain: tuple[Path, list[str], list[dict[str, Any]]]
) -> None:
    _www, ids, states = chain
    target = env.tmp / "restored"
    result = cli("restore", "www", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["id"] == ids[-1] and "4-link chain" in doc["detail"]
    assert snapshot(target) == states[-1]  # deletions too: no gone/, no keep/b.txt


@pytest.mark.parametrize("night", [0, 1, 2])
def test_at_restores_an_older_link_of_the_chain(
    env: Env, cli: Any, chain: tuple[Path, list[str], list[dict[str, Any]]], night: int
) -> None:
    _www, ids, states = chain
    target = env.tmp / "restored"
    result = cli("restore", ids[night], "--to", target)
    assert result.exit_code == 0, result.stderr
    assert snapshot(target) == states[night]


def test_include_and_dry_run_on_a_chain(
    env: Env, cli: Any, chain: tuple[Path, list[str], list[dict[str, Any]]]
) -> None:
    _www, ids, states = chain
    dry = cli("restore", "www", "--to", env.tmp / "dry", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert (doc["files"], doc["dry_run"]) == (5, True)
    assert not (env.tmp / "dry").exists()
    target = env.tmp / "some"
    result = cli("restore", "www", "--to", target, "--include", "keep", "--json")
    assert result.exit_code == 0, result.stderr
    assert {k: v for k, v in snapshot(target).items()} == {
        k: v for k, v in states[-1].items() if k.startswith("keep")
    }


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_missing_or_damaged_link_is_exit_3_naming_it_and_nothing_is_written(
    env: Env, cli: Any, chain: tuple[Path, list[str], list[dict[str, Any]]], damage: str
) -> None:
    _www, ids, _states = chain
    link = ids[1]
    (archive,) = env.source_dir("www").glob(f"{link}.*tar.zst")
    if damage == "missing":  # its manifest gone: the backup no longer exists
        (env.source_dir("www") / f"{link}.manifest.json").unlink()
    else:
        data = bytearray(archive.read_bytes())
        data[-5] ^= 0xFF
        archive.write_bytes(bytes(data))
    target = env.tmp / "restored"
    result = cli("restore", "www", "--to", target)
    assert result.exit_code == 3, result.stderr
    assert link in result.stderr
    assert not target.exists()
    assert [p.name for p in env.tmp.iterdir() if "restore" in p.name] == []


def test_a_forged_parent_in_a_link_is_refused(
    env: Env, cli: Any, chain: tuple[Path, list[str], list[dict[str, Any]]]
) -> None:
    """A link whose manifest does not name the backup before it as its parent (a link
    removed and another put in its place) is an integrity failure naming it."""
    _www, ids, _states = chain
    for name in (f"{ids[1]}.manifest.json",):
        path = env.source_dir("www") / name
        path.unlink()
        for other in env.source_dir("www").glob(f"{ids[1]}.*"):
            other.unlink()
    result = cli("restore", "www", "--to", env.tmp / "restored")
    assert result.exit_code == 3
    assert f"its parent {ids[1]} is missing" in result.stderr


# ---------------------------------------------------------------- docs/RECOVERY.md


def _recovery_script() -> str:
    text = (ROOT / "docs" / "RECOVERY.md").read_text()
    match = re.search(r"<!-- chain-recovery -->\n```sh\n(.*?)```", text, re.S)
    assert match, "docs/RECOVERY.md has no chain-recovery script"
    return match.group(1)


def test_recovery_md_restores_a_chain_with_stock_tar(
    env: Env, chain: tuple[Path, list[str], list[dict[str, Any]]]
) -> None:
    """The documented commands, as written, with stock tar, zstd and python3: every link
    extracted in order (later ones overwrite), then the paths the last index does not list
    removed."""
    _www, ids, states = chain
    directory = env.source_dir("www")
    target = env.tmp / "by-hand"
    target.mkdir()
    script = _recovery_script()
    env_vars = {
        **os.environ,
        "BACKUPS": str(directory),
        "TARGET": str(target),
        "LAST": ids[-1],
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env_vars,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = snapshot(target)
    want = states[-1]
    assert set(got) == set(want)
    for path, facts in want.items():  # tar restores content, mode and targets
        assert got[path][:3] == facts[:3], path


# Names whose order as strings differs from their order as path components ("a.b" sorts
# before "a/x" as a string, after it in walk order), and characters around "/" in code point.
_NAME = st.text(alphabet="ab.-_ ~é\udcff", min_size=1, max_size=3).filter(
    lambda name: name not in (".", "..")
)


@given(st.lists(st.lists(_NAME, min_size=1, max_size=3), unique_by=tuple, max_size=30), st.data())
def test_membership_answers_as_the_index_says_in_walk_order(
    components: list[list[str]], data: st.DataObject
) -> None:
    """The merge-join's answer for every member asked in walk order (a directory's entries
    sorted, each directory's tree right after it: component by component) is whether the
    index names it; a question out of that order is answered no."""
    walk = sorted(components)
    paths = ["/".join(parts) for parts in walk]
    named = data.draw(st.sets(st.sampled_from(paths))) if paths else set()
    join = Membership(iter([path for path in paths if path in named]))
    assert [join(path) for path in paths] == [path in named for path in paths]
    if len(named) > 1:
        first, *_, last = [path for path in paths if path in named]
        again = Membership(iter([path for path in paths if path in named]))
        assert again(last) and not again(first)  # passed, never seen again
