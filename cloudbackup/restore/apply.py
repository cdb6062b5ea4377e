"""Restore: find a backup by LIST, verify its archive, extract it safely, swap it into place.

The flow (see DESIGN.md)::

    LIST (local + remote) ─▶ choose the backup (newest, or newest at/before --at)
      ─▶ local copy re-hashes to the manifest?  yes: use it   no: GET the remote copy into a
         temp file beside the target, hashing on the way; a mismatch is an IntegrityError
      ─▶ decompress ─▶ extract.extract() into a staging directory beside the target
      ─▶ count what is on disk ─▶ (--force: move the old target aside) ─▶ rename into place

Nothing unverified is ever decompressed, nothing is ever written under the target's own
name until the whole tree is complete (a restore killed with SIGKILL leaves at most a
hidden staging directory, removed by the next restore into the same place), and a restore
counts what it wrote against the manifest and says so.
"""

from __future__ import annotations

import errno
import gzip
import logging
import lzma
import os
import re
import shutil
import stat
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

import zstandard

from cloudbackup.context import Context
from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    UsageError,
)
from cloudbackup.core.model import (
    Manifest,
)
from cloudbackup.fs.files import fsync_dir, open_regular
from cloudbackup.fs.tree import Tally, remove_tree, tally_tree
from cloudbackup.restore.download import DOWNLOAD_CHUNK, fetch_archive
from cloudbackup.restore.select import _choose_copy, _Copy, _peek_manifest, find_backup
from cloudbackup.sources.base import RestoreAs
from cloudbackup.sources.pgtools import GLOBALS_MEMBER
from cloudbackup.sources.registry import kind_of
from cloudbackup.stream.compress import open_decompressed
from cloudbackup.stream.extract import ExtractResult, extract
from cloudbackup.stream.hashing import HashingReader

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")

_STAMP = "%Y%m%dT%H%M%SZ"
_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    zstandard.ZstdError,
    lzma.LZMAError,
    zlib.error,
    gzip.BadGzipFile,
    EOFError,
)
_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"


# ---------------------------------------------------------------- results


@dataclass
class RestoreResult:
    """What one restore did (or, with ``dry_run``, would do)."""

    id: str
    host: str
    source: str
    kind: str = ""
    where_from: str = ""  # "local" | "remote"
    target: str = ""
    files: int = 0  # non-directory entries written (regular files, symlinks, hard links)
    bytes: int = 0  # regular-file bytes written
    expected_files: int | None = None
    expected_bytes: int | None = None
    refused: list[str] = field(default_factory=list)
    moved_aside: str | None = None
    seconds: float = 0.0
    ok: bool = False
    exit_code: int = 0
    detail: str = ""
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "source": self.source,
            "kind": self.kind,
            "where_from": self.where_from,
            "target": self.target,
            "files": self.files,
            "bytes": self.bytes,
            "expected_files": self.expected_files,
            "expected_bytes": self.expected_bytes,
            "refused": self.refused,
            "moved_aside": self.moved_aside,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "exit_code": self.exit_code,
            "detail": self.detail,
            "dry_run": self.dry_run,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        """One line for people."""
        if self.dry_run:
            return f"dry run: {self.detail}; nothing written"
        what = f"{self.id} (host {self.host}) from {self.where_from}"
        if self.ok:
            return f"restored {what}: {self.detail}"
        if self.files:
            return f"PARTLY restored {what}: {self.detail}"
        return f"restore of {what} FAILED: {self.detail}"


# ---------------------------------------------------------------- targets and workspace


@dataclass
class _Target:
    kind: str  # "dir" | "file" | "stdout" | "database"
    path: Path | None  # final path (dir or file)
    url: str | None = None  # postgresql target
    workdir: Path = Path(".")  # where temp files and staging go (same filesystem as path)
    mount_point: bool = False  # an empty mount point: staged inside, entries moved in

    def show(self) -> str:
        if self.kind == "stdout":
            return "stdout"
        if self.kind == "database":
            from cloudbackup.sources.base import redact_url

            return redact_url(self.url or "")
        return str(self.path)


def _is_nonempty_dir(path: Path, *, ignore_ours: bool = False) -> bool:
    """True when ``path`` holds anything (``ignore_ours``: but a dead restore's leftovers)."""
    with os.scandir(path) as it:
        for entry in it:
            match = _STALE_RE.match(entry.name) if ignore_ours else None
            if match is None or _pid_alive(int(match["pid"])):
                return True
    return False


def _plan_target(
    ctx: Context, manifest: Manifest, to: str | None, force: bool, includes: Sequence[str]
) -> _Target:
    kind = manifest.kind
    shape = kind_of(kind).restore_as
    if includes and shape is not RestoreAs.TREE:
        raise UsageError(
            f"--include applies to directory and glob sources; {manifest.source} is {kind}"
        )
    if shape is RestoreAs.TREE:
        if to in ("-",) or (to or "").startswith(("postgresql://", "postgres://")):
            raise UsageError(
                f"{manifest.source} is a {kind} source: restore it into a directory (--to DIR)"
            )
        path = Path(os.path.abspath(to if to else manifest.id))
        if path.is_symlink():
            real = Path(os.path.realpath(path))
            LOG.info("--to %s is a symlink; restoring into %s", path, real)
            path = real
        target = _Target("dir", path, workdir=path.parent)
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                if not force:
                    raise UsageError(
                        f"target {path} exists and is not a directory",
                        "pass --force to move it aside, or choose another --to",
                    )
            elif _is_nonempty_dir(path, ignore_ours=os.path.ismount(path)):
                if os.path.ismount(path):
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
            elif os.path.ismount(path):
                target.mount_point = True
                target.workdir = path
        return target
    if shape is RestoreAs.POSTGRESQL:
        if not to or not to.startswith(("postgresql://", "postgres://")):
            raise UsageError(
                f"{manifest.source} is a PostgreSQL backup: give --to postgresql://user@host/dbname"
            )
        return _Target("database", None, url=to, workdir=ctx.settings.local_dir)
    if shape in (RestoreAs.FILE, RestoreAs.SQLITE):
        if not to or to.startswith(("postgresql://", "postgres://")):
            extra = " or --to - (stdout)" if shape is RestoreAs.FILE else ""
            raise UsageError(f"{manifest.source} is a {kind} backup: give --to FILE{extra}")
        if to == "-":
            if shape is not RestoreAs.FILE:
                raise UsageError("--to - (stdout) is for command sources only; give --to FILE")
            return _Target("stdout", None, workdir=ctx.settings.local_dir)
        path = Path(os.path.abspath(to))
        if path.is_dir() and not path.is_symlink():
            raise UsageError(f"target {path} is a directory; give the file to restore into")
        return _Target("file", path, workdir=path.parent)
    raise CloudBackupError(
        f"{manifest.id}: unknown source kind {kind!r} in its manifest",
        "restore it with a newer cloudbackup",
    )


_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?:restore|cloudbackup-download)-(?P<pid>\d+)-[0-9a-f]+")


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


class _Workspace:
    """Hidden temp files and staging directories beside the target; removed on exit."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.name = name
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.paths: list[Path] = []

    def __enter__(self) -> _Workspace:
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


# ---------------------------------------------------------------- extraction


def _open_archive(path: Path, compression: str) -> tuple[BinaryIO, Any]:
    raw = open_regular(path)
    return raw, open_decompressed(raw, compression)


def _extract_file(
    path: Path,
    compression: str,
    into: Path,
    *,
    includes: Sequence[str] = (),
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExtractResult:
    # Decompression stays on this thread: python-zstandard holds the GIL while it works, so
    # a read-ahead thread measured slower, not faster (see benchmarks/RESULTS.md, Restore).
    raw, stream = _open_archive(path, compression)
    try:
        return extract(stream, into, include=includes, dry_run=dry_run, progress=progress)
    except _DECOMPRESS_ERRORS as exc:
        raise IntegrityError(f"cannot decompress {path.name}: {exc}", _INTEGRITY_HINT) from None
    finally:
        raw.close()


# ---------------------------------------------------------------- the use case


def _stamp(ctx: Context) -> str:
    return ctx.now().astimezone(UTC).strftime(_STAMP)


def _aside_path(path: Path, stamp: str) -> Path:
    candidate = path.with_name(f"{path.name}.before-restore-{stamp}")
    n = 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.before-restore-{stamp}-{n}")
        n += 1
    return candidate


def restore(
    ctx: Context,
    what: str,
    *,
    host: str | None = None,
    at: datetime | None = None,
    to: str | None = None,
    from_: str | None = None,
    includes: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    stdout: IO[bytes] | None = None,
    ranged: bool = False,
) -> RestoreResult:
    """Restore backup ``what`` (a source name or a backup id) of ``host``.

    Raises UsageError (2) before anything is read when the backup cannot be found or the
    target is not acceptable, IntegrityError (3) when no verified copy exists. Refused
    members and count mismatches are reported in the result (exit 1), the rest restored.
    ``stdout`` receives a command source's output for ``to == "-"``. ``ranged`` uses
    parallel ranged GETs (``settings.s3_concurrency``) for archives over 64 MiB.
    """
    started = time.monotonic()
    host = host or ctx.host
    if from_ not in (None, "local", "remote"):
        raise UsageError(f"--from {from_!r}: use remote or local")
    cand = find_backup(ctx, what, host=host, at=at, from_=from_)
    result = RestoreResult(cand.id, cand.host, cand.backup_id.source, dry_run=dry_run)
    # A cheap plan first: a bad target fails before anything is downloaded or hashed.
    peeked = _peek_manifest(ctx, cand, from_)
    target = _plan_target(ctx, peeked.manifest, to, force, includes)
    copy = _choose_copy(ctx, cand, from_, peeked)
    manifest = copy.manifest
    result.kind = manifest.kind
    result.where_from = copy.where
    result.target = target.show()
    result.expected_files = manifest.file_count
    result.expected_bytes = manifest.uncompressed_bytes
    if manifest.warnings:
        result.warnings.append(
            f"the backup recorded {len(manifest.warnings)} warning(s) when it was made"
        )
    LOG.info(
        "restoring %s (host %s) from %s into %s", cand.id, cand.host, copy.where, result.target
    )
    try:
        if dry_run:
            _dry_run(ctx, copy, target, includes, force, result)
        else:
            _run(ctx, copy, target, includes, force, result, stdout, ranged)
    except OSError as exc:
        raise _os_error(exc, result.target) from exc
    finally:
        result.seconds = time.monotonic() - started
    if not dry_run and not result.ok:
        LOG.error(
            "restore of %s is incomplete (exit %d): see the summary", cand.id, result.exit_code
        )
    return result


def _os_error(exc: OSError, target: str) -> CloudBackupError:
    if exc.errno == errno.ENOSPC:
        return CloudBackupError(
            f"no space left on the device while restoring into {target}",
            "free space or restore elsewhere (--to); nothing was put in place",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = exc.filename or target
        return CloudBackupError(
            f"cannot write {where}: {exc.strerror}", "run as a user who may write there"
        )
    return CloudBackupError(
        f"restore into {target} failed: {exc.strerror or exc}"
        + (f" ({exc.filename})" if exc.filename else "")
    )


def _archive_path(ctx: Context, copy: _Copy, ws: _Workspace, ranged: bool) -> Path:
    if copy.local_path is not None:
        return copy.local_path
    manifest = copy.manifest
    assert copy.ref.archive_key
    dest = ws.download_path()
    progress = ctx.progress(f"download {manifest.id}", manifest.size)
    try:
        fetch_archive(
            ctx.remote,
            copy.ref.archive_key,
            dest,
            size=manifest.size,
            sha256=manifest.sha256,
            progress=progress,
            concurrency=ctx.settings.s3_concurrency if ranged else 1,
        )
    finally:
        getattr(progress, "close", lambda: None)()
    LOG.info(
        "downloaded and verified %s (%d bytes, sha256 matches)", manifest.archive, manifest.size
    )
    return dest


def _run(
    ctx: Context,
    copy: _Copy,
    target: _Target,
    includes: Sequence[str],
    force: bool,
    result: RestoreResult,
    stdout: IO[bytes] | None,
    ranged: bool,
) -> None:
    manifest = copy.manifest
    name = target.path.name if target.path is not None else manifest.id
    if target.mount_point:
        name = "cloudbackup"
    if target.kind == "stdout" and stdout is None:
        raise UsageError("--to - needs a standard output to write to")
    with _Workspace(target.workdir, name) as ws:
        archive = _archive_path(ctx, copy, ws, ranged)
        staging = ws.staging()
        progress = ctx.progress(f"restore {manifest.id}", manifest.uncompressed_bytes)
        try:
            extracted = _extract_file(
                archive, manifest.compression, staging, includes=includes, progress=progress
            )
        finally:
            getattr(progress, "close", lambda: None)()
        if copy.local_path is None:
            Path(archive).unlink(missing_ok=True)  # free the space before anything else
        members = _single_file_members(staging, copy) if target.kind != "dir" else []
        result.refused = list(extracted.refused)
        result.warnings += extracted.warnings
        on_disk = tally_tree(staging)
        if includes:
            expected = (
                extracted.files + extracted.symlinks + extracted.hardlinks,
                extracted.bytes,
            )
        else:
            expected = (manifest.file_count, manifest.uncompressed_bytes)
        result.files, result.bytes = on_disk.files, on_disk.bytes
        if on_disk.files == 0 and on_disk.dirs == 0:
            result.exit_code = 1
            result.detail = (
                f"nothing restored: --include {' '.join(includes)} matched no member"
                if includes
                else "nothing restored: the archive holds no member that could be restored"
            )
            if result.refused:
                result.detail += f"; {len(result.refused)} member(s) refused"
            return
        if target.kind == "dir":
            _put_dir_in_place(ctx, staging, target, result)
        elif target.kind == "file":
            _put_file_in_place(ctx, members[0], target, manifest, result)
        elif target.kind == "stdout":
            assert stdout is not None
            _copy_to_stdout(members[0], stdout)
        elif target.kind == "database":
            _restore_postgres(members, target, force, ctx.settings.child_env)
        _conclude(result, on_disk, expected=expected, includes=includes)


def _counts(files: int, size: int) -> str:
    return f"{files} file{'' if files == 1 else 's'}, {size} byte{'' if size == 1 else 's'}"


def _conclude(
    result: RestoreResult,
    on_disk: Tally,
    *,
    expected: tuple[int, int],
    includes: Sequence[str] = (),
) -> None:
    files, size = expected
    result.expected_files, result.expected_bytes = files, size
    counts = _counts(on_disk.files, on_disk.bytes)
    where = f" into {result.target}"
    aside = f"; the old one was moved aside to {result.moved_aside}" if result.moved_aside else ""
    if result.refused:
        result.exit_code = max(result.exit_code, 1)
        result.detail = (
            f"{counts}{where}; {len(result.refused)} member(s) refused (not restored){aside}"
        )
        return
    basis = "the selection (--include)" if includes else "the manifest"
    if (on_disk.files, on_disk.bytes) == (files, size):
        result.ok = True
        result.detail = f"{counts}{where}, as {basis} says{aside}"
    else:
        result.exit_code = max(result.exit_code, 1)
        result.detail = (
            f"{counts}{where}, but {basis} says {_counts(files, size)} — "
            f"check the restored data{aside}"
        )


def _put_dir_in_place(ctx: Context, staging: Path, target: _Target, result: RestoreResult) -> None:
    assert target.path is not None
    path = target.path
    if target.mount_point:
        # An empty mount point cannot be renamed over: move the staged entries in, one rename
        # each (atomic per top-level entry only), then drop the staging directory.
        for entry in sorted(os.listdir(staging)):
            os.rename(staging / entry, path / entry)
        shutil.copymode(staging, path)
        os.rmdir(staging)
        fsync_dir(path, best_effort=True)
        return
    if path.is_dir() and not path.is_symlink() and not _is_nonempty_dir(path):
        try:
            os.rmdir(path)  # an empty directory is simply replaced
        except OSError:
            pass
    if path.exists() or path.is_symlink():
        aside = _aside_path(path, _stamp(ctx))
        os.rename(path, aside)
        result.moved_aside = str(aside)
        LOG.info("moved the existing %s aside to %s", path, aside)
    os.rename(staging, path)
    fsync_dir(path.parent, best_effort=True)


def _single_file_members(staging: Path, copy: _Copy) -> list[Path]:
    """The staged members a single-file restore hands on, each checked to be a regular file.

    Their names come from the key (``NAME.out``, ``NAME.sqlite3``, after the source name the
    key says) or, for a dump, from the parsed manifest (one plain member name), never from a
    path. The staging directory is made private first, so nothing can be swapped in between
    the check and the use. A PostgreSQL backup gives ``[dump, globals]`` (globals optional).
    """
    os.chmod(staging, 0o700)
    manifest = copy.manifest
    archive = manifest.archive
    kind = kind_of(manifest.kind)
    dump_name = kind.restore_member(copy.ref.source, manifest.members)
    if kind.restore_as is not RestoreAs.POSTGRESQL:
        assert dump_name is not None
        return [_regular_member(staging, dump_name, archive)]
    if dump_name is None:
        # An older manifest without member facts: the one ``*.dump`` the archive holds.
        dumps = sorted(name for name in os.listdir(staging) if name.endswith(".dump"))
        if len(dumps) != 1:
            raise IntegrityError(
                f"{archive} holds {len(dumps)} .dump members, expected one", _INTEGRITY_HINT
            )
        dump_name = dumps[0]
    members = [_regular_member(staging, dump_name, archive)]
    if os.path.lexists(staging / GLOBALS_MEMBER):
        members.append(_regular_member(staging, GLOBALS_MEMBER, archive))
    return members


def _regular_member(staging: Path, name: str, archive: str) -> Path:
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


def _put_file_in_place(
    ctx: Context, member: Path, target: _Target, manifest: Manifest, result: RestoreResult
) -> None:
    assert target.path is not None
    if kind_of(manifest.kind).restore_as is RestoreAs.SQLITE:
        from cloudbackup.sources.sqlite import restore_sqlite

        moved = restore_sqlite(member, target.path, now_stamp=_stamp(ctx))
        if moved is not None:
            result.moved_aside = str(moved)
        return
    path = target.path
    if path.exists() or path.is_symlink():
        aside = _aside_path(path, _stamp(ctx))
        os.rename(path, aside)
        result.moved_aside = str(aside)
    os.rename(member, path)
    fsync_dir(path.parent, best_effort=True)


def _copy_to_stdout(member: Path, out: IO[bytes]) -> None:
    """The verified, checked member, to stdout (only now: nothing reached the pipe before)."""
    written = 0
    try:
        with open(member, "rb") as data:
            while chunk := data.read(DOWNLOAD_CHUNK):
                out.write(chunk)
                written += len(chunk)
        out.flush()
    except BrokenPipeError:
        raise CloudBackupError(
            f"stdout was closed after {written} bytes", "check the command reading from the pipe"
        ) from None


def _restore_postgres(
    members: list[Path], target: _Target, force: bool, env: Mapping[str, str]
) -> None:
    from cloudbackup.sources import pgtools as postgres

    assert target.url
    postgres.restore_dump(
        members[0],
        members[1] if len(members) > 1 else None,
        target.url,
        force=force,
        log=lambda message: LOG.info("%s", message),
        env=env,
    )


def _dry_run(
    ctx: Context,
    copy: _Copy,
    target: _Target,
    includes: Sequence[str],
    force: bool,
    result: RestoreResult,
) -> None:
    manifest = copy.manifest
    result.ok = True
    basis = "manifest"
    if includes:
        extracted = _dry_walk(ctx, copy, includes)
        result.files = extracted.files + extracted.symlinks + extracted.hardlinks
        result.bytes = extracted.bytes
        result.refused = list(extracted.refused)
        basis = "archive walked"
        if result.files == 0:
            result.ok = False
            result.exit_code = 1
    else:
        result.files, result.bytes = manifest.file_count, manifest.uncompressed_bytes
    what = _counts(result.files, result.bytes)
    if includes:
        what += f" (--include {' '.join(includes)})"
    action = f"would restore {what} of {copy.manifest.id} from {copy.where} into {result.target}"
    if target.path is not None and (target.path.exists() or target.path.is_symlink()):
        if target.kind == "file" or (target.kind == "dir" and force and _nonempty(target.path)):
            action += f"; the existing {target.path.name} would be moved aside"
    result.detail = f"{action} ({basis})"
    if result.refused:
        result.detail += f"; {len(result.refused)} member(s) would be refused"
        result.exit_code = 1


def _nonempty(path: Path) -> bool:
    return not path.is_dir() or _is_nonempty_dir(path)


def _dry_walk(ctx: Context, copy: _Copy, includes: Sequence[str]) -> ExtractResult:
    manifest = copy.manifest
    if copy.local_path is not None:
        return _extract_file(
            copy.local_path, manifest.compression, Path("."), includes=includes, dry_run=True
        )
    # Remote: stream the object (no temp file), hash it on the way, check it at the end.
    assert copy.ref.archive_key
    with ctx.remote.open(copy.ref.archive_key) as body:
        hashing = HashingReader(body)
        stream = open_decompressed(hashing, manifest.compression)
        try:
            walked = extract(stream, Path("."), include=includes, dry_run=True)
        except _DECOMPRESS_ERRORS as exc:
            raise IntegrityError(f"cannot decompress {manifest.archive}: {exc}") from None
        hashing.drain()
    if hashing.count != manifest.size or hashing.sha.hexdigest() != manifest.sha256:
        raise IntegrityError(
            f"the remote {manifest.archive} fails its checksum (sha256 {hashing.sha.hexdigest()}, "
            f"{hashing.count} bytes)",
            _INTEGRITY_HINT,
        )
    return walked
