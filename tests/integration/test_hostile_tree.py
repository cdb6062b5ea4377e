"""A 2,000-level tree, backed up and restored by the CLI in processes whose soft
``RLIMIT_NOFILE`` is 256 (cron and systemd often give 1,024; one descriptor per level
would need 2,000): the walk, the writer and the extractor keep a bounded window of
directory descriptors."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_tree import deep_cleanup, make_chain, tree_snapshot

pytestmark = pytest.mark.slow
__all__ = ["deep_cleanup"]  # a fixture, used below

SOFT_LIMIT = 256


def _limited() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, hard))


def _cloudbackup(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDBACKUP_")}
    env.update(CLOUDBACKUP_LOCAL_DIR=str(tmp / "local"), CLOUDBACKUP_HOST="testhost")
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, sys; from cloudbackup.cli import main; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], file=sys.stderr); main()",
            *args,
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited,
    )


def test_a_2000_level_tree_round_trips_under_a_256_descriptor_limit(
    tmp_path: Path, deep_cleanup: list[Path]
) -> None:
    src = tmp_path / "deep"
    out = tmp_path / "restored"
    deep_cleanup += [src, out]
    make_chain(src, 2000)  # each level: "d", then the file "f" read on the way back up
    before = tree_snapshot(src)

    backup = _cloudbackup(tmp_path, "backup", "--no-upload", "--json", str(src))
    assert backup.stderr.splitlines()[0] == str(SOFT_LIMIT)  # the limit was in force
    assert backup.returncode == 0, backup.stderr
    (result,) = json.loads(backup.stdout)["results"]
    assert result["ok"] and result["warnings"] == [] and result["file_count"] == 2000

    restore = _cloudbackup(tmp_path, "restore", "deep", "--to", str(out))
    assert restore.returncode == 0, restore.stderr
    assert "Too many open files" not in restore.stderr + backup.stderr
    assert tree_snapshot(out) == before
