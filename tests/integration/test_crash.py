"""A backup killed with SIGKILL mid-write leaves the previous backups intact, lists nothing new,
and the next run cleans the stale ``.partial`` and succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
