"""The local dir is untrusted (SPEC "Everything read is untrusted"): symlinks planted in it
never make the tool write outside it. Each case was reproduced against the tool by hand:
``.lock``, ``.state/<host>.last-run.json.partial``, ``<id>.upload.json.partial`` and a
``<host>/<source>`` directory that is a symlink. Nothing outside the local dir is written;
one clear line; the right exit code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudbackup.context import machine_id, read_machine_id
from cloudbackup.core.errors import ConfigError
from cloudbackup.lock import DirLock
from cloudbackup.storage.local import LocalStore
from tests.conftest import CliResult, Env, RemoteEnv, make_tree

CLI = Callable[..., CliResult]
HOST = "testhost"


@pytest.fixture
def victim(env: Env) -> Path:
    """A file outside the local dir that nothing may write."""
    path = env.tmp / "victim"
    path.write_text("precious\n")
    return path


@pytest.fixture
def www(env: Env) -> Path:
    return make_tree(env.tmp / "www", {"index.html": "<h1>hi</h1>\n", "a/b.txt": "b\n"})


def test_a_symlink_at_the_lock_is_refused_and_its_target_untouched(
    env: Env, cli: CLI, www: Path, victim: Path
) -> None:
    env.local_dir.mkdir()
    (env.local_dir / ".lock").symlink_to(victim)
    result = cli("backup", "--no-upload", www)
    assert result.exit_code == 2
    result.assert_one_error(".lock", "symlink")
    assert victim.read_text() == "precious\n"  # not truncated, no PID written
    assert env.archives("www") == []


def test_a_fifo_at_the_lock_is_refused_without_hanging(env: Env, cli: CLI, www: Path) -> None:
    env.local_dir.mkdir()
    os.mkfifo(env.local_dir / ".lock")
    result = cli("backup", "--no-upload", www)
    assert result.exit_code == 2
    result.assert_one_error(".lock", "not a regular file")


def test_the_lock_still_excludes_a_second_run(env: Env) -> None:
    with DirLock(env.local_dir):
        from cloudbackup.core.errors import LockHeld

        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            DirLock(env.local_dir).acquire()
    assert (env.local_dir / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_symlink_at_the_state_files_partial_name_is_never_written_through(
    env: Env, cli: CLI, www: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(www))
    (env.local_dir / ".state").mkdir(parents=True)
    (env.local_dir / ".state" / f"{HOST}.last-run.json.partial").symlink_to(victim)
    result = cli("run")
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious\n"
    state = json.loads((env.local_dir / ".state" / f"{HOST}.last-run.json").read_text())
    assert state["exit_code"] == 0


def test_a_symlinked_state_dir_is_never_followed(
    env: Env, cli: CLI, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(www))
    elsewhere = env.tmp / "elsewhere"
    elsewhere.mkdir()
    env.local_dir.mkdir()
    (env.local_dir / ".state").symlink_to(elsewhere)
    result = cli("run")
    assert result.exit_code == 0, result.stderr  # the backups were made
    assert "cannot write the state file" in result.stderr and "Traceback" not in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_symlink_at_the_upload_records_partial_name_is_never_written_through(
    env: Env, cli: CLI, www: Path, victim: Path, remote: RemoteEnv
) -> None:
    result = cli("backup", "--no-upload", "--json", www)
    assert result.exit_code == 0, result.stderr
    (backup_id,) = [r["id"] for r in json.loads(result.stdout)["results"]]
    (env.source_dir("www") / f"{backup_id}.upload.json.partial").symlink_to(victim)
    result = cli("upload")
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == "precious\n"
    record = json.loads((env.source_dir("www") / f"{backup_id}.upload.json").read_text())
    assert record["verified_at"]


def test_a_symlinked_source_dir_fails_that_source_and_writes_nothing_there(
    env: Env, cli: CLI, www: Path
) -> None:
    other = env.tmp / "other"
    other.mkdir()
    (env.local_dir / HOST).mkdir(parents=True)
    (env.local_dir / HOST / "www").symlink_to(other)
    etc = make_tree(env.tmp / "etc", {"hosts": "127.0.0.1 localhost\n"})
    result = cli("backup", "--no-upload", "--json", www, etc)
    assert result.exit_code == 1
    line = result.assert_one_error("www", "symlink")
    assert str(env.local_dir / HOST / "www") in line
    assert list(other.iterdir()) == []  # no archive, no manifest, no partial file
    by_source = {r["source"]: r for r in json.loads(result.stdout)["results"]}
    assert by_source["www"]["ok"] is False and by_source["etc"]["ok"] is True
    assert len(env.archives("etc")) == 1


def test_stale_partials_are_cleaned_only_in_real_source_dirs(
    env: Env, cli: CLI, www: Path
) -> None:
    other = env.tmp / "other"
    other.mkdir()
    (other / "keep.tar.zst.partial").write_text("not ours\n")
    (env.local_dir / HOST).mkdir(parents=True)
    (env.local_dir / HOST / "db").symlink_to(other)
    result = cli("backup", "--no-upload", www)
    assert result.exit_code == 0, result.stderr
    assert (other / "keep.tar.zst.partial").exists()


def test_the_local_store_never_lists_or_reads_through_links(env: Env, victim: Path) -> None:
    local = env.local_dir
    (local / HOST / "www").mkdir(parents=True)
    (local / HOST / "www" / "www-20261121T021500Z.manifest.json").symlink_to(victim)
    (local / HOST / "etc").symlink_to(victim.parent)
    store = LocalStore(local)
    assert list(store.list()) == []
    assert store.head(f"{HOST}/www/www-20261121T021500Z.manifest.json") is None
    with pytest.raises(OSError):
        store.get_bytes(f"{HOST}/www/www-20261121T021500Z.manifest.json")
    with pytest.raises(OSError):
        store.get_bytes(f"{HOST}/etc/victim")
    with pytest.raises(FileExistsError):
        store.put_bytes(f"{HOST}/www/www-20261121T021500Z.manifest.json", b"{}")
    assert victim.read_text() == "precious\n"


def test_a_planted_machine_id_link_is_neither_read_nor_written(env: Env, victim: Path) -> None:
    env.local_dir.mkdir()
    (env.local_dir / ".machine-id").symlink_to(victim)
    none = [env.tmp / "no-machine-id"]
    assert read_machine_id(env.local_dir, none) is None  # "precious" is not taken as an id
    with pytest.raises(ConfigError, match="is not a machine id"):
        machine_id(env.local_dir, none)
    assert victim.read_text() == "precious\n"
    (env.local_dir / ".machine-id").unlink()
    made = machine_id(env.local_dir, none)
    assert read_machine_id(env.local_dir, none) == made
    assert (env.local_dir / ".machine-id").stat().st_mode & 0o777 == 0o644


def test_the_prometheus_file_is_replaced_never_written_through_a_link(
    env: Env, victim: Path
) -> None:
    from cloudbackup.ops.status import write_prometheus

    out = env.tmp / "metrics"  # node_exporter's textfile directory: often group-writable
    out.mkdir()
    (out / "cloudbackup.prom").symlink_to(victim)
    predictable = out / f".cloudbackup.prom.{os.getpid()}.tmp"  # the old temp file's name
    predictable.symlink_to(victim)
    write_prometheus(out / "cloudbackup.prom", "x 1\n")
    assert victim.read_text() == "precious\n"
    assert not (out / "cloudbackup.prom").is_symlink()
    assert (out / "cloudbackup.prom").read_text() == "x 1\n"
    assert (out / "cloudbackup.prom").stat().st_mode & 0o777 == 0o644
    predictable.unlink()
    assert sorted(p.name for p in out.iterdir()) == ["cloudbackup.prom"]
