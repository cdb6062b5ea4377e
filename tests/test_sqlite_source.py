"""SQLite sources: an online copy (backup API, read-only) while another thread writes; a
missing file fails the source and is never created; ``restore_sqlite`` keeps the old file
aside, refuses a database in use, and publishes only a copy that passes integrity_check."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cloudbackup.core.errors import IntegrityError, Refused, SourceError
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.sources.base import SourceContext
from cloudbackup.sources.registry import parse_spec
from cloudbackup.sources.sqlite import SQLiteSource, restore_sqlite
from tests.conftest import CliResult, Env
from tests.manifests import load_manifest

STAMP = "20261121T021500Z"


def read_archive(path: Path) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def make_db(path: Path, rows: int = 100, *, wal: bool = True) -> Path:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.executemany(
        "INSERT INTO t (payload) VALUES (?)", [(f"row {i} " + "x" * 200,) for i in range(rows)]
    )
    conn.commit()
    conn.close()
    return path


def ids(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT id FROM t ORDER BY id")]
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# ---------------------------------------------------------------- backup


def test_backup_while_another_thread_writes(
    env: Env, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    db = make_db(env.tmp / "app.db", rows=20_000)
    stop = threading.Event()
    committed = [0]

    def writer() -> None:
        conn = sqlite3.connect(db, timeout=30)
        while not stop.is_set():
            cur = conn.execute("INSERT INTO t (payload) VALUES (?)", ("late " + "y" * 500,))
            conn.commit()
            committed[0] = int(cur.lastrowid or 0)
        conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while committed[0] < 20_050 and time.monotonic() < deadline:
            time.sleep(0.005)
        before = committed[0]  # every row up to here was committed before the backup
        result = cli("backup", "--no-upload", f"sqlite://{db}")
        during = committed[0]
    finally:
        stop.set()
        thread.join(10)
    assert result.exit_code == 0, result.stderr
    assert during > before, "the writer kept committing while the backup ran"
    (archive,) = env.archives("app")
    members = read_archive(archive)
    assert list(members) == ["app.sqlite3"]
    manifest = load_manifest(env.manifests("app")[0])
    assert manifest.kind == "sqlite" and manifest.members["database_file"] == "app.sqlite3"
    assert not list(env.source_dir("app").glob("*.partial"))

    extracted = tmp_path / "extracted.sqlite3"
    extracted.write_bytes(members["app.sqlite3"])
    target = tmp_path / "restored" / "app.db"
    assert restore_sqlite(extracted, target, now_stamp=STAMP) is None
    assert integrity(target) == "ok"
    restored = ids(target)
    assert restored[:before] == list(range(1, before + 1)), "a committed row is missing"
    assert restored == list(range(1, len(restored) + 1)), "a torn copy"
    conn = sqlite3.connect(target)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # self-contained
    conn.close()


def test_missing_file_fails_and_is_never_created(env: Env, cli: Callable[..., CliResult]) -> None:
    missing = env.tmp / "nope" / "app.db"
    missing.parent.mkdir()
    www = env.tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("hi")
    result = cli("backup", "--no-upload", f"sqlite://{missing}", www)
    assert result.exit_code == 1
    result.assert_one_error("source app", str(missing), "does not exist")
    assert not missing.exists() and list(missing.parent.iterdir()) == []
    assert env.archives("app") == [] and len(env.archives("www")) == 1


def test_names_with_uri_special_characters(tmp_path: Path) -> None:
    """``?``, ``#`` and ``%`` in the path must not be read as URI syntax."""
    db = make_db(tmp_path / "we?ird #name %41.db", rows=5)
    source = SQLiteSource(parse_spec(f"data=sqlite://{db}"))
    assert source.check() == f"sqlite {db}"
    spool = tmp_path / "spool"
    spool.mkdir()
    ctx = SourceContext(spool, "data-x", PathMatcher([]), frozenset(), lambda c, m: None)
    (entry,) = list(source.entries(ctx))
    assert entry.arcname == "data.sqlite3"
    assert not (tmp_path / "we").exists()


def test_spool_copy_is_private_and_removed(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", rows=5)
    spool = tmp_path / "spool"
    spool.mkdir()
    ctx = SourceContext(spool, "app-x", PathMatcher([]), frozenset(), lambda c, m: None)
    for entry in SQLiteSource(parse_spec(f"sqlite://{db}")).entries(ctx):
        assert oct(os.stat(entry.path).st_mode & 0o777) == oct(0o600)
    assert list(spool.iterdir()) == []


def test_unreadable_file_fails(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"not a database at all" * 100)
    with pytest.raises(SourceError, match="not a readable SQLite database"):
        SQLiteSource(parse_spec(f"sqlite://{bogus}")).check()


# ---------------------------------------------------------------- restore


def test_restore_keeps_the_old_file_and_its_wal_aside(tmp_path: Path) -> None:
    archived = make_db(tmp_path / "archived.sqlite3", rows=10, wal=False)
    live = make_db(tmp_path / "live.db", rows=3)
    conn = sqlite3.connect(live)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("INSERT INTO t (payload) VALUES ('only in the wal')")
    conn.commit()
    old_ids = [row[0] for row in conn.execute("SELECT id FROM t ORDER BY id")]
    # The files a crashed app leaves: a database whose last commit lives only in its -wal.
    target = tmp_path / "app.db"
    shutil.copyfile(live, target)
    shutil.copyfile(tmp_path / "live.db-wal", tmp_path / "app.db-wal")
    conn.close()
    assert (tmp_path / "app.db-wal").stat().st_size > 0
    target.chmod(0o640)

    kept = restore_sqlite(archived, target, now_stamp=STAMP)

    assert kept == tmp_path / f"app.db.before-restore-{STAMP}"
    assert ids(target) == list(range(1, 11)) and integrity(target) == "ok"
    assert oct(target.stat().st_mode & 0o777) == oct(0o640), "the old file's mode is kept"
    assert not (tmp_path / "app.db-wal").exists() and not (tmp_path / "app.db-shm").exists()
    assert ids(kept) == old_ids and len(old_ids) == 4, "the old database, WAL included, aside"
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


def test_restore_to_a_new_path(tmp_path: Path) -> None:
    archived = make_db(tmp_path / "archived.sqlite3", rows=4, wal=False)
    target = tmp_path / "new" / "dir" / "app.db"
    assert restore_sqlite(archived, target, now_stamp=STAMP) is None
    assert ids(target) == [1, 2, 3, 4]
    assert sorted(p.name for p in target.parent.iterdir()) == ["app.db"]


def test_restore_refuses_a_corrupt_copy_and_touches_nothing(tmp_path: Path) -> None:
    archived = make_db(tmp_path / "archived.sqlite3", rows=2000, wal=False)
    data = bytearray(archived.read_bytes())
    data[4096 * 3 : 4096 * 3 + 512] = b"\xff" * 512  # trash part of a b-tree page
    archived.write_bytes(bytes(data))
    target = make_db(tmp_path / "app.db", rows=3, wal=False)
    before = target.read_bytes()
    with pytest.raises(IntegrityError, match="integrity_check"):
        restore_sqlite(archived, target, now_stamp=STAMP)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "archived.sqlite3"]


HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "write":
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t (payload) VALUES ('pending')")
else:
    conn.execute("SELECT count(*) FROM t").fetchone()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("wal", "how"),
    [(True, "idle"), (True, "write"), (False, "write")],
    ids=["wal-idle-connection", "wal-writer", "rollback-journal-writer"],
)
def test_restore_refuses_a_database_in_use(tmp_path: Path, wal: bool, how: str) -> None:
    archived = make_db(tmp_path / "archived.sqlite3", rows=4, wal=False)
    target = make_db(tmp_path / "app.db", rows=3, wal=wal)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(Refused) as exc:
            restore_sqlite(archived, target, now_stamp=STAMP)
        assert "in use" in str(exc.value) and "stop the app" in str(exc.value)
        assert exc.value.exit_code == 2  # refused, nothing done
        assert not (tmp_path / f"app.db.before-restore-{STAMP}").exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert ids(target) == [1, 2, 3]
    # Once the app is stopped, the restore goes through.
    assert restore_sqlite(archived, target, now_stamp=STAMP) is not None
    assert ids(target) == [1, 2, 3, 4]


def test_restore_refuses_to_overwrite_an_earlier_copy_aside(tmp_path: Path) -> None:
    archived = make_db(tmp_path / "archived.sqlite3", rows=4, wal=False)
    target = make_db(tmp_path / "app.db", rows=3, wal=False)
    (tmp_path / f"app.db.before-restore-{STAMP}").write_text("precious")
    with pytest.raises(Refused, match="already exists"):
        restore_sqlite(archived, target, now_stamp=STAMP)
    assert ids(target) == [1, 2, 3]


def test_a_dead_restore_temp_file_is_removed_by_the_next_restore(tmp_path: Path) -> None:
    import sqlite3 as _sqlite3
    import subprocess

    from cloudbackup.sources.sqlite import restore_sqlite

    archived = tmp_path / "archived.sqlite3"
    conn = _sqlite3.connect(archived)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    target = tmp_path / "app.db"
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".app.db.restore-{dead.pid}-20261121T000000Z.partial"
    leftover.write_bytes(b"half a database")
    restore_sqlite(archived, target, now_stamp="20261122T000000Z")
    assert not leftover.exists()
    assert _sqlite3.connect(target).execute("SELECT x FROM t").fetchall() == [(1,)]
