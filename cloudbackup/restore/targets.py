"""Where a restored backup goes: one small class per kind of target.

Each target is planned first (:func:`plan_target`: a target that cannot be used is a
UsageError, exit 2, before any byte of the archive is read), says where its hidden
workspace goes (beside the target, on its filesystem), which staged members it takes, and
installs them once every check has passed:

* :class:`DirectoryTarget` — a tree, renamed into place (the old one moved aside with
  ``--force``), or moved entry by entry into an empty mount point;
* :class:`FileTarget` — one file (a command's output), the old one moved aside;
* :class:`SQLiteTarget` — a database file, checked and swapped by the SQLite source module;
* :class:`StdoutTarget` — one file to standard output (``--to -``), only after it verified;
* :class:`PostgresTarget` — a dump restored with ``pg_restore`` by the PostgreSQL tools.

The source class of the backup's kind declares which one applies (``Source.restore_as``)
and which member a single-file target takes (``Source.restore_member``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import IO, Any, Protocol

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, IntegrityError, UsageError
from cloudbackup.core.model import Manifest
from cloudbackup.fs.files import fsync_dir
from cloudbackup.fs.tree import remove_tree
from cloudbackup.sources import pgtools
from cloudbackup.sources.base import RestoreAs, redact_url
from cloudbackup.sources.registry import kind_of
from cloudbackup.sources.sqlite import restore_sqlite

LOG = logging.getLogger("cloudbackup")

_STAMP = "%Y%m%dT%H%M%SZ"
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"
_URL_PREFIXES = ("postgresql://", "postgres://")
_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?:restore|cloudbackup-download)-(?P<pid>\d+)-[0-9a-f]+")
STDOUT_CHUNK = 1024**2


class Installed(Protocol):
    """What a target reports back (a ``RestoreResult``)."""

    moved_aside: str | None


# ---------------------------------------------------------------- the targets


class Target(ABC):
    """A planned target. ``workdir`` holds the hidden workspace (same filesystem as the
    target); its entries are named after ``staging_name``."""

    workdir: Path
    staging_name: str

    @abstractmethod
    def show(self) -> str:
        """The target as people see it (a URL redacted)."""

    def ready(self) -> None:  # noqa: B027 - most targets need no check here
        """Raise UsageError when the target cannot be written after all (checked before
        the archive is read)."""

    def members(self, staging: Path, manifest: Manifest, source: str) -> list[Path]:
        """The staged members this target installs, each checked (nothing for a tree)."""
        return []

    @abstractmethod
    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        """Put the verified, staged restore in place."""

    def dry_run_note(self, force: bool) -> str:
        """What a real restore would do besides writing (a dry run's words)."""
        return ""


class DirectoryTarget(Target):
    """A tree: renamed into place; an existing one moved aside first (``--force``). An
    empty mount point cannot be renamed over: the staging directory is made inside it and
    its entries moved in."""

    def __init__(self, path: Path, *, mount_point: bool = False) -> None:
        self.path = path
        self.mount_point = mount_point
        self.workdir = path if mount_point else path.parent
        self.staging_name = "cloudbackup" if mount_point else path.name

    @classmethod
    def plan(cls, manifest: Manifest, to: str | None, force: bool) -> DirectoryTarget:
        if to in ("-",) or (to or "").startswith(_URL_PREFIXES):
            raise UsageError(
                f"{manifest.source} is a {manifest.kind} source: restore it into a directory "
                "(--to DIR)"
            )
        path = Path(os.path.abspath(to if to else manifest.id))
        if path.is_symlink():
            real = Path(os.path.realpath(path))
            LOG.info("--to %s is a symlink; restoring into %s", path, real)
            path = real
        if not (path.exists() or path.is_symlink()):
            return cls(path)
        if not path.is_dir():
            if not force:
                raise UsageError(
                    f"target {path} exists and is not a directory",
                    "pass --force to move it aside, or choose another --to",
                )
            return cls(path)
        mount = os.path.ismount(path)
        if not is_nonempty_dir(path, ignore_ours=mount):
            return cls(path, mount_point=mount)
        if mount:
            raise UsageError(
                f"target {path} is a non-empty mount point",
                "restore into an empty directory (or an empty volume) and move the data",
            )
        if not force:
            raise UsageError(
                f"target {path} is not empty",
                f"pass --force to move it aside to {path.name}.before-restore-<time>, "
                "or choose another --to",
            )
        return cls(path)

    def show(self) -> str:
        return str(self.path)

    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        path = self.path
        if self.mount_point:
            # One rename per top-level entry (atomic per entry only), then drop the staging.
            for entry in sorted(os.listdir(staging)):
                os.rename(staging / entry, path / entry)
            shutil.copymode(staging, path)
            os.rmdir(staging)
            fsync_dir(path, best_effort=True)
            return
        if path.is_dir() and not path.is_symlink() and not is_nonempty_dir(path):
            try:
                os.rmdir(path)  # an empty directory is simply replaced
            except OSError:
                pass
        if path.exists() or path.is_symlink():
            aside = aside_path(path, stamp(ctx))
            os.rename(path, aside)
            result.moved_aside = str(aside)
            LOG.info("moved the existing %s aside to %s", path, aside)
        os.rename(staging, path)
        fsync_dir(path.parent, best_effort=True)

    def dry_run_note(self, force: bool) -> str:
        path = self.path
        if (path.exists() or path.is_symlink()) and force and _nonempty(path):
            return f"; the existing {path.name} would be moved aside"
        return ""


class _SingleFile(Target):
    """A target that takes one regular member of the archive."""

    def members(self, staging: Path, manifest: Manifest, source: str) -> list[Path]:
        # Private first: nothing can be swapped in between the check and the use.
        os.chmod(staging, 0o700)
        name = kind_of(manifest.kind).restore_member(source, manifest.members)
        if name is None:
            raise IntegrityError(
                f"{manifest.archive}: the manifest names no member to restore", _INTEGRITY_HINT
            )
        return [regular_member(staging, name, manifest.archive)]


class FileTarget(_SingleFile):
    """One file; an existing one is moved aside first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.workdir = path.parent
        self.staging_name = path.name

    @classmethod
    def plan(cls, manifest: Manifest, to: str | None, *, stdout: bool = False) -> Path:
        """The path ``--to`` names (``stdout``: the kind may also go to ``--to -``)."""
        if not to or to.startswith(_URL_PREFIXES):
            extra = " or --to - (stdout)" if stdout else ""
            raise UsageError(f"{manifest.source} is a {manifest.kind} backup: give --to FILE{extra}")
        if to == "-":
            raise UsageError("--to - (stdout) is for command sources only; give --to FILE")
        path = Path(os.path.abspath(to))
        if path.is_dir() and not path.is_symlink():
            raise UsageError(f"target {path} is a directory; give the file to restore into")
        return path

    def show(self) -> str:
        return str(self.path)

    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        path = self.path
        if path.exists() or path.is_symlink():
            aside = aside_path(path, stamp(ctx))
            os.rename(path, aside)
            result.moved_aside = str(aside)
        os.rename(members[0], path)
        fsync_dir(path.parent, best_effort=True)

    def dry_run_note(self, force: bool) -> str:
        if self.path.exists() or self.path.is_symlink():
            return f"; the existing {self.path.name} would be moved aside"
        return ""


class SQLiteTarget(FileTarget):
    """A SQLite database file: checked, then swapped in by ``sources.sqlite.restore_sqlite``
    (the old file, with its ``-wal``/``-shm``, kept aside; a database in use refused)."""

    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        moved = restore_sqlite(members[0], self.path, now_stamp=stamp(ctx))
        if moved is not None:
            result.moved_aside = str(moved)


class StdoutTarget(_SingleFile):
    """``--to -``: the one member to standard output, only once it is verified and checked
    (nothing reaches the pipe before). The workspace goes in the local dir."""

    def __init__(self, stdout: IO[bytes] | None, workdir: Path, name: str) -> None:
        self.stdout = stdout
        self.workdir = workdir
        self.staging_name = name

    def show(self) -> str:
        return "stdout"

    def ready(self) -> None:
        if self.stdout is None:
            raise UsageError("--to - needs a standard output to write to")

    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        assert self.stdout is not None
        written = 0
        try:
            with open(members[0], "rb") as data:
                while chunk := data.read(STDOUT_CHUNK):
                    self.stdout.write(chunk)
                    written += len(chunk)
            self.stdout.flush()
        except BrokenPipeError:
            raise CloudBackupError(
                f"stdout was closed after {written} bytes",
                "check the command reading from the pipe",
            ) from None


class PostgresTarget(Target):
    """A database: roles, then the dump, through ``pg_restore`` (``sources.pgtools``). The
    workspace goes in the local dir."""

    def __init__(
        self, url: str, *, force: bool, env: Mapping[str, str], workdir: Path, name: str
    ) -> None:
        self.url = url
        self.force = force
        self.env = env
        self.workdir = workdir
        self.staging_name = name

    @classmethod
    def plan(cls, manifest: Manifest, to: str | None) -> str:
        if not to or not to.startswith(_URL_PREFIXES):
            raise UsageError(
                f"{manifest.source} is a PostgreSQL backup: give --to postgresql://user@host/dbname"
            )
        return to

    def show(self) -> str:
        return redact_url(self.url)

    def members(self, staging: Path, manifest: Manifest, source: str) -> list[Path]:
        """``[dump, globals]`` (globals when the archive has them)."""
        os.chmod(staging, 0o700)
        archive = manifest.archive
        dump = kind_of(manifest.kind).restore_member(source, manifest.members)
        if dump is None:
            # An older manifest without member facts: the one ``*.dump`` the archive holds.
            dumps = sorted(name for name in os.listdir(staging) if name.endswith(".dump"))
            if len(dumps) != 1:
                raise IntegrityError(
                    f"{archive} holds {len(dumps)} .dump members, expected one", _INTEGRITY_HINT
                )
            dump = dumps[0]
        members = [regular_member(staging, dump, archive)]
        if os.path.lexists(staging / pgtools.GLOBALS_MEMBER):
            members.append(regular_member(staging, pgtools.GLOBALS_MEMBER, archive))
        return members

    def install(self, ctx: Context, staging: Path, members: list[Path], result: Installed) -> None:
        pgtools.restore_dump(
            members[0],
            members[1] if len(members) > 1 else None,
            self.url,
            force=self.force,
            log=lambda message: LOG.info("%s", message),
            env=self.env,
        )


# ---------------------------------------------------------------- planning


def plan_target(
    ctx: Context,
    manifest: Manifest,
    to: str | None,
    *,
    force: bool,
    includes: Sequence[str],
    stdout: IO[bytes] | None = None,
) -> Target:
    """The target of restoring ``manifest``'s backup to ``to`` (``--to``), checked before
    anything is read: UsageError (exit 2) when it cannot be used as asked."""
    shape = kind_of(manifest.kind).restore_as
    if includes and shape is not RestoreAs.TREE:
        raise UsageError(
            f"--include applies to directory and glob sources; {manifest.source} is "
            f"{manifest.kind}"
        )
    return _PLANS[shape](ctx, manifest, to, force, stdout)


def _plan_file(
    ctx: Context, manifest: Manifest, to: str | None, force: bool, stdout: IO[bytes] | None
) -> Target:
    if to == "-":
        return StdoutTarget(stdout, ctx.settings.local_dir, manifest.id)
    return FileTarget(FileTarget.plan(manifest, to, stdout=True))


_PLANS: dict[RestoreAs, Callable[[Context, Manifest, str | None, bool, Any], Target]] = {
    RestoreAs.TREE: lambda ctx, manifest, to, force, out: DirectoryTarget.plan(manifest, to, force),
    RestoreAs.FILE: _plan_file,
    RestoreAs.SQLITE: lambda ctx, manifest, to, force, out: SQLiteTarget(
        FileTarget.plan(manifest, to)
    ),
    RestoreAs.POSTGRESQL: lambda ctx, manifest, to, force, out: PostgresTarget(
        PostgresTarget.plan(manifest, to),
        force=force,
        env=ctx.settings.child_env,
        workdir=ctx.settings.local_dir,
        name=manifest.id,
    ),
}


# ---------------------------------------------------------------- helpers


def regular_member(staging: Path, name: str, archive: str) -> Path:
    """``staging/name`` when the archive put a regular file with one name there, else exit 3:
    a symlink, hard link, device or directory is never what a single-file restore hands on."""
    path = staging / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise IntegrityError(
            f"{archive} holds no regular file {name}; nothing was restored", _INTEGRITY_HINT
        ) from None
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return path
    if stat.S_ISREG(st.st_mode):
        what = f"a hard link ({st.st_nlink} names)"
    elif stat.S_ISLNK(st.st_mode):
        what = "a symlink"
    elif stat.S_ISDIR(st.st_mode):
        what = "a directory"
    else:
        what = "a special file"
    raise IntegrityError(
        f"{archive}: {name} is {what}, not a regular file; nothing was restored",
        _INTEGRITY_HINT,
    )


def stamp(ctx: Context) -> str:
    return ctx.now().astimezone(UTC).strftime(_STAMP)


def aside_path(path: Path, when: str) -> Path:
    """``<path>.before-restore-<when>`` (``-2``, ``-3``... when taken)."""
    candidate = path.with_name(f"{path.name}.before-restore-{when}")
    n = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.before-restore-{when}-{n}")
        n += 1
    return candidate


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_nonempty_dir(path: Path, *, ignore_ours: bool = False) -> bool:
    """True when ``path`` holds anything (``ignore_ours``: but a dead restore's leftovers)."""
    with os.scandir(path) as it:
        for entry in it:
            match = _STALE_RE.match(entry.name) if ignore_ours else None
            if match is None or _pid_alive(int(match["pid"])):
                return True
    return False


def _nonempty(path: Path) -> bool:
    return not path.is_dir() or is_nonempty_dir(path)


class Workspace:
    """Hidden temp files and staging directories beside the target; removed on exit (and
    those a killed restore into the same place left, once its process is gone)."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.paths: list[Path] = []

    def __enter__(self) -> Workspace:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        return self

    def _clean_stale(self) -> None:
        try:
            entries = list(os.scandir(self.workdir))
        except OSError:
            return
        for entry in entries:
            match = _STALE_RE.match(entry.name)
            if not match or match["name"] != self.name or _pid_alive(int(match["pid"])):
                continue
            LOG.info("removing %s left by an interrupted restore", entry.path)
            if entry.is_dir(follow_symlinks=False):
                remove_tree(Path(entry.path))
            else:
                Path(entry.path).unlink(missing_ok=True)

    def download_path(self) -> Path:
        path = self.workdir / f".{self.name}.cloudbackup-download-{self.token}.partial"
        self.paths.append(path)
        return path

    def staging(self) -> Path:
        path = self.workdir / f".{self.name}.restore-{self.token}"
        os.mkdir(path, 0o777)  # the umask's default mode, unless the archive has a root entry
        self.paths.append(path)
        return path

    def __exit__(self, *exc: object) -> None:
        for path in reversed(self.paths):
            try:
                if path.is_dir() and not path.is_symlink():
                    remove_tree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as error:
                LOG.warning("cannot remove %s: %s", path, error.strerror)
