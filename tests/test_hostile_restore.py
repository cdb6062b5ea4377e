"""A restore into a directory someone else can write: the staging directory, the install and
the move aside are never followed through a symlink planted there.

The attacker owns the target's parent (``restore ID --to /home/alice/r`` run as root): they
can rename anything in it and plant symlinks or directories of their own, at any moment. Each
race is made deterministic by a hook in the code path (``os.mkdir`` right after the staging
directory is made, the extractor as it starts, the planner as it returns), never by sleeping.
Whatever is planted, nothing outside the target is written, chmod'ed or chown'ed, and what
is installed is the verified archive's.

Also: restored single files keep the archived mode (a private database stays private).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.restore import apply
from tests.conftest import CliResult, Env, make_tree

Cli = Callable[..., CliResult]
NOBODY = 65534
VICTIM_MODE = 0o711


# ---------------------------------------------------------------- helpers


@pytest.fixture
def victim(env: Env) -> Path:
    """A directory outside every target, with one file: it must never change."""
    path = make_tree(env.tmp / "victim", {"keep.txt": "the victim's own file\n"})
    path.chmod(VICTIM_MODE)
    return path


def victim_unchanged(victim: Path) -> None:
    st = victim.stat()
    assert stat.S_IMODE(st.st_mode) == VICTIM_MODE
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert sorted(os.listdir(victim)) == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "the victim's own file\n"


@pytest.fixture
def www(env: Env, cli: Cli) -> Path:
    """A directory source ``www`` backed up once (locally)."""
    src = make_tree(env.tmp / "www", {"index.html": "<h1>hi</h1>\n", "sub/page.html": "page\n"})
    src.chmod(0o755)
    result = cli("backup", "--no-upload", src)
    assert result.exit_code == 0, result.stderr
    return src


def stagings(parent: Path, name: str) -> list[str]:
    """The names of the restore staging directories for target ``name`` in ``parent``."""
    return sorted(
        entry.name
        for entry in os.scandir(parent)
        if entry.name.startswith(f".{name}.restore-") and not entry.name.endswith(".moved")
    )


def swap(parent: Path, name: str, planted: Callable[[Path], None]) -> Path:
    """Move the staging directory ``name`` in ``parent`` aside and plant something in its place."""
    moved = parent / f"{name}.moved"
    os.rename(parent / name, moved)
    planted(parent / name)
    return moved


def link_to(victim: Path) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(victim)


def foreign_dir(path: Path) -> None:
    """A directory of another user's (as root: nobody's)."""
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


def hook_mkdir(
    monkeypatch: pytest.MonkeyPatch, planted: Callable[[Path], None]
) -> list[Path]:
    """Right after the staging directory is made, swap it for ``planted``."""
    real_mkdir = os.mkdir
    moved: list[Path] = []
    fired: list[str] = []

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        name = os.path.basename(os.fspath(path))
        if ".restore-" not in name or fired:
            return
        fired.append(name)  # once: ``planted`` may make a directory of the same name
        if dir_fd is not None:
            parent = Path(os.readlink(f"/proc/self/fd/{dir_fd}"))
        else:
            parent = Path(os.path.dirname(os.path.abspath(path)))
        moved.append(swap(parent, name, planted))

    monkeypatch.setattr(os, "mkdir", mkdir)
    return moved


def hook_extract(
    monkeypatch: pytest.MonkeyPatch, parent: Path, target: str, planted: Callable[[Path], None]
) -> list[Path]:
    """As extraction starts (the staging directory made and checked), swap it for ``planted``."""
    real_extract = apply.extract
    moved: list[Path] = []

    def extract(*args: Any, **kwargs: Any) -> Any:
        (name,) = stagings(parent, target)
        moved.append(swap(parent, name, planted))
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(apply, "extract", extract)
    return moved


def no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr


# ---------------------------------------------------------------- directory targets


def test_a_symlink_planted_as_the_staging_directory_is_made_is_never_followed(
    env: Env, cli: Cli, www: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = hook_mkdir(monkeypatch, link_to(victim))
    target = env.work / "t"
    result = cli("restore", "www", "--to", target)
    assert moved, "the hook never ran"
    assert result.exit_code == 1, result.stderr
    no_traceback(result)
    result.assert_one_error("staging")
    victim_unchanged(victim)
    assert not target.exists() and not target.is_symlink()


def test_a_directory_of_another_user_planted_as_the_staging_directory_is_refused(
    env: Env, cli: Cli, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extracting into it would hand the attacker the restored data, then install their tree."""
    planted: list[Path] = []

    def plant(path: Path) -> None:
        foreign_dir(path)
        planted.append(path)

    hook_mkdir(monkeypatch, plant)
    target = env.work / "t"
    result = cli("restore", "www", "--to", target)
    assert planted, "the hook never ran"
    assert result.exit_code == 1, result.stderr
    no_traceback(result)
    result.assert_one_error("staging")
    assert os.listdir(planted[0]) == []
    assert not target.exists()


def test_a_staging_directory_swapped_for_a_symlink_while_extracting_is_never_followed(
    env: Env, cli: Cli, www: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = hook_extract(monkeypatch, env.work, "t", link_to(victim))
    target = env.work / "t"
    result = cli("restore", "www", "--to", target)
    assert moved, "the hook never ran"
    assert result.exit_code == 1, result.stderr
    no_traceback(result)
    result.assert_one_error("staging")
    victim_unchanged(victim)
    assert not target.exists() and not target.is_symlink()
    # The tree extracted into the directory held open is not left behind.
    assert os.listdir(moved[0]) == []


def test_a_staging_directory_swapped_for_another_directory_is_never_installed(
    env: Env, cli: Cli, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted: list[Path] = []

    def plant(path: Path) -> None:
        make_tree(path, {"evil.sh": "#!/bin/sh\n"})
        planted.append(path)

    hook_extract(monkeypatch, env.work, "t", plant)
    target = env.work / "t"
    result = cli("restore", "www", "--to", target)
    assert result.exit_code == 1, result.stderr
    no_traceback(result)
    result.assert_one_error("staging")
    assert not target.exists()
    assert os.listdir(planted[0]) == ["evil.sh"]  # theirs, left alone


def test_a_force_restore_moves_the_old_tree_aside_past_a_planted_symlink(
    env: Env, cli: Cli, www: Path, victim: Path, clock: Any
) -> None:
    target = make_tree(env.work / "t", {"old.txt": "old\n"})
    (env.work / "t.before-restore-20261121T021500Z").symlink_to(victim)
    result = cli("restore", "www", "--to", target, "--force")
    assert result.exit_code == 0, result.stderr
    victim_unchanged(victim)
    assert os.readlink(env.work / "t.before-restore-20261121T021500Z") == str(victim)
    aside = env.work / "t.before-restore-20261121T021500Z-2"
    assert (aside / "old.txt").read_text() == "old\n"
    assert (target / "index.html").read_text() == "<h1>hi</h1>\n"


def test_a_mount_point_target_gets_its_entries_and_a_planted_link_is_never_followed(
    env: Env, cli: Cli, www: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty mount point is filled entry by entry from a staging directory inside it."""
    target = env.work / "mnt"
    target.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(
        os.path, "ismount", lambda path: os.fspath(path) == str(target) or real_ismount(path)
    )
    ok = cli("restore", "www", "--to", target)
    assert ok.exit_code == 0, ok.stderr
    assert sorted(os.listdir(target)) == ["index.html", "sub"]

    empty = env.work / "mnt2"
    empty.mkdir()
    monkeypatch.setattr(
        os.path, "ismount", lambda path: os.fspath(path) == str(empty) or real_ismount(path)
    )
    moved = hook_extract(monkeypatch, empty, "cloudbackup", link_to(victim))
    result = cli("restore", "www", "--to", empty)
    assert moved, "the hook never ran"
    no_traceback(result)
    victim_unchanged(victim)
    # The entries come from the directory held open, whatever its name leads to now.
    assert result.exit_code == 0, result.stderr
    assert (empty / "index.html").read_text() == "<h1>hi</h1>\n"
    assert (empty / "sub" / "page.html").read_text() == "page\n"


def test_a_parent_of_the_target_swapped_for_a_symlink_after_planning_is_never_followed(
    env: Env, cli: Cli, www: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = env.work / "home" / "alice"
    parent.mkdir(parents=True)
    real_plan = apply.plan_target

    def plan_target(*args: Any, **kwargs: Any) -> Any:
        planned = real_plan(*args, **kwargs)
        os.rename(parent, parent.with_name("alice.old"))
        parent.symlink_to(victim)
        return planned

    monkeypatch.setattr(apply, "plan_target", plan_target)
    result = cli("restore", "www", "--to", parent / "r")
    assert result.exit_code == 1, result.stderr
    no_traceback(result)
    result.assert_one_error("symlink")
    victim_unchanged(victim)


def test_a_target_whose_parent_is_a_symlink_restores_into_the_resolved_directory(
    env: Env, cli: Cli, www: Path
) -> None:
    """The documented behaviour: a symlink on the way to --to is resolved once, at the start."""
    real = env.work / "real"
    real.mkdir()
    (env.work / "link").symlink_to(real)
    result = cli("restore", "www", "--to", env.work / "link" / "r")
    assert result.exit_code == 0, result.stderr
    assert (real / "r" / "index.html").read_text() == "<h1>hi</h1>\n"


# ---------------------------------------------------------------- single-file targets


@pytest.fixture
def dump(env: Env, cli: Cli) -> str:
    """A command source ``dump`` backed up once; its output is ``data``."""
    result = cli("backup", "--no-upload", "dump=cmd:printf data")
    assert result.exit_code == 0, result.stderr
    return "dump"


@pytest.fixture
def app_db(env: Env, cli: Cli) -> Path:
    """A private SQLite database ``app`` backed up once."""
    db = env.tmp / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (secret TEXT)")
        conn.execute("INSERT INTO t VALUES ('archived')")
    conn.close()
    db.chmod(0o600)
    result = cli("backup", "--no-upload", f"sqlite://{db}")
    assert result.exit_code == 0, result.stderr
    return db


def test_a_command_output_staged_then_swapped_is_taken_from_the_directory_held(
    env: Env, cli: Cli, dump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swapped-in directory holds a ``dump.out`` of the attacker's (or a victim's): it is
    never moved into the target; the verified member is."""
    decoy = make_tree(env.tmp / "decoy", {"dump.out": "the victim's file\n"})
    hook_extract(monkeypatch, env.work, "out.txt", link_to(decoy))
    target = env.work / "out.txt"
    result = cli("restore", dump, "--to", target)
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes() == b"data"
    assert (decoy / "dump.out").read_text() == "the victim's file\n"


def test_a_sqlite_database_staged_then_swapped_is_taken_from_the_directory_held(
    env: Env, cli: Cli, app_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = env.tmp / "decoy"
    decoy.mkdir()
    with sqlite3.connect(decoy / "app.sqlite3") as conn:
        conn.execute("CREATE TABLE t (secret TEXT)")
        conn.execute("INSERT INTO t VALUES ('the victim''s')")
    conn.close()
    hook_extract(monkeypatch, env.work, "new.db", link_to(decoy))
    target = env.work / "new.db"
    result = cli("restore", "app", "--to", target)
    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(target) as conn:
        assert conn.execute("SELECT secret FROM t").fetchall() == [("archived",)]
    conn.close()
    assert sorted(os.listdir(decoy)) == ["app.sqlite3"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_private_database_restored_to_a_new_path_stays_private(
    env: Env, cli: Cli, app_db: Path, umask_022: None
) -> None:
    target = env.work / "new.db"
    result = cli("restore", "app", "--to", target)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_command_output_restored_to_a_new_path_keeps_the_archived_mode(
    env: Env, cli: Cli, dump: str, umask_022: None
) -> None:
    target = env.work / "out.txt"
    result = cli("restore", dump, "--to", target)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_symlinked_local_dir_still_hosts_the_workspace_of_a_stdout_restore(
    env: Env, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local dir configured through a symlink (``/var/lib/cloudbackup -> /data/cb``): it
    is resolved once, like --to; only links that appear afterwards are refused."""
    real = env.tmp / "data-cb"
    real.mkdir()
    link = env.tmp / "cb-link"
    link.symlink_to(real)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(link))
    assert cli("backup", "--no-upload", "dump=cmd:printf data").exit_code == 0
    result = cli("restore", "dump", "--to", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "data"
