"""Database and command sources: each spools a consistent copy, then yields that file.

The spool lives in the source's local directory with a ``.partial`` name (never ``/tmp``,
often a small tmpfs); a crash leaves it to the stale-partial cleanup.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from cloudbackup.errors import SourceError
from cloudbackup.sources import FileEntry, Source, SourceContext

# One step: the copy holds a read snapshot, so a busy writer cannot restart it forever.
_PAGES_PER_STEP = -1


def _free_bytes(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.free


class SQLiteSource(Source):
    """A consistent online copy through SQLite's backup API, opened read-only."""

    kind = "sqlite"

    @property
    def path(self) -> str:
        return self.spec.spec[len("sqlite://") :]

    @property
    def member_name(self) -> str:
        return f"{self.name}.sqlite3"

    def root_device(self) -> int | None:
        return None

    def _connect(self) -> sqlite3.Connection:
        if not os.path.isfile(self.path):
            raise SourceError(
                f"source {self.name}: SQLite database {self.path} does not exist",
                "check the path (it is never created)",
            )
        try:
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
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

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        conn = self._connect()
        spool = ctx.spool_dir / f"{ctx.backup_id}.sqlite3.partial"
        try:
            size = os.path.getsize(self.path)
            if _free_bytes(ctx.spool_dir) < size * 1.1:
                raise SourceError(
                    f"source {self.name}: not enough free space in {ctx.spool_dir} for a {size} byte copy",
                    "free some space or move CLOUDBACKUP_LOCAL_DIR",
                )
            dest = sqlite3.connect(spool)
            try:
                conn.backup(dest, pages=_PAGES_PER_STEP)
                result = dest.execute("PRAGMA integrity_check").fetchone()
                if not result or result[0] != "ok":
                    raise SourceError(
                        f"source {self.name}: the copy fails integrity_check: {result}"
                    )
                dest.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.Error as exc:
                raise SourceError(f"source {self.name}: online backup failed: {exc}") from None
            finally:
                dest.close()
            conn.close()
            yield FileEntry(str(spool), self.member_name, os.lstat(spool))
        finally:
            conn.close()
            spool.unlink(missing_ok=True)


class CommandSource(Source):
    """A command's standard output, run without a shell, spooled then archived."""

    kind = "command"

    @property
    def argv(self) -> list[str]:
        import shlex

        return shlex.split(self.spec.spec[4:])

    @property
    def member_name(self) -> str:
        return f"{self.name}.out"

    def check(self) -> str:
        program = self.argv[0]
        if shutil.which(program) is None:
            raise SourceError(
                f"source {self.name}: command {program!r} not found", "install it or fix PATH"
            )
        return f"command {program}"

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        spool = ctx.spool_dir / f"{ctx.backup_id}.out.partial"
        try:
            run_to_file(
                self.argv, spool, ctx, label=f"source {self.name}: command {self.argv[0]!r}"
            )
            yield FileEntry(str(spool), self.member_name, os.lstat(spool))
        finally:
            spool.unlink(missing_ok=True)


def run_to_file(
    argv: list[str],
    dest: Path,
    ctx: SourceContext,
    *,
    label: str,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``argv`` without a shell, its stdout into ``dest``, stderr to the log; fail on
    a non-zero exit or a signal. Never leaves a "successful" half-output behind."""
    try:
        with open(dest, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
            )
    except FileNotFoundError:
        raise SourceError(f"{label} not found", "install it or give its full path") from None
    except PermissionError:
        raise SourceError(f"{label} is not executable", "check its permissions") from None
    tail: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                ctx.log(f"{label}: {line}")
                tail.append(line)
                del tail[:-5]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join(timeout=5)
    if code != 0:
        dest.unlink(missing_ok=True)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        detail = f": {tail[-1]}" if tail else ""
        raise SourceError(f"{label} {how}{detail}", "see the log for its error output")


class PostgresSource(Source):
    """``pg_dump -Fc`` plus ``pg_dumpall --globals-only``; filled in by the database issue."""

    kind = "postgresql"

    def check(self) -> str:
        from cloudbackup import postgres

        return postgres.check_source(self)

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        from cloudbackup import postgres

        yield from postgres.dump_entries(self, ctx)
