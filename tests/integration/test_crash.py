"""A backup killed with SIGKILL mid-write leaves the previous backups intact, lists nothing new,
and the next run cleans the stale ``.partial`` and succeeds; a streaming restore killed at any
point (reading, extracting, swapping) leaves nothing under the target's name that was not there
before, and the next restore into the same place cleans up after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import kill_when, make_tree

pytestmark = pytest.mark.slow


def _env(local_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBACKUP_")}
    env.update(CLOUDBACKUP_LOCAL_DIR=str(local_dir), CLOUDBACKUP_HOST="testhost", **extra)
    return env


def _cloudbackup(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudbackup", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listed(cwd: Path, env: dict[str, str]) -> list[str]:
    result = _cloudbackup(cwd, env, "list", "--where", "local", "--json")
    assert result.returncode == 0, result.stderr
    return [b["id"] for b in json.loads(result.stdout)["backups"]]


def test_kill_during_backup_then_recover(tmp_path: Path) -> None:
    src = make_tree(
        tmp_path / "data", {f"small/{i:03}.txt": f"file {i}\n" * 20 for i in range(300)}
    )
    local = tmp_path / "local"
    source_dir = local / "testhost" / "data"
    work = tmp_path / "work"
    work.mkdir()
    env = _env(local)

    first = _cloudbackup(work, env, "backup", str(src))
    assert first.returncode == 0, first.stderr
    (previous,) = _listed(work, env)
    previous_files = sorted(p.name for p in source_dir.iterdir())

    # Random data through xz runs at a few MB/s: slow enough to be killed mid-write.
    (src / "big.bin").write_bytes(os.urandom(24 * 1024 * 1024))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudbackup", "backup", str(src)],
        cwd=work,
        env=_env(local, CLOUDBACKUP_COMPRESSION="xz"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Let the archive grow a little past its first bytes before the kill.
    kill_when(proc, lambda: any(source_dir.glob("*.partial")), timeout=30, settle=0.3)

    assert _listed(work, env) == [previous]
    stale = sorted(source_dir.glob("*.partial"))
    assert stale, "the killed run left no .partial behind"
    # The archive (an incremental of the first backup) and its index, written in one pass.
    assert {p.name.rsplit(".", 3)[-3] for p in stale} <= {"tar", "index"}
    assert any(p.name.endswith(".incr.tar.xz.partial") for p in stale)
    assert (
        sorted(p.name for p in source_dir.iterdir() if not p.name.endswith(".partial"))
        == previous_files
    )
    assert _cloudbackup(work, env, "verify").returncode == 0

    again = _cloudbackup(work, env, "backup", str(src))  # zstd: fast
    assert again.returncode == 0, again.stderr
    assert list(source_dir.glob("*.partial")) == []
    listed = _listed(work, env)
    assert len(listed) == 2 and listed[0] == previous
    verify = _cloudbackup(work, env, "verify", "--json")
    assert verify.returncode == 0, verify.stdout
    assert all(r["ok"] for r in json.loads(verify.stdout)["results"])
    # The new backup is an incremental of the first: its chain restores the tree.
    assert (source_dir / f"{listed[1]}.index.zst").exists()
    restored = _cloudbackup(work, env, "restore", listed[1], "--to", str(tmp_path / "back"))
    assert restored.returncode == 0, restored.stderr
    assert sorted(p.name for p in (tmp_path / "back").rglob("*.*")) == sorted(
        p.name for p in src.rglob("*.*")
    )


@pytest.mark.parametrize("deletes_before_kill", [1, 2, 4, 7])
def test_kill_during_prune_of_chains_leaves_every_listed_backup_restorable(
    tmp_path: Path, deletes_before_kill: int
) -> None:
    """F I I F I, pruned with last=1: the first chain goes, newest first. A kill after any
    number of deletes leaves only backups whose chains are whole listed."""
    src = make_tree(tmp_path / "data", {f"d/{i}.txt": f"file {i}\n" for i in range(20)})
    local = tmp_path / "local"
    work = tmp_path / "work"
    work.mkdir()
    env = _env(local, CLOUDBACKUP_FULL_EVERY="3")
    for night in range(5):
        (src / f"night{night}.txt").write_text(f"{night}\n")
        made = _cloudbackup(work, env, "backup", str(src))
        assert made.returncode == 0, made.stderr
    before = _listed(work, env)
    assert len(before) == 5
    script = (
        "import os, cloudbackup.storage.local as l\n"
        "real = l.LocalStore.delete\n"
        "count = [0]\n"
        "def delete(self, key):\n"
        "    real(self, key)\n"
        "    count[0] += 1\n"
        f"    if count[0] == {deletes_before_kill}:\n"
        "        os.kill(os.getpid(), 9)\n"
        "l.LocalStore.delete = delete\n"
        "from cloudbackup.cli import main\n"
        "main(['prune', '--policy', 'last=1'])\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, timeout=60)
    assert killed.returncode == -9
    listed = _listed(work, env)
    assert before[-2:] == listed[-2:]  # the kept chain
    for index, ident in enumerate(listed):
        target = tmp_path / f"restore-{index}"
        restored = _cloudbackup(work, env, "restore", ident, "--to", str(target))
        assert restored.returncode == 0, (ident, restored.stderr)
    again = _cloudbackup(work, env, "prune", "--policy", "last=1")
    assert again.returncode == 0, again.stderr
    assert _listed(work, env) == before[-2:]


# ---------------------------------------------------------------- streaming restore

# Runs the CLI after arranging to SIGKILL itself at one rename of the restore: "from:NAME"
# (the target moved aside) or "to:NAME" (the staging directory moved into place), or never
# ("-"); decompressing in a child process (the pipeline's process stage), so that a kill
# while reading has a child to outlive. Test instrumentation only: the package has no hook.
_KILL_AT_RENAME = """
import os, signal, sys
import cloudbackup.restore.apply
cloudbackup.restore.apply.placement = lambda manifest: "child"
point = sys.argv[1]
if point != "-":
    side, name = point.split(":", 1)
    real = os.rename
    def rename(src, dst, *args, **kwargs):
        if (src if side == "from" else dst) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    os.rename = rename
from cloudbackup.cli.commands import main
main(sys.argv[2:])
"""


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _restoring(work: Path, env: dict[str, str], *args: str, kill_at: str = "-") -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", _KILL_AT_RENAME, kill_at, "restore", *args],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pid: int, timeout: float = 10) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def big_backup(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, bytes | None]]:
    """A backup large enough for every stage of a streaming restore to be caught at work."""
    files: dict[str, bytes | str] = {f"big/{i:02}.bin": os.urandom(400_000) for i in range(30)}
    files.update({f"small/{i // 100:02}/{i:04}.txt": f"file {i}\n" for i in range(3000)})
    src = make_tree(tmp_path / "data", files)
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path / "local")
    done = _cloudbackup(work, env, "backup", str(src))
    assert done.returncode == 0, done.stderr
    return work, env, _snapshot(src)


def _staging(work: Path, name: str) -> list[Path]:
    return sorted(work.glob(f".{name}.restore-*"))


@pytest.mark.parametrize("point", ["read", "extract"])
def test_kill_during_a_streaming_restore_leaves_nothing_under_the_target(
    big_backup: tuple[Path, dict[str, str], dict[str, bytes | None]], point: str
) -> None:
    """SIGKILL while the archive is read (the staging directory made, the decompression
    child started) or while it is extracted: nothing under the target's name, the child
    ends too, and the next restore into the same place (decompressing inline, the default)
    removes the dead staging directory."""
    work, env, expected = big_backup
    target = work / "t"
    proc = _restoring(work, env, "data", "--to", str(target))
    children: list[int] = []

    def ready() -> bool:
        children.extend(c for c in _children(proc.pid) if c not in children)
        staged = _staging(work, "t")
        if point == "read":
            return bool(staged) and bool(children)
        return bool(staged) and any((staged[0] / "small").glob("*/*.txt"))

    kill_when(proc, ready, timeout=30)
    assert not target.exists(), "something was put under the target's name"
    assert _staging(work, "t"), "the killed restore left no staging directory (killed too late)"
    assert children and all(_gone(c) for c in children), "the decompression child runs on"

    again = _cloudbackup(work, env, "restore", "data", "--to", str(target), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ok"] is True
    assert _snapshot(target) == expected
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("rename", ["from", "to"])
def test_kill_during_the_swap_never_mixes_old_and_new(
    big_backup: tuple[Path, dict[str, str], dict[str, bytes | None]], rename: str
) -> None:
    """With --force over an existing tree, SIGKILL just before the old tree is moved aside
    (the target is still the old tree, untouched) or just before the staging directory is
    moved in (the target's name is free, the old tree kept aside whole)."""
    work, env, expected = big_backup
    target = work / "t"
    make_tree(target, {"old.txt": "old", "keep/me.txt": "kept"})
    before = _snapshot(target)
    proc = _restoring(work, env, "data", "--to", str(target), "--force", kill_at=f"{rename}:t")
    proc.wait(timeout=60)
    assert proc.returncode == -9
    aside = sorted(work.glob("t.before-restore-*"))
    if rename == "from":
        assert _snapshot(target) == before and aside == []
    else:
        assert not target.exists()
        (old,) = aside
        assert _snapshot(old) == before

    again = _cloudbackup(work, env, "restore", "data", "--to", str(target), "--force", "--json")
    assert again.returncode == 0, again.stderr
    assert _snapshot(target) == expected
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []
