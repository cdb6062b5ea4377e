"""Encryption with age end to end (SPEC "Encryption"), over both destinations: a host with
only recipients writes backups it cannot read; the restorer's identity reads them; tampered
ciphertext, a damaged header, a wrong or missing key each get their exit code with nothing
written; stock `age -d` + `tar` restore an archive; manifests stay plaintext and path-free;
the identity never reaches a log, an output, a manifest or a notification."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudbackup.stream.age import generate_identity
from tests.conftest import HOST, CliResult, Clock, Env, RemoteEnv, make_tree
from tests.integration.test_notify_delivery import Request
from tests.integration.test_notify_delivery import webhook as webhook  # noqa: F401 (fixture)
from tests.integration.test_restore import build_source, hidden_leftovers, snapshot

pytestmark = pytest.mark.slow

CLI = Callable[..., CliResult]
AGE = shutil.which("age") or "/usr/bin/age"


class Keys:
    """An identity file (the restorer's) and its recipient (the writer's configuration)."""

    def __init__(self, directory: Path, name: str = "key.txt") -> None:
        self.secret, self.recipient = generate_identity()
        self.path = directory / name
        self.path.write_text(f"# created for a test\n{self.secret}\n")
        self.path.chmod(0o600)


@pytest.fixture
def keys(env: Env, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """A fresh identity kept outside the tree and the local dir; the writer (this host)
    is configured with its recipient only."""
    vault = env.tmp / "vault"
    vault.mkdir()
    found = Keys(vault)
    monkeypatch.setenv("CLOUDBACKUP_AGE_RECIPIENTS", found.recipient)
    return found


def restorer(monkeypatch: pytest.MonkeyPatch, keys: Keys | Path) -> None:
    path = keys.path if isinstance(keys, Keys) else keys
    monkeypatch.setenv("CLOUDBACKUP_AGE_IDENTITY_FILE", str(path))


def archive_key(remote: RemoteEnv) -> str:
    (key,) = [k for k in remote.keys() if k.endswith(".tar.zst.age")]
    return key


def rewrite_manifest(data: bytes, archive: bytes) -> bytes:
    """The manifest with sha256 (and size) rewritten to match ``archive``: only age's own
    authentication can then tell the archive changed."""
    import hashlib

    doc = json.loads(data)
    doc["sha256"] = hashlib.sha256(archive).hexdigest()
    doc["size"] = len(archive)
    doc.pop("upload", None)
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- the writer host


def test_a_host_with_only_recipients_backs_up_but_cannot_restore(
    env: Env,
    remote: RemoteEnv,
    cli: CLI,
    keys: Keys,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = build_source(env.tmp / "www")
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(src))
    monkeypatch.setenv("CLOUDBACKUP_REMOTE_RETENTION", "last=5")
    monkeypatch.setenv("CLOUDBACKUP_FULL_EVERY", "2")  # full, incr, full: last=1 prunes two
    for _ in range(3):
        night = cli("run", "--json")
        assert night.exit_code == 0, night.stderr
        clock.advance(days=1)
    rows = json.loads(night.stdout)["results"]
    assert rows[0]["ok"] and rows[0]["uploaded"]
    archives = [k for k in remote.keys() if ".tar" in k]
    assert len(archives) == 3 and all(k.endswith(".tar.zst.age") for k in archives)
    assert all(p.name.endswith(".tar.zst.age") for p in env.archives("www"))

    listed = cli("list", "--where", "all", "--json")
    assert listed.exit_code == 0, listed.stderr
    backups = json.loads(listed.stdout)["backups"]
    assert len(backups) == 3 and all(b["encrypted"] for b in backups)
    status = cli("status", "--max-age", "3d")
    assert status.exit_code == 0, status.stdout + status.stderr
    verified = cli("verify", "--where", "all", "--json")
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    results = json.loads(verified.stdout)["results"]
    assert {r["where"] for r in results} == {"local", "remote"} and all(r["ok"] for r in results)
    pruned = cli("prune", "--where", "all", "--policy", "last=1", "--json")
    assert pruned.exit_code == 0, pruned.stderr
    assert len([k for k in remote.keys() if ".tar" in k]) == 1

    target = env.work / "restored"
    dry = cli("restore", "www", "--to", target, "--dry-run")  # the manifest is enough
    assert dry.exit_code == 0, dry.stderr
    assert "would restore" in dry.stdout and "needs CLOUDBACKUP_AGE_IDENTITY_FILE" in dry.stdout
    refused = cli("restore", "www", "--to", target)
    assert refused.exit_code == 2
    refused.assert_one_error("is encrypted", "needs CLOUDBACKUP_AGE_IDENTITY_FILE")
    assert not target.exists() and hidden_leftovers(env.work) == []
    deep = cli("verify", "--deep")
    assert deep.exit_code == 2
    deep.assert_one_error("verify --deep needs CLOUDBACKUP_AGE_IDENTITY_FILE")
    before = remote.keys()
    deep_run = cli("run", "--deep")
    assert deep_run.exit_code == 2 and "needs CLOUDBACKUP_AGE_IDENTITY_FILE" in deep_run.stderr
    assert remote.keys() == before  # refused before anything was done

    # The restorer, on a fresh machine, holds the identity.
    os.chmod(src / "ro", 0o755)
    expected = snapshot(src)
    os.chmod(src / "ro", 0o555)
    shutil.rmtree(env.local_dir)
    restorer(monkeypatch, keys)
    restored = cli("restore", "www", "--to", target, "--json")
    assert restored.exit_code == 0, restored.stderr
    assert json.loads(restored.stdout)["where_from"] == "remote"
    os.chmod(target / "ro", 0o755)
    assert snapshot(target) == expected
    assert hidden_leftovers(env.work) == []
    deep = cli("verify", "--deep", "--where", "remote", "--json")
    assert deep.exit_code == 0, deep.stdout + deep.stderr
    assert "walked" in json.loads(deep.stdout)["results"][0]["detail"]


def test_manifests_are_plaintext_with_recipients_and_no_path_below_the_root(
    env: Env, remote: RemoteEnv, cli: CLI, keys: Keys
) -> None:
    src = make_tree(env.tmp / "www", {"private-payroll.xlsx": "x" * 1000, "hr/alice.txt": "a"})
    os.mkfifo(src / "hr" / "secret-pipe-name")  # skipped with a warning naming it
    result = cli("backup", src, "--json")
    assert result.exit_code == 0, result.stderr
    assert "secret-pipe-name" in result.stderr  # this run's log names it...
    manifests = [k for k in remote.keys() if k.endswith(".manifest.json")]
    texts = [remote.get(k).decode() for k in manifests] + [
        p.read_text() for p in env.manifests("www")
    ]
    assert len(texts) == 2
    for text in texts:
        doc = json.loads(text)  # ...the manifests do not
        assert doc["encryption"] == "age" and doc["recipients"] == [keys.recipient]
        assert doc["archive"].endswith(".tar.zst.age")
        assert doc["warnings"] == [
            "skipped: 1 file (names not recorded: the backup is encrypted; see the log of "
            "the run)"
        ]
        for name in ("secret-pipe-name", "private-payroll", "alice", "hr/"):
            assert name not in text
        assert keys.secret not in text


def test_without_encryption_warnings_keep_their_names(env: Env, cli: CLI) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    os.mkfifo(src / "pipe-name")
    assert cli("backup", src).exit_code == 0
    (manifest,) = env.manifests("www")
    assert "pipe-name" in manifest.read_text() and "recipients" not in manifest.read_text()


# ---------------------------------------------------------------- stock tools


def test_stock_age_and_tar_restore_an_archive(env: Env, cli: CLI, keys: Keys) -> None:
    """docs/RECOVERY.md: `age -d -i key.txt X.tar.zst.age | tar --zstd -xf -`."""
    src = build_source(env.tmp / "www")
    assert cli("backup", src).exit_code == 0
    (archive,) = env.archives("www")
    out = env.tmp / "by-hand"
    out.mkdir()
    subprocess.run(
        f"{AGE} -d -i {keys.path} {archive} | tar --zstd -xpf - --numeric-owner -C {out}",
        shell=True,
        check=True,
        capture_output=True,
    )
    os.chmod(src / "ro", 0o755)
    os.chmod(out / "ro", 0o755)
    assert snapshot(out) == snapshot(src)


# ---------------------------------------------------------------- hostile archives


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_flipped_byte_with_a_matching_sha256_is_caught_by_age(
    env: Env,
    remote: RemoteEnv,
    cli: CLI,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    src = make_tree(env.tmp / "www", {"a.bin": os.urandom(300_000), "b.txt": "b"})
    assert cli("backup", src).exit_code == 0
    restorer(monkeypatch, keys)
    if where == "local":
        (archive,) = env.archives("www")
        (manifest,) = env.manifests("www")
        body = bytearray(archive.read_bytes())
        body[len(body) // 2] ^= 0x01
        archive.write_bytes(bytes(body))
        manifest.write_bytes(rewrite_manifest(manifest.read_bytes(), bytes(body)))
    else:
        key = archive_key(remote)
        mkey = key.replace(".tar.zst.age", ".manifest.json")
        body = bytearray(remote.get(key))
        body[len(body) // 2] ^= 0x01
        rewritten = rewrite_manifest(remote.get(mkey), bytes(body))
        for k, data in ((key, bytes(body)), (mkey, rewritten)):
            remote.delete(k)
            remote.put(k, data)

    target = env.work / "t"
    result = cli("restore", "www", "--to", target, "--from", where)
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("fails age's authentication")
    assert not target.exists()
    assert hidden_leftovers(env.work) == []  # no staging directory, no temp download
    make_tree(target, {"old.txt": "old"})
    forced = cli("restore", "www", "--to", target, "--from", where, "--force")
    assert forced.exit_code == 3
    assert sorted(p.name for p in env.work.iterdir()) == ["t"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    deep = cli("verify", "--deep", "--where", where)
    assert deep.exit_code == 3
    if where == "local" or remote.kind == "dir":  # (S3: the rewritten object lacks its metadata)
        assert "fails age's authentication" in deep.stdout + deep.stderr


def test_a_valid_age_file_that_is_not_zstd_is_exit_3_with_nothing_written(
    env: Env, remote: RemoteEnv, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone holding the (public) recipient can write an archive age authenticates: one
    whose plaintext is not zstd is an integrity failure (exit 3) of the child that decrypts
    and decompresses, with nothing written."""
    import pyrage
    from pyrage import x25519

    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    assert cli("backup", src).exit_code == 0
    restorer(monkeypatch, keys)
    forged = pyrage.encrypt(os.urandom(200_000), [x25519.Recipient.from_str(keys.recipient)])
    key = archive_key(remote)
    mkey = key.replace(".tar.zst.age", ".manifest.json")
    rewritten = rewrite_manifest(remote.get(mkey), forged)
    for k, data in ((key, forged), (mkey, rewritten)):
        remote.delete(k)
        remote.put(k, data)

    target = env.work / "t"
    result = cli("restore", "www", "--to", target, "--from", "remote")
    assert result.exit_code == 3, result.stderr
    result.assert_one_error("is not the zstd stream it should be")
    assert not target.exists()
    assert hidden_leftovers(env.work) == []


def test_a_damaged_recipient_stanza_is_exit_3_a_wrong_key_exit_2(
    env: Env, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a" * 5000})
    assert cli("backup", src).exit_code == 0
    (archive,) = env.archives("www")
    (manifest,) = env.manifests("www")

    other = Keys(env.tmp, "other.txt")
    restorer(monkeypatch, other)
    wrong = cli("restore", "www", "--to", env.work / "t")
    assert wrong.exit_code == 2
    wrong.assert_one_error("no identity in", "matches the archive's recipients", keys.recipient)
    assert not (env.work / "t").exists()

    lines = archive.read_bytes().split(b"\n")
    stanza = bytearray(lines[2])  # the file key wrapped for the recipient
    stanza[3] = ord("A") if stanza[3] != ord("A") else ord("B")
    damaged = b"\n".join([*lines[:2], bytes(stanza), *lines[3:]])
    archive.write_bytes(damaged)
    manifest.write_bytes(rewrite_manifest(manifest.read_bytes(), damaged))
    restorer(monkeypatch, keys)
    result = cli("restore", "www", "--to", env.work / "t")
    assert result.exit_code == 3
    result.assert_one_error("header is damaged")
    assert not (env.work / "t").exists() and hidden_leftovers(env.work) == []


def test_a_missing_or_unreadable_identity_file_is_exit_2(
    env: Env, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("backup", make_tree(env.tmp / "www", {"a.txt": "a"})).exit_code == 0
    restorer(monkeypatch, env.tmp / "nowhere.txt")
    missing = cli("restore", "www", "--to", env.work / "t")
    assert missing.exit_code == 2
    missing.assert_one_error("CLOUDBACKUP_AGE_IDENTITY_FILE", "does not exist")
    garbage = env.tmp / "garbage.txt"
    garbage.write_text("this is not a key\n")
    restorer(monkeypatch, garbage)
    bad = cli("restore", "www", "--to", env.work / "t")
    assert bad.exit_code == 2
    bad.assert_one_error("line 1 is not an age identity")
    assert "this is not a key" not in bad.stderr
    assert not (env.work / "t").exists()


# ---------------------------------------------------------------- other kinds of source


def test_command_source_encrypted_and_restored_to_stdout(
    env: Env, remote: RemoteEnv, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = "".join(f"INSERT INTO t VALUES ({i});\n" for i in range(3000))
    (env.tmp / "dump.sql").write_text(payload)
    assert cli("backup", f"shop=cmd:cat {env.tmp / 'dump.sql'}").exit_code == 0
    assert archive_key(remote).startswith(f"cloudbackup/{HOST}/shop/shop-")
    refused = cli("restore", "shop", "--to", "-")
    assert refused.exit_code == 2 and refused.stdout == ""
    restorer(monkeypatch, keys)
    piped = cli("restore", "shop", "--to", "-", "--from", "remote")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == payload


def test_sqlite_source_encrypted(
    env: Env, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    db = env.tmp / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [(f"row {i}",) for i in range(500)])
    conn.close()
    assert cli("backup", f"sqlite://{db}").exit_code == 0
    (archive,) = env.archives("app")
    assert archive.name.endswith(".tar.zst.age")
    restorer(monkeypatch, keys)
    out = env.work / "copy.db"
    result = cli("restore", "app", "--to", out)
    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(out) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (500,)
    conn.close()


def test_postgres_source_encrypted_and_restored(
    env: Env, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch, pg_server: Any
) -> None:
    suffix = os.urandom(4).hex()
    source_db, target_db = f"esrc_{suffix}", f"edst_{suffix}"
    pg_server.psql(f"CREATE DATABASE {source_db}")
    pg_server.psql(
        "CREATE TABLE items (id serial PRIMARY KEY, name text);"
        "INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 500) g;",
        db=source_db,
    )
    assert cli("backup", f"shopdb={pg_server.url(source_db)}").exit_code == 0
    (archive,) = env.archives("shopdb")
    assert archive.name.endswith(".tar.zst.age")
    refused = cli("restore", "shopdb", "--to", pg_server.url(target_db))
    assert refused.exit_code == 2
    refused.assert_one_error("needs CLOUDBACKUP_AGE_IDENTITY_FILE")
    restorer(monkeypatch, keys)
    result = cli("restore", "shopdb", "--to", pg_server.url(target_db))
    assert result.exit_code == 0, result.stderr
    assert pg_server.psql("SELECT count(*) FROM items", db=target_db) == "500"


# ---------------------------------------------------------------- secrets and check


def test_the_identity_never_reaches_logs_output_manifests_or_notifications(
    env: Env,
    remote: RemoteEnv,
    cli: CLI,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    webhook: tuple[int, list[Request]],  # noqa: F811
) -> None:
    port, requests = webhook
    src = make_tree(env.tmp / "www", {"a.txt": "a" * 10_000})
    log = env.tmp / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(src))
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log))
    monkeypatch.setenv("CLOUDBACKUP_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY", f"json://127.0.0.1:{port}/hook")
    monkeypatch.setenv("CLOUDBACKUP_NOTIFY_ON", "always")
    restorer(monkeypatch, keys)  # a misconfigured writer: it holds the identity too
    night = cli("-v", "run", "--deep", "--json")
    assert night.exit_code == 0, night.stderr
    restored = cli("-v", "restore", "www", "--to", env.work / "t", "--from", "remote")
    assert restored.exit_code == 0, restored.stderr
    deep = cli("-v", "verify", "--deep", "--where", "all")
    assert deep.exit_code == 0, deep.stderr
    checked = cli("check")
    assert "this host can read its backups" in checked.stdout
    assert len(requests) == 1  # the night's notification: its summary and last log lines
    seen = [night.stdout, night.stderr, restored.stdout, restored.stderr, deep.stdout,
            deep.stderr, checked.stdout, checked.stderr, log.read_text(),
            requests[0].body.decode()]  # fmt: skip
    seen += [remote.get(k).decode() for k in remote.keys() if k.endswith(".json")]
    seen += [p.read_text() for p in env.files("www", "*.json")]
    body = keys.secret.removeprefix("AGE-SECRET-KEY-1")
    for text in seen:
        assert body not in text and body.lower() not in text


def test_check_reports_recipients_and_warns_about_the_identity_file(
    env: Env, cli: CLI, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(env.tmp / "www", {"a.txt": "a"})
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(src))
    clean = cli("check", "--json")
    assert clean.exit_code == 0, clean.stdout
    checks = json.loads(clean.stdout)["checks"]
    (line,) = [c for c in checks if c["check"] == "encryption"]
    assert keys.recipient in line["detail"] and not line["warning"]
    assert not [c for c in checks if c["check"] == "identity"]

    keys.path.chmod(0o644)
    restorer(monkeypatch, keys)
    warned = cli("check", "--json")
    details = [c["detail"] for c in json.loads(warned.stdout)["checks"] if c["warning"]]
    assert any("readable by other users" in d and "chmod 600" in d for d in details)
    assert any("this host can read its backups" in d for d in details)

    # A restoring machine (no sources, no recipients) with a private identity: no warning.
    monkeypatch.delenv("CLOUDBACKUP_SOURCES")
    monkeypatch.delenv("CLOUDBACKUP_AGE_RECIPIENTS")
    keys.path.chmod(0o600)
    restoring = cli("check", "--json")
    identity = [c for c in json.loads(restoring.stdout)["checks"] if c["check"] == "identity"]
    assert len(identity) == 1 and identity[0]["ok"] and not identity[0]["warning"]
    assert keys.recipient in identity[0]["detail"]

