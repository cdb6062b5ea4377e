"""Incremental chains with encryption (SPEC "Incremental archives", "Encryption"), over both
destinations: the index goes through the age stage like its archive (the bucket holds only
`<id>.index.zst.age`), the plaintext newest index stays in the local dir only and is the next
incremental's parent (a host with recipients and no identity still makes incrementals), a
missing or damaged plaintext index means a full backup, and a chain comes back from the
bucket alone with the identity: through the tool, and through docs/RECOVERY.md's stock-tools
path (`age -d` + `zstd` + `tar`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.stream.age import generate_identity
from tests.conftest import HOST, CliResult, Clock, Env, RemoteEnv, make_tree
from tests.test_chain_restore import _recovery_script

pytestmark = pytest.mark.slow

CLI = Callable[..., CliResult]
OLD = 1_600_000_000
AGE_MAGIC = b"age-encryption.org/v1"


class Keys:
    def __init__(self, directory: Path) -> None:
        self.secret, self.recipient = generate_identity()
        self.path = directory / "key.txt"
        self.path.write_text(f"{self.secret}\n")
        self.path.chmod(0o600)


@pytest.fixture
def keys(env: Env, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """The restorer's identity, kept apart; this host has the recipient only."""
    vault = env.tmp / "vault"
    vault.mkdir()
    found = Keys(vault)
    monkeypatch.setenv("CLOUDBACKUP_AGE_RECIPIENTS", found.recipient)
    monkeypatch.delenv("CLOUDBACKUP_AGE_IDENTITY_FILE", raising=False)
    return found


def tree(env: Env) -> Path:
    root = make_tree(
        env.tmp / "www",
        {f"docs/secret-name-{i}.txt": f"line {i}\n" * 40 for i in range(6)} | {"gone.txt": "x\n"},
    )
    settle(root)
    return root


def settle(root: Path) -> None:
    """Old timestamps: nothing is "racy clean" (SPEC: re-archived when too recent)."""
    for path in [root, *root.rglob("*")]:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def backup(cli: CLI, *args: Any) -> dict[str, Any]:
    result = cli("backup", "--json", *args)
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    return row  # type: ignore[no-any-return]


def three_nights(env: Env, cli: CLI, clock: Clock) -> tuple[Path, list[dict[str, Any]]]:
    """A full, an incremental with a change and a deletion, then an unchanged re-run."""
    www = tree(env)
    rows = [backup(cli, www)]
    clock.advance(days=1)
    (www / "docs" / "secret-name-0.txt").write_text("changed\n")
    (www / "gone.txt").unlink()
    (www / "new-secret-name.txt").write_text("new\n")
    for changed in (www / "docs" / "secret-name-0.txt", www / "new-secret-name.txt"):
        os.utime(changed, (OLD, OLD))  # changed by size, not "racy" in the unchanged re-run
    rows.append(backup(cli, www))
    clock.advance(days=1)
    rows.append(backup(cli, www))
    return www, rows


def test_an_encrypted_chain_is_incremental_uploaded_as_ciphertext_and_restored_from_the_bucket(
    env: Env,
    cli: CLI,
    remote: RemoteEnv,
    clock: Clock,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    www, rows = three_nights(env, cli, clock)
    ids = [row["id"] for row in rows]
    # Only recipients here: the re-runs are still incrementals, the unchanged one tiny.
    assert [row["level"] for row in rows] == ["full", "incr", "incr"]
    assert rows[2]["changed_files"] == 0 and rows[1]["changed_files"] == 2
    local = env.source_dir("www")
    for ident in ids:
        # Locally: the encrypted index (uploaded) and the plaintext one (the next parent).
        assert (local / f"{ident}.index.zst.age").read_bytes().startswith(AGE_MAGIC)
        assert not (local / f"{ident}.index.zst").read_bytes().startswith(AGE_MAGIC)
    keys_in_bucket = remote.keys()
    indexes = [k for k in keys_in_bucket if ".index." in k]
    assert sorted(indexes) == sorted(remote.key(HOST, "www", f"{i}.index.zst.age") for i in ids)
    for ident in ids:
        manifest = json.loads(remote.get(remote.key(HOST, "www", f"{ident}.manifest.json")))
        data = remote.get(remote.key(HOST, "www", f"{ident}.index.zst.age"))
        # The manifest describes the object uploaded: ciphertext, with no path in it.
        assert manifest["index"] == {
            "name": f"{ident}.index.zst.age",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert data.startswith(AGE_MAGIC)
        assert b"secret-name" not in data and b"docs/" not in data
        assert "secret-name" not in json.dumps(manifest)

    # A fresh machine, from the bucket alone: without an identity, exit 2 and nothing written.
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(env.tmp / "fresh"))
    monkeypatch.setenv("CLOUDBACKUP_HOST", "drbox")
    target = env.tmp / "restored"
    refused = cli("restore", "www", "--host", HOST, "--to", target)
    assert refused.exit_code == 2, refused.stderr
    refused.assert_one_error("is encrypted", "needs CLOUDBACKUP_AGE_IDENTITY_FILE")
    assert not target.exists()
    dry = cli("restore", "www", "--host", HOST, "--to", target, "--dry-run")
    assert dry.exit_code == 2 and "needs CLOUDBACKUP_AGE_IDENTITY_FILE" in dry.stderr
    # With the identity: the chain, its final index decrypted, the deletion honoured.
    monkeypatch.setenv("CLOUDBACKUP_AGE_IDENTITY_FILE", str(keys.path))
    restored = cli("restore", "www", "--host", HOST, "--to", target, "--json")
    assert restored.exit_code == 0, restored.stderr
    doc = json.loads(restored.stdout)
    assert doc["id"] == ids[-1] and doc["where_from"] == "remote"
    assert "3-link chain" in doc["detail"]
    assert files(target) == files(www)
    assert not (target / "gone.txt").exists()
    # verify --deep from the bucket reads the encrypted index as stored.
    deep = cli("verify", "--deep", "--where", "remote", "--host", HOST, "--json", ids[-1])
    assert deep.exit_code == 0, deep.stdout + deep.stderr
    assert "index matches" in json.loads(deep.stdout)["results"][0]["detail"]


def test_recovery_md_restores_an_encrypted_chain_with_stock_age_and_tar(
    env: Env, cli: CLI, remote: RemoteEnv, clock: Clock, keys: Keys
) -> None:
    """docs/RECOVERY.md's chain script on what the bucket holds (no plaintext index there),
    with `KEY` set: stock age, zstd and tar give back the last backup's tree."""
    www, rows = three_nights(env, cli, clock)
    downloaded = env.tmp / "downloaded"
    downloaded.mkdir()
    for key in remote.keys(f"cloudbackup/{HOST}/www/"):
        (downloaded / key.rsplit("/", 1)[-1]).write_bytes(remote.get(key))
    assert not list(downloaded.glob("*.index.zst"))
    target = env.tmp / "by-hand"
    target.mkdir()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _recovery_script()],
        env={
            **os.environ,
            "BACKUPS": str(downloaded),
            "TARGET": str(target),
            "LAST": rows[-1]["id"],
            "KEY": str(keys.path),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert files(target) == files(www)


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_without_its_plaintext_index_the_next_backup_is_full(
    env: Env,
    cli: CLI,
    clock: Clock,
    keys: Keys,
    damage: str,
) -> None:
    """The encrypted index cannot be a parent (this host has no identity): the plaintext one
    kept beside it is, read whole first; without it (or damaged) the backup is full, with one
    log line saying why."""
    www = tree(env)
    first = backup(cli, www)
    plain = env.source_dir("www") / f"{first['id']}.index.zst"
    if damage == "missing":
        plain.unlink()
    elif damage == "truncated":
        plain.write_bytes(plain.read_bytes()[:-5])
    else:
        data = bytearray(plain.read_bytes())
        data[len(data) // 2] ^= 0x01
        plain.write_bytes(bytes(data))
    clock.advance(days=1)
    result = cli("backup", "--json", www)
    assert result.exit_code == 0, result.stderr
    (second,) = json.loads(result.stdout)["results"]
    assert second["level"] == "full"
    said = [line for line in result.stderr.splitlines() if "full backup" in line]
    assert len(said) == 1, said
    assert first["id"] in said[0]
    assert ("lacks the plaintext index" if damage == "missing" else "is damaged") in said[0]
    clock.advance(days=1)
    third = backup(cli, www)  # the full's own plaintext index is a parent again
    assert third["level"] == "incr"


def test_a_tampered_index_in_the_bucket_is_caught_by_age(
    env: Env,
    cli: CLI,
    remote: RemoteEnv,
    clock: Clock,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flipped byte in the uploaded index, with the manifest's digest rewritten to match:
    age's authentication stops the restore (exit 3), nothing written."""
    _www, rows = three_nights(env, cli, clock)
    head = rows[-1]["id"]
    index_key = remote.key(HOST, "www", f"{head}.index.zst.age")
    manifest_key = remote.key(HOST, "www", f"{head}.manifest.json")
    data = bytearray(remote.get(index_key))
    data[-20] ^= 0x01
    manifest = json.loads(remote.get(manifest_key))
    manifest["index"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    manifest.pop("upload", None)
    remote.delete(index_key)
    remote.put(index_key, bytes(data))
    remote.delete(manifest_key)
    remote.put(manifest_key, json.dumps(manifest).encode())
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(env.tmp / "fresh"))
    monkeypatch.setenv("CLOUDBACKUP_HOST", "drbox")
    monkeypatch.setenv("CLOUDBACKUP_AGE_IDENTITY_FILE", str(keys.path))
    target = env.tmp / "restored"
    result = cli("restore", "www", "--host", HOST, "--to", target)
    assert result.exit_code == 3, result.stderr
    assert "age's authentication" in result.stderr
    assert not target.exists()
