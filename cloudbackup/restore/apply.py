"""Restore: find a backup by LIST, verify its archive, extract it safely, swap it into place.

The flow (SPEC "Restore staging")::

    LIST (local + remote) ─▶ choose the backup (select: newest, or newest at/before --at)
      ─▶ plan the target (targets: a usage error before any byte is read)
      ─▶ local copy re-hashes to the manifest?  yes: use it   no: GET the remote copy into a
         temp file beside the target, hashing on the way (download); a mismatch is an
         IntegrityError
      ─▶ decompress ─▶ extract into a staging directory beside the target (held open:
         extracted into, counted and installed through its descriptor, never its name)
      ─▶ count what is on disk ─▶ the target installs it (--force: the old one moved aside)

Nothing unverified is ever decompressed, nothing is ever written under the target's own
name until the whole tree is complete (a restore killed with SIGKILL leaves at most a
hidden staging directory, removed by the next restore into the same place), and a restore
counts what it wrote against the manifest and says so.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from cloudbackup.context import Context
from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    UsageError,
)
from cloudbackup.core.model import BackupRef
from cloudbackup.core.outcome import REPORTED, Outcome
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.fs.files import open_regular
from cloudbackup.fs.tree import Tally, tally_tree
from cloudbackup.restore import chain as chains
from cloudbackup.restore.download import fetch_archive
from cloudbackup.restore.select import Candidate, Copy, choose_copy, find_backup, peek_manifest
from cloudbackup.restore.targets import Target, Workspace, plan_target
from cloudbackup.stream.compress import DECOMPRESS_ERRORS, open_decompressed
from cloudbackup.stream.extract import ExtractResult, extract
from cloudbackup.stream.hashing import HashingReader

LOG = logging.getLogger("cloudbackup")

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
    #: FAILED when anything was not restored as the manifest (or --include) says: nothing
    #: matched, members refused, counts that differ (partly restored: exit 1).
    outcome: Outcome = Outcome.OK
    detail: str = ""
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

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


# ---------------------------------------------------------------- extraction


def _open_archive(path: Path, compression: str) -> tuple[BinaryIO, Any]:
    raw = open_regular(path)
    return raw, open_decompressed(raw, compression)


def _extract_file(
    path: Path,
    compression: str,
    into: Path | int,
    *,
    includes: Sequence[str] = (),
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    select: Callable[[str], bool] | None = None,
) -> ExtractResult:
    # Decompression stays on this thread: python-zstandard holds the GIL while it works, so
    # a read-ahead thread measured slower, not faster (see benchmarks/RESULTS.md, Restore).
    raw, stream = _open_archive(path, compression)
    try:
        return extract(
            stream, into, include=includes, dry_run=dry_run, progress=progress, select=select
        )
    except DECOMPRESS_ERRORS as exc:
        raise IntegrityError(f"cannot decompress {path.name}: {exc}", _INTEGRITY_HINT) from None
    finally:
        raw.close()


# ---------------------------------------------------------------- the use case


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
) -> RestoreResult:
    """Restore backup ``what`` (a source name or a backup id) of ``host``.

    Raises UsageError (2) before anything is read when the backup cannot be found or the
    target is not acceptable, IntegrityError (3) when no verified copy exists. Refused
    members and count mismatches are reported in the result (exit 1), the rest restored.
    ``stdout`` receives a command source's output for ``to == "-"``.
    """
    started = time.monotonic()
    host = host or ctx.host
    if from_ not in (None, "local", "remote"):
        raise UsageError(f"--from {from_!r}: use remote or local")
    cand = find_backup(ctx, what, host=host, at=at, from_=from_)
    result = RestoreResult(cand.id, cand.host, cand.backup_id.source, dry_run=dry_run)
    # A cheap plan first: a bad target fails before anything is downloaded or hashed.
    peeked = peek_manifest(ctx, cand, from_)
    target = plan_target(
        ctx, peeked.manifest, to, force=force, includes=includes, stdout=stdout
    )
    copy = choose_copy(ctx, cand, from_, peeked)
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
        if manifest.level > 0:
            # An incremental: its chain, link by link, into one staging dir.
            other = cand.remote if copy.where == "local" else cand.local
            _run_chain(ctx, cand, copy, other, target, includes, force, from_, result)
        elif dry_run:
            _dry_run(ctx, copy, target, includes, force, result)
        else:
            _run(ctx, copy, target, includes, result)
    except OSError as exc:
        raise _os_error(exc, result.target) from exc
    finally:
        result.seconds = time.monotonic() - started
    if not dry_run and not result.ok:
        LOG.error(
            "restore of %s is incomplete (exit %d): see the summary",
            cand.id,
            result.exit_code,
            extra=REPORTED,  # the summary follows
        )
    return result


def _os_error(exc: OSError, target: str) -> CloudBackupError:
    if exc.errno == errno.ENOSPC:
        return CloudBackupError(
            f"no space left on the device while restoring into {target}",
            "free space or restore elsewhere (--to); nothing was put in place",
        )
    # A name through a descriptor held (/proc/<pid>/fd/N/...) means nothing to people.
    filename = exc.filename if exc.filename and not str(exc.filename).startswith("/proc/") else None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CloudBackupError(
            f"cannot write {filename or target}: {exc.strerror}",
            "run as a user who may write there",
        )
    return CloudBackupError(
        f"restore into {target} failed: {exc.strerror or exc}"
        + (f" ({filename})" if filename else "")
    )


def _archive_path(ctx: Context, copy: Copy, ws: Workspace) -> Path:
    if copy.local_path is not None:
        return copy.local_path
    manifest = copy.manifest
    assert copy.ref.archive_key
    dest = ws.download_path()
    progress = ctx.progress(f"download {manifest.id}", manifest.size)
    assert ctx.remote is not None
    try:
        fetch_archive(
            ctx.remote,
            copy.ref.archive_key,
            dest,
            size=manifest.size,
            sha256=manifest.sha256,
            progress=progress,
        )
    finally:
        getattr(progress, "close", lambda: None)()
    LOG.info(
        "downloaded and verified %s (%d bytes, sha256 matches)", manifest.archive, manifest.size
    )
    return dest


def _run(
    ctx: Context,
    copy: Copy,
    target: Target,
    includes: Sequence[str],
    result: RestoreResult,
) -> None:
    """Open the copy (a verified local archive, or a download verified on the way) →
    decompress → extract into the staging directory → count → install."""
    manifest = copy.manifest
    target.ready()
    with Workspace(target.workdir, target.staging_name) as ws:
        archive = _archive_path(ctx, copy, ws)
        # Held open from here on: extracted into, checked, counted and installed through
        # its descriptor, never by its name (see targets.Staging).
        staging = ws.staging(private=target.private_staging)
        progress = ctx.progress(f"restore {manifest.id}", manifest.uncompressed_bytes)
        try:
            extracted = _extract_file(
                archive, manifest.compression, staging.fd, includes=includes, progress=progress
            )
        finally:
            getattr(progress, "close", lambda: None)()
        if copy.local_path is None:
            Path(archive).unlink(missing_ok=True)  # free the space before anything else
        members = target.members(staging, manifest, copy.ref.source)
        result.refused = list(extracted.refused)
        result.warnings += extracted.warnings
        on_disk = tally_tree(staging.fd)
        if includes:
            expected = (
                extracted.files + extracted.symlinks + extracted.hardlinks,
                extracted.bytes,
            )
        else:
            expected = (manifest.file_count, manifest.uncompressed_bytes)
        result.files, result.bytes = on_disk.files, on_disk.bytes
        if on_disk.files == 0 and on_disk.dirs == 0:
            result.outcome = Outcome.FAILED
            result.detail = (
                f"nothing restored: --include {' '.join(includes)} matched no member"
                if includes
                else "nothing restored: the archive holds no member that could be restored"
            )
            if result.refused:
                result.detail += f"; {len(result.refused)} member(s) refused"
            return
        target.install(ctx, staging, members, result)
        _conclude(result, on_disk, expected=expected, includes=includes)


# Long: the chain's links found, checked and applied in order, then counted and installed
# exactly as one archive is (see _run).
def _run_chain(
    ctx: Context,
    cand: Candidate,
    copy: Copy,
    other: BackupRef | None,
    target: Target,
    includes: Sequence[str],
    force: bool,
    from_: str | None,
    result: RestoreResult,
) -> None:
    """Restore the chain ``copy`` (an incremental) heads: every link verified, each path
    from the link the final index names (cloudbackup.restore.chain)."""
    manifest = copy.manifest
    source = copy.ref.source
    links = [chains.Link(c) for c in chains.chain_candidates(ctx, cand, from_)]
    for link in links[:-1]:
        link.copy = chains.choose_link(ctx, link.cand, from_)
    links[-1].copy = copy
    chains.check_links(links)
    index = chains.final_index(ctx, copy, other)
    if includes:
        files, size = chains.index_totals(index, source, PathMatcher(includes).matches)
    else:
        files, size = chains.expected_totals(manifest)
    result.expected_files, result.expected_bytes = files, size
    shown = f"{len(links)}-link chain from {links[0].cand.id}"
    if result.dry_run:
        result.ok = files > 0 or not includes
        if not result.ok:
            result.outcome = Outcome.FAILED
        result.files, result.bytes = files, size
        what = _counts(files, size) + (f" (--include {' '.join(includes)})" if includes else "")
        result.detail = (
            f"would restore {what} of {manifest.id} ({shown}) from {copy.where} into "
            f"{result.target}{target.dry_run_note(force)} (index)"
        )
        return
    target.ready()
    with Workspace(target.workdir, target.staging_name) as ws:
        staging = ws.staging(private=target.private_staging)
        for link in links:
            assert link.copy is not None
            archive = _archive_path(ctx, link.copy, ws)
            progress = ctx.progress(f"restore {link.cand.id}", link.copy.manifest.uncompressed_bytes)
            try:
                extracted = _extract_file(
                    archive,
                    link.copy.manifest.compression,
                    staging.fd,
                    includes=includes,
                    progress=progress,
                    select=chains.membership(index, link.cand.id),
                )
            finally:
                getattr(progress, "close", lambda: None)()
                if link.copy.local_path is None:
                    Path(archive).unlink(missing_ok=True)
            result.refused += extracted.refused
            result.warnings += extracted.warnings
            LOG.info("applied %s (%s)", link.cand.id, link.copy.where)
        members = target.members(staging, manifest, source)
        on_disk = tally_tree(staging.fd)
        result.files, result.bytes = on_disk.files, on_disk.bytes
        if on_disk.files == 0 and on_disk.dirs == 0:
            result.outcome = Outcome.FAILED
            result.detail = "nothing restored" + (
                f": --include {' '.join(includes)} matched no member" if includes else ""
            )
            return
        target.install(ctx, staging, members, result)
        _conclude(result, on_disk, expected=(files, size), includes=includes)
        result.detail += f" ({shown})"


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
        result.outcome = Outcome.FAILED
        result.detail = (
            f"{counts}{where}; {len(result.refused)} member(s) refused (not restored){aside}"
        )
        return
    basis = "the selection (--include)" if includes else "the manifest"
    if (on_disk.files, on_disk.bytes) == (files, size):
        result.ok = True
        result.detail = f"{counts}{where}, as {basis} says{aside}"
    else:
        result.outcome = Outcome.FAILED
        result.detail = (
            f"{counts}{where}, but {basis} says {_counts(files, size)} — "
            f"check the restored data{aside}"
        )


def _dry_run(
    ctx: Context,
    copy: Copy,
    target: Target,
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
            result.outcome = Outcome.FAILED
    else:
        result.files, result.bytes = manifest.file_count, manifest.uncompressed_bytes
    what = _counts(result.files, result.bytes)
    if includes:
        what += f" (--include {' '.join(includes)})"
    action = f"would restore {what} of {copy.manifest.id} from {copy.where} into {result.target}"
    action += target.dry_run_note(force)
    result.detail = f"{action} ({basis})"
    if result.refused:
        result.detail += f"; {len(result.refused)} member(s) would be refused"
        result.outcome = Outcome.FAILED


def _dry_walk(ctx: Context, copy: Copy, includes: Sequence[str]) -> ExtractResult:
    manifest = copy.manifest
    if copy.local_path is not None:
        return _extract_file(
            copy.local_path, manifest.compression, Path("."), includes=includes, dry_run=True
        )
    # Remote: stream the object (no temp file), hash it on the way, check it at the end.
    assert copy.ref.archive_key and ctx.remote is not None
    with ctx.remote.open(copy.ref.archive_key, size=manifest.size) as body:
        hashing = HashingReader(body)
        stream = open_decompressed(hashing, manifest.compression)
        try:
            walked = extract(stream, Path("."), include=includes, dry_run=True)
        except DECOMPRESS_ERRORS as exc:
            raise IntegrityError(f"cannot decompress {manifest.archive}: {exc}") from None
        hashing.drain()
    if hashing.count != manifest.size or hashing.sha.hexdigest() != manifest.sha256:
        raise IntegrityError(
            f"the remote {manifest.archive} fails its checksum (sha256 {hashing.sha.hexdigest()}, "
            f"{hashing.count} bytes)",
            _INTEGRITY_HINT,
        )
    return walked
