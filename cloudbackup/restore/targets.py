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

The target's directory may be written by others (a root restore into ``/home/alice/r``):
it is opened once without following a link (:class:`Workspace`), and the staging directory
is held open from the moment it is made (:class:`Staging`); nothing planted or swapped in
that directory meanwhile is ever followed, written or installed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import IO, Any, Protocol

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, IntegrityError, UsageError
from cloudbackup.core.model import Manifest
from cloudbackup.fs.tree import empty_tree, open_directory, remove_tree
from cloudbackup.fs.walk import DIR_FLAGS
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
    target; symlinks on the way to it resolved once, when planned); its entries are named
    after ``staging_name``."""

    workdir: Path
    staging_name: str
    #: The staging directory stays private (0700) rather than taking the umask's mode.
    private_staging = True

    @abstractmethod
    def show(self) -> str:
        """The target as people see it (a URL redacted)."""

    def ready(self) -> None:  # noqa: B027 - most targets need no check here
        """Raise UsageError when the target cannot be written after all (checked before
        the archive is read)."""

    def members(self, staging: Staging, manifest: Manifest, source: str) -> list[Path]:
        """The staged members this target installs, each checked (nothing for a tree):
        paths through the staging directory held open (:attr:`Staging.path`)."""
        return []

    @abstractmethod
    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
        """Put the verified, staged restore in place (relative to ``staging.parent``, the
        workdir held open: never by a path someone could have changed)."""

    def dry_run_note(self, force: bool) -> str:
        """What a real restore would do besides writing (a dry run's words)."""
        return ""


class DirectoryTarget(Target):
    """A tree: renamed into place; an existing one moved aside first (``--force``). An
    empty mount point cannot be renamed over: the staging directory is made inside it and
    its entries moved in."""

    private_staging = False  # the umask's mode, unless the archive has a root entry

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
        path = resolved(path)
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

    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
        parent, name = staging.parent, self.path.name
        if self.mount_point:
            # One rename per top-level entry (atomic per entry only), from the directory
            # held into the mount point held; the emptied staging goes with the workspace.
            for entry in sorted(os.listdir(staging.fd)):
                os.rename(entry, entry, src_dir_fd=staging.fd, dst_dir_fd=parent)
            os.fchmod(parent, stat.S_IMODE(os.fstat(staging.fd).st_mode))
            _fsync(parent)
            return
        staging.check_named()
        existing = lstat_at(parent, name)
        if (
            existing is not None
            and stat.S_ISDIR(existing.st_mode)
            and not _nonempty_at(parent, name)
        ):
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent)  # an empty directory is simply replaced
            existing = lstat_at(parent, name)
        if existing is not None:
            aside = aside_name(parent, name, stamp(ctx))
            os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
            result.moved_aside = str(self.path.with_name(aside))
            LOG.info("moved the existing %s aside to %s", self.path, result.moved_aside)
        os.rename(staging.name, name, src_dir_fd=parent, dst_dir_fd=parent)
        staging.installed_as(name)
        _fsync(parent)

    def dry_run_note(self, force: bool) -> str:
        path = self.path
        if (path.exists() or path.is_symlink()) and force and _nonempty(path):
            return f"; the existing {path.name} would be moved aside"
        return ""


class _SingleFile(Target):
    """A target that takes one regular member of the archive."""

    def members(self, staging: Staging, manifest: Manifest, source: str) -> list[Path]:
        # Private first (an archive's root entry may have opened it): nothing can be
        # swapped in between the check and the use.
        os.fchmod(staging.fd, 0o700)
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
            raise UsageError(
                f"{manifest.source} is a {manifest.kind} backup: give --to FILE{extra}"
            )
        if to == "-":
            raise UsageError("--to - (stdout) is for command sources only; give --to FILE")
        path = resolved(Path(os.path.abspath(to)))
        if path.is_dir() and not path.is_symlink():
            raise UsageError(f"target {path} is a directory; give the file to restore into")
        return path

    def show(self) -> str:
        return str(self.path)

    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
        parent, name = staging.parent, self.path.name
        if lstat_at(parent, name) is not None:
            aside = aside_name(parent, name, stamp(ctx))
            os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
            result.moved_aside = str(self.path.with_name(aside))
        # From the directory held: whatever the staging's name leads to now.
        os.rename(members[0].name, name, src_dir_fd=staging.fd, dst_dir_fd=parent)
        _fsync(parent)

    def dry_run_note(self, force: bool) -> str:
        if self.path.exists() or self.path.is_symlink():
            return f"; the existing {self.path.name} would be moved aside"
        return ""


class SQLiteTarget(FileTarget):
    """A SQLite database file: checked, then swapped in by ``sources.sqlite.restore_sqlite``
    (the old file, with its ``-wal``/``-shm``, kept aside; a database in use refused)."""

    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
        moved = restore_sqlite(members[0], self.path, now_stamp=stamp(ctx), dir_fd=staging.parent)
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

    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
        assert self.stdout is not None
        written = 0
        fd = os.open(members[0].name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging.fd)
        try:
            with open(fd, "rb") as data:
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

    def members(self, staging: Staging, manifest: Manifest, source: str) -> list[Path]:
        """``[dump, globals]`` (globals when the archive has them)."""
        os.fchmod(staging.fd, 0o700)
        archive = manifest.archive
        dump = kind_of(manifest.kind).restore_member(source, manifest.members)
        if dump is None:
            # An older manifest without member facts: the one ``*.dump`` the archive holds.
            dumps = sorted(name for name in os.listdir(staging.fd) if name.endswith(".dump"))
            if len(dumps) != 1:
                raise IntegrityError(
                    f"{archive} holds {len(dumps)} .dump members, expected one", _INTEGRITY_HINT
                )
            dump = dumps[0]
        members = [regular_member(staging, dump, archive)]
        if lstat_at(staging.fd, pgtools.GLOBALS_MEMBER) is not None:
            members.append(regular_member(staging, pgtools.GLOBALS_MEMBER, archive))
        return members

    def install(
        self, ctx: Context, staging: Staging, members: list[Path], result: Installed
    ) -> None:
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
            f"--include applies to directory and glob sources; {manifest.source} is {manifest.kind}"
        )
    return _PLANS[shape](ctx, manifest, to, force, stdout)


def _plan_file(
    ctx: Context, manifest: Manifest, to: str | None, force: bool, stdout: IO[bytes] | None
) -> Target:
    if to == "-":
        return StdoutTarget(stdout, _real(ctx.settings.local_dir), manifest.id)
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
        workdir=_real(ctx.settings.local_dir),
        name=manifest.id,
    ),
}


# ---------------------------------------------------------------- helpers


def resolved(path: Path) -> Path:
    """``path`` with every symlink on the way to it resolved (its last component kept): the
    place a restore works in is decided once, when it is planned; afterwards it is opened
    component by component without following any link (``fs.tree.open_directory``)."""
    return Path(os.path.realpath(path.parent)) / path.name


def _real(directory: Path) -> Path:
    """A workdir that is a directory of the configuration (the local dir): every symlink
    resolved, its own name too (see resolved)."""
    return Path(os.path.realpath(directory))


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in the directory ``dir_fd``; None when there is nothing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def regular_member(staging: Staging, name: str, archive: str) -> Path:
    """``name`` in the staging directory held open, when the archive put a regular file with
    one name there, else exit 3: a symlink, hard link, device or directory is never what a
    single-file restore hands on. Returns its path through the directory held."""
    st = lstat_at(staging.fd, name)
    if st is None:
        raise IntegrityError(
            f"{archive} holds no regular file {name}; nothing was restored", _INTEGRITY_HINT
        )
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return staging.path / name
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


def aside_name(dir_fd: int, name: str, when: str) -> str:
    """``<name>.before-restore-<when>`` (``-2``, ``-3``... when taken, by anything: a
    symlink planted there is never renamed over, nor followed)."""
    candidate = f"{name}.before-restore-{when}"
    n = 2
    while lstat_at(dir_fd, candidate) is not None:
        candidate = f"{name}.before-restore-{when}-{n}"
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


def _has_entries(fd: int, *, ignore_ours: bool = False) -> bool:
    with os.scandir(fd) as it:
        for entry in it:
            match = _STALE_RE.match(entry.name) if ignore_ours else None
            if match is None or _pid_alive(int(match["pid"])):
                return True
    return False


def is_nonempty_dir(path: Path, *, ignore_ours: bool = False) -> bool:
    """True when the directory ``path`` holds anything (``ignore_ours``: but a dead
    restore's leftovers). For planning: read only."""
    fd = os.open(path, DIR_FLAGS)
    try:
        return _has_entries(fd, ignore_ours=ignore_ours)
    finally:
        os.close(fd)


def _nonempty_at(dir_fd: int, name: str) -> bool:
    """True unless ``name`` in ``dir_fd`` is a directory holding nothing (never followed)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return True
    try:
        return _has_entries(fd)
    finally:
        os.close(fd)


def _nonempty(path: Path) -> bool:
    return not path.is_dir() or is_nonempty_dir(path)


def _fsync(fd: int) -> None:
    """Make the renames in the directory ``fd`` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _replaced(shown: Path) -> CloudBackupError:
    return CloudBackupError(
        f"the staging directory {shown} was replaced or moved by someone else during the "
        "restore; nothing was followed and nothing put in place",
        f"someone else can write {shown.parent}: restore into a directory only you can write",
    )


class Staging:
    """A restore's hidden staging directory, held open from the moment it is made.

    Everything done to it goes through ``fd`` (extraction, chmod, the checks of
    single-file members) or :attr:`path`; only installing a tree renames it by ``name``,
    relative to ``parent`` (the workdir held open) and checked to be still this directory.
    Someone who can write the workdir may rename or replace that name at any moment: what
    they plant is never followed, written or installed.
    """

    def __init__(self, parent: int, name: str, fd: int, shown: Path) -> None:
        self.parent = parent
        self.name = name
        self.fd = fd
        self.shown = shown
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.installed = False

    @property
    def path(self) -> Path:
        """``/proc/<pid>/fd/<fd>``: a path that leads to the directory held whatever its name
        leads to now, for code that needs a path (SQLite; ``pg_restore``, a child of this
        process, which may read its parent's descriptors)."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}")

    def still_named(self, name: str | None = None) -> bool:
        st = lstat_at(self.parent, name or self.name)
        return st is not None and (st.st_dev, st.st_ino) == self.ident

    def check_named(self) -> None:
        """Raise unless its name still leads to the directory held."""
        if not self.still_named():
            raise _replaced(self.shown)

    def installed_as(self, name: str) -> None:
        """After the rename into place: it is the target now (and must be this directory)."""
        if not self.still_named(name):
            raise _replaced(self.shown)
        self.installed = True


class Workspace:
    """Hidden staging directories beside the target; removed on exit (and those a killed
    restore into the same place left, once its process is gone: staging directories, and
    the downloads older versions made).

    The workdir is opened once, component by component without following a symlink, and
    everything in it is made, checked and removed relative to that descriptor.
    """

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.fd = -1
        self._stagings: list[Staging] = []

    def __enter__(self) -> Workspace:
        self.fd = open_directory(self.workdir, create=True)
        self._clean_stale()
        return self

    def _clean_stale(self) -> None:
        try:
            names = os.listdir(self.fd)
        except OSError:
            return
        for name in names:
            match = _STALE_RE.match(name)
            if not match or match["name"] != self.name or _pid_alive(int(match["pid"])):
                continue
            LOG.info("removing %s left by an interrupted restore", self.workdir / name)
            remove_tree(name, dir_fd=self.fd)

    def staging(self, *, private: bool = True) -> Staging:
        """Make the staging directory and open it; it must be the one made: a symlink
        planted in its place is never followed, a directory someone else made is refused.
        ``private``: mode 0700; else the umask's mode (an archive's root entry sets its own)."""
        name = f".{self.name}.restore-{self.token}"
        shown = self.workdir / name
        os.mkdir(name, 0o700, dir_fd=self.fd)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _replaced(shown) from None
            raise
        try:
            if not self._made_here(fd):
                raise _replaced(shown)
            os.fchmod(fd, 0o700 if private else 0o777 & ~_umask())
        except BaseException:
            os.close(fd)
            raise
        staging = Staging(self.fd, name, fd, shown)
        self._stagings.append(staging)
        return staging

    def _made_here(self, fd: int) -> bool:
        """Whether the directory ``fd`` is the empty one just made: owned by this user, or
        by the owner of a workdir only its owner can write (a filesystem that maps owners:
        NFS root_squash, vfat), whose identity is then the one things made there get."""
        st = os.fstat(fd)
        if os.listdir(fd):
            return False
        if st.st_uid == os.geteuid():
            return True
        parent = os.fstat(self.fd)
        return st.st_uid == parent.st_uid and not parent.st_mode & 0o022

    def discard(self, staging: Staging) -> None:
        """Remove ``staging`` now (a copy that failed its check: another one is tried)."""
        self._stagings.remove(staging)
        self._remove(staging)

    def _remove(self, staging: Staging) -> None:
        try:
            if not staging.installed:
                empty_tree(staging.fd, str(staging.shown))
                if staging.still_named():
                    os.rmdir(staging.name, dir_fd=self.fd)
        except OSError as error:
            LOG.warning("cannot remove %s: %s", staging.shown, error.strerror)
        finally:
            os.close(staging.fd)

    def __exit__(self, *exc: object) -> None:
        for staging in reversed(self._stagings):
            self._remove(staging)
        os.close(self.fd)
