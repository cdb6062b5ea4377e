"""Incremental chains offsite, over both destinations: the index uploaded before the
manifest, an incremental's manifest only after its parent's (pending uploads oldest first),
prune keeping a remote chain whole, a planted index in the bucket never a parent."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CliResult, Clock, Env, RemoteEnv, make_tree

CLI = Callable[..., CliResult]
HOST = "testhost"
OLD = 1_600_000_000


def tree(env: Env) -> Path:
    root = make_tree(env.tmp / "www", {f"docs/{i}.txt": f"line {i}\n" * 40 for i in range(10)})
    for path in [root, *root.rglob("*")]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)
    return root


def backup(cli: CLI, *args: Any) -> dict[str, Any]:
    result = cli("backup", "--json", *args)
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    return row  # type: ignore[no-any-return]


def test_index_before_manifest_and_parents_first(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock
) -> None:
    www = tree(env)
    # Two backups that stay local (no upload), then one uploaded: its parents go first.
    first = backup(cli, "--no-upload", www)
    clock.advance(hours=1)
    second = backup(cli, "--no-upload", www)
    clock.advance(hours=1)
    third = backup(cli, www)
    assert third["uploaded"] is True and third["level"] == "incr"
    keys = remote.keys(f"cloudbackup/{HOST}/www/")
    for row in (first, second, third):
        ident = row["id"]
        assert remote.key(HOST, "www", f"{ident}.index.zst") in keys
        assert remote.key(HOST, "www", f"{ident}.manifest.json") in keys
    assert remote.key(HOST, "www", f"{third['id']}.incr.tar.zst") in keys
    listed = json.loads(cli("list", "--where", "remote", "--json").stdout)["backups"]
    assert [(b["level"], b["parent"]) for b in listed] == [
        (0, None),
        (1, first["id"]),
        (2, second["id"]),
    ]
    # Every remote manifest records its index; the remote index is the local one.
    for row in (first, second, third):
        manifest = json.loads(remote.get(remote.key(HOST, "www", f"{row['id']}.manifest.json")))
        local = (env.source_dir("www") / f"{row['id']}.index.zst").read_bytes()
        assert manifest["index"]["size"] == len(local)
        assert remote.get(remote.key(HOST, "www", f"{row['id']}.index.zst")) == local
    assert cli("verify").exit_code == 0


def test_remote_prune_keeps_the_chain(env: Env, cli: CLI, remote: RemoteEnv, clock: Clock) -> None:
    www = tree(env)
    os.environ["CLOUDBACKUP_FULL_EVERY"] = "3"
    try:
        ids = []
        for _ in range(5):
            ids.append(backup(cli, www)["id"])
            clock.advance(hours=1)
    finally:
        del os.environ["CLOUDBACKUP_FULL_EVERY"]
    result = cli("prune", "--where", "remote", "--policy", "last=1", "--json")
    assert result.exit_code == 0, result.stderr
    (group,) = json.loads(result.stdout)["results"]
    # F I I F I: the last one needs the full before it; the first chain goes, newest first.
    assert group["delete"] == [ids[2], ids[1], ids[0]]
    assert {k["id"]: k["reasons"] for k in group["keep"]} == {
        ids[4]: ["last 1/1"],
        ids[3]: [f"base of {ids[4]}"],
    }
    keys = remote.keys(f"cloudbackup/{HOST}/www/")
    assert not any(ident in key for key in keys for ident in ids[:3])  # indexes too


def test_a_fresh_machine_makes_a_full_backup_whatever_the_bucket_holds(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock
) -> None:
    """The trust rule: an index in the bucket is never a parent (a planted one could make
    a backup skip files); without the local dir, the first backup is full."""
    www = tree(env)
    first = backup(cli, www)
    for path in env.source_dir("www").iterdir():
        path.unlink()  # a fresh machine: the local dir is gone, the bucket is not
    clock.advance(hours=1)
    second = backup(cli, www)
    assert second["level"] == "full" and second["uploaded"] is True
    assert second["changed_files"] == 10
    assert remote.key(HOST, "www", f"{first['id']}.index.zst") in remote.keys()


def test_verify_checks_every_ancestor_exists(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock
) -> None:
    www = tree(env)
    first = backup(cli, www)
    clock.advance(hours=1)
    second = backup(cli, www)
    ok = cli("verify", "--where", "all", "--json", "--deep")
    assert ok.exit_code == 0, ok.stdout
    details = {(r["id"], r["where"]): r["detail"] for r in json.loads(ok.stdout)["results"]}
    assert "chain of 2 link(s)" in details[(second["id"], "remote")]
    assert "index matches" in details[(second["id"], "local")]
    # The full disappears from both sides behind the tool's back: the incremental is broken.
    remote.delete(remote.key(HOST, "www", f"{first['id']}.manifest.json"))
    (env.source_dir("www") / f"{first['id']}.manifest.json").unlink()
    broken = cli("verify", "--where", "all", "--json", second["id"])
    assert broken.exit_code == 3
    for row in json.loads(broken.stdout)["results"]:
        assert "its chain is broken" in row["detail"] and "no full backup before it" in row["detail"]


def test_disaster_recovery_of_a_chain_on_a_fresh_machine(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new machine, an empty local dir, another host name: the chain comes from the
    bucket, its final index too (read for the restore only), each link verified."""
    www = tree(env)
    ids = []
    for night in range(3):
        (www / f"night{night}.txt").write_text(f"night {night}\n")
        if night == 2:
            (www / "docs" / "0.txt").unlink()
        ids.append(backup(cli, www)["id"])
        clock.advance(days=1)
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(env.tmp / "fresh"))
    monkeypatch.setenv("CLOUDBACKUP_HOST", "newbox")
    target = env.tmp / "restored"
    result = cli("restore", "www", "--host", HOST, "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["id"] == ids[-1] and doc["where_from"] == "remote"
    assert "3-link chain" in doc["detail"]
    restored = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert restored == sorted(
        [f"docs/{i}.txt" for i in range(1, 10)] + [f"night{n}.txt" for n in range(3)]
    )
    assert not (env.tmp / "fresh").exists() or not list((env.tmp / "fresh").rglob("*.tar*"))
    # A missing link in the bucket: exit 3 naming it, nothing written.
    (middle,) = [k for k in remote.keys() if ids[1] in k and ".incr.tar" in k]
    remote.delete(middle)
    broken = cli("restore", "www", "--host", HOST, "--to", env.tmp / "again")
    assert broken.exit_code == 3 and ids[1] in broken.stderr
    assert not (env.tmp / "again").exists()


def test_an_uploaded_incremental_counts_as_verified_offsite(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock
) -> None:
    """Its upload record (naming the .incr archive) is read back: not pinned, not sent again."""
    www = tree(env)
    backup(cli, www)
    clock.advance(hours=1)
    second = backup(cli, www)
    listed = json.loads(cli("list", "--where", "local", "--json").stdout)["backups"]
    assert [b["verified"] for b in listed] == [True, True]
    again = cli("upload", "--json")
    assert again.exit_code == 0, again.stderr
    assert second["id"] not in [
        r["id"] for r in json.loads(again.stdout).get("results", []) if r.get("parts_sent")
    ]
    status = json.loads(cli("status", "--json").stdout)
    assert status["hosts"][0]["sources"][0]["offsite"] is True


def test_a_damaged_local_link_is_taken_from_the_bucket(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock
) -> None:
    """The local copy of the chain's full fails its checksum while it is applied: the chain
    is applied again into a fresh staging directory, that link from the bucket."""
    www = tree(env)
    first = backup(cli, www)
    (www / "late.txt").write_text("late\n")
    clock.advance(hours=1)
    second = backup(cli, www)
    (archive,) = env.source_dir("www").glob(f"{first['id']}.tar.zst")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    target = env.tmp / "restored"
    result = cli("restore", "www", "--to", target, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["id"] == second["id"] and doc["where_from"] == "local+remote"
    assert f"{first['id']}: the local copy fails its checksum" in result.stderr
    assert sorted(p.name for p in target.rglob("*.txt")) == sorted(
        [f"{i}.txt" for i in range(10)] + ["late.txt"]
    )
