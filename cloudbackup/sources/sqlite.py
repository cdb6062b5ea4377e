"""SQLite sources: a consistent online copy through SQLite's backup API, spooled, then
archived; and the SQLite side of restore (:func:`restore_sqlite`).

Database and command sources spool into the source's local directory with a ``.partial``
name (never ``/tmp``, often a small tmpfs); a crash leaves it to the stale-partial cleanup.
Spool files are created mode 0600: they hold the same data as the archive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from cloudbackup.core.errors import IntegrityError, Refused, SourceError
from cloudbackup.core.model import Exactly, MemberSchema
from cloudbackup.fs.files import create_private
from cloudbackup.fs.tree import open_directory
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import Entries, RestoreAs, Source, SourceContext

# One step: the copy holds a read snapshot, so a busy writer cannot restart it forever.
_PAGES_PER_STEP = -1
# SQLite's unix VFS: every connection to a WAL database holds a shared lock on this byte
# of the ``-shm`` file (the "DMS" slot: 120 + 8 lock slots) for as long as it is open.
_SHM_DMS_OFFSET = 128
_BUSY_TIMEOUT = 0.5
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _free_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.free


def _sqlite_uri(path: str | Path, **params: str) -> str:
    """A ``file:`` URI for ``path``: ``?``, ``#`` and ``%`` in names must be escaped."""
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"file:{quote(os.fspath(path))}" + (f"?{query}" if query else "")


class SQLiteSource(Source):
    """A consistent online copy through SQLite's backup API, opened read-only."""

    kind = "sqlite"
    scheme_prefixes = ("sqlite:",)
    #: Tells restore which member is the database file.
    member_schema: ClassVar[MemberSchema] = {"database_file": Exactly("{source}.sqlite3")}
    restore_as = RestoreAs.SQLITE

    @classmethod
    def claims(cls, raw: str) -> bool:
        return raw.startswith("sqlite:")

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        path = raw[len("sqlite://") :] if raw.startswith("sqlite://") else ""
        if not path.startswith("/"):
            raise ValueError("use sqlite:///absolute/path/to/file.db")
        return Path(path).stem

    @classmethod
    def restore_member(cls, source: str, members: Mapping[str, Any]) -> str | None:
        return f"{source}.sqlite3"

    @property
    def path(self) -> str:
        return self.spec.spec[len("sqlite://") :]

    @property
    def member_name(self) -> str:
        return f"{self.name}.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        # mode=ro never creates the file; the explicit check gives the clearer message.
        if not os.path.isfile(self.path):
            raise SourceError(
                f"source {self.name}: SQLite database {self.path} does not exist",
                "check the path (it is never created)",
            )
        try:
            return sqlite3.connect(_sqlite_uri(self.path, mode="ro"), uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise SourceError(
                f"source {self.name}: cannot open {self.path}: {exc}", "check permissions"
            ) from None

    def check(self) -> str:
        conn = self._connect()
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise SourceError(
                f"source {self.name}: {self.path} is not a readable SQLite database: {exc}"
            ) from None
        finally:
            conn.close()
        return f"sqlite {self.path}"

    def entries(self, ctx: SourceContext) -> Entries:
        conn = self._connect()
        spool = ctx.spool_dir / f"{ctx.backup_id}.sqlite3.partial"
        try:
            # The copy can be as large as the file plus its write-ahead log; the archive
            # of it is written beside it.
            size = os.path.getsize(self.path)
            try:
                size += os.path.getsize(self.path + "-wal")
            except OSError:
                pass
            if _free_bytes(ctx.spool_dir) < size * 1.1:
                raise SourceError(
                    f"source {self.name}: not enough free space in {ctx.spool_dir} for a {size} byte copy",
                    "free some space or move CLOUDBACKUP_LOCAL_DIR",
                )
            create_private(spool)
            dest = sqlite3.connect(spool)
            try:
                conn.backup(dest, pages=_PAGES_PER_STEP)
                result = dest.execute("PRAGMA integrity_check").fetchone()
                if not result or result[0] != "ok":
                    raise SourceError(
                        f"source {self.name}: the copy fails integrity_check: {result}"
                    )
                # A self-contained file: restore never needs a -wal beside it.
                dest.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.Error as exc:
                raise SourceError(f"source {self.name}: online backup failed: {exc}") from None
            finally:
                dest.close()
            conn.close()
            yield FileEntry(str(spool), self.member_name, os.lstat(spool))
            return {"database_file": self.member_name}
        finally:
            conn.close()
            spool.unlink(missing_ok=True)


# ---------------------------------------------------------------- SQLite restore


def _sidecars(name: str) -> list[tuple[str, str]]:
    return [(suffix, name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_elsewhere(target: Path) -> bool:
    """True when another process has the database open (or mid-transaction).

    WAL mode: every open connection holds a shared lock on the DMS byte of ``-shm``, so
    even an idle app is seen. Rollback-journal mode: only a connection inside a
    transaction holds a lock (``BEGIN EXCLUSIVE`` then waits briefly and fails); an idle
    one is invisible to anybody, which is why the message also says to stop the app.
    """
    shm = target.with_name(target.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_OFFSET)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return True
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_OFFSET)
        finally:
            os.close(fd)  # drops this process's locks on the file; we held no others
    try:
        conn = sqlite3.connect(str(target), timeout=_BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        return "locked" in text or "busy" in text
    except sqlite3.Error:
        return False  # not a database: nothing can be using it as one
    finally:
        conn.close()
    return False


def _integrity(path: Path) -> str:
    try:
        conn = sqlite3.connect(_sqlite_uri(path, mode="ro"), uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        conn.close()
    return "; ".join(str(row[0]) for row in rows[:5]) if rows else "no result"


def _remove_dead_restore_temps(dir_fd: int, name: str) -> None:
    """A restore killed with SIGKILL leaves its temp copy; remove it once its process is gone."""
    import re

    pattern = re.compile(rf"^\.{re.escape(name)}\.restore-(\d+)-.*\.partial$")
    try:
        siblings = os.listdir(dir_fd)
    except OSError:
        return
    for sibling in siblings:
        match = pattern.match(sibling)
        if match is None:
            continue
        try:
            os.kill(int(match[1]), 0)
            continue  # still running
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sibling, dir_fd=dir_fd)
        except PermissionError:
            continue


def restore_sqlite(
    db_file_in_archive: Path, target: Path, *, now_stamp: str, dir_fd: int | None = None
) -> Path | None:
    """Put the archived database file at ``target``; return where the old file was kept.

    The archived copy is checked first (``PRAGMA integrity_check``), copied to a temp file
    beside the target, fsynced and checked again, and only then published by an atomic
    rename. An existing target (with its ``-wal``/``-shm``/``-journal``) is kept as
    ``target.before-restore-<stamp>`` (sidecars renamed alongside so SQLite still pairs
    them); a database another process has open is refused. The new file keeps the old
    one's mode and owner, or, in a new place, the archived file's mode (a private database
    stays private), never the umask's.

    Everything happens relative to ``dir_fd``, the target's directory held open (by
    default opened here without following a symlink on the way, made if missing), so a
    name someone swaps in that directory meanwhile is never followed.
    """
    target = Path(target)
    problem = _integrity(db_file_in_archive)
    if problem != "ok":
        raise IntegrityError(
            f"the archived database {db_file_in_archive.name} fails integrity_check: {problem}"
        )
    if dir_fd is not None:
        return _swap_in(db_file_in_archive, target, dir_fd, now_stamp)
    fd = open_directory(target.parent, create=True)
    try:
        return _swap_in(db_file_in_archive, target, fd, now_stamp)
    finally:
        os.close(fd)


def _swap_in(archived: Path, target: Path, dir_fd: int, now_stamp: str) -> Path | None:
    name = target.name
    here = Path(f"/proc/self/fd/{dir_fd}")  # the target's directory, held open
    old = _lstat_at(dir_fd, name)
    # Refused, nothing done (exit 2; SPEC "Operations"): the target is left as it is.
    existing = old is not None
    if old is not None and not (stat.S_ISREG(old.st_mode) or stat.S_ISLNK(old.st_mode)):
        raise Refused(f"{target} exists and is not a file", "give the path of a database file")
    if old is not None and stat.S_ISREG(old.st_mode) and _open_elsewhere(here / name):
        raise Refused(
            f"{target} is in use by another process",
            "stop the app that uses the database, then restore again",
        )
    aside = f"{name}.before-restore-{now_stamp}"
    if existing and _lstat_at(dir_fd, aside) is not None:
        raise Refused(
            f"{target.with_name(aside)} already exists", "move it away or try again in a second"
        )
    _remove_dead_restore_temps(dir_fd, name)
    temp = f".{name}.restore-{os.getpid()}-{now_stamp}.partial"
    mode = stat.S_IMODE(os.stat(archived).st_mode) & 0o777
    owner: tuple[int, int] | None = None
    if old is not None and stat.S_ISREG(old.st_mode):  # a symlink's own mode means nothing
        mode, owner = stat.S_IMODE(old.st_mode), (old.st_uid, old.st_gid)
    try:
        fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)
        with open(fd, "wb") as out, open(archived, "rb") as src:
            shutil.copyfileobj(src, out, 4 * 1024 * 1024)
            out.flush()
            if owner is not None and os.geteuid() == 0:
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        problem = _integrity(here / temp)
        if problem != "ok":
            raise IntegrityError(
                f"the restored copy {target.with_name(temp)} fails integrity_check: {problem}"
            )
        for _suffix, sidecar in _sidecars(temp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar, dir_fd=dir_fd)
        kept: Path | None = None
        if existing:
            # A hard link keeps ``target`` in place until the rename below replaces it.
            try:
                os.link(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            kept = target.with_name(aside)
        # Sidecars go with the old file; stale ones of a deleted database would be applied
        # to the new file.
        for suffix, sidecar in _sidecars(name):
            if _lstat_at(dir_fd, sidecar) is not None:
                os.rename(sidecar, aside + suffix, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
        return kept
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
