"""``verify``: local copies re-hashed against their manifests; remote copies compared
(HEAD: size, metadata and S3 checksum) without downloading, or streamed and walked with
``--deep`` (decrypted on the way when the archive is encrypted: that needs the identity)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, ConfigError, IntegrityError
from cloudbackup.core.model import (
    BackupRef,
    Listing,
    Manifest,
    chain_of,
    parse_manifest_metadata,
)
from cloudbackup.core.outcome import Outcome
from cloudbackup.core.words import plural
from cloudbackup.fs.files import open_regular
from cloudbackup.storage.base import VerifyMethod, head_problems
from cloudbackup.stream.age import Decryption, decryption_for, keyring_at
from cloudbackup.stream.hashing import sha256_file


def require_identity(ctx: Context, refs: Sequence[BackupRef]) -> None:
    """``--deep`` of encrypted archives (their names end in .age) without an identity file:
    ConfigError (exit 2) before any archive is read."""
    encrypted = [ref for ref in refs if ref.encrypted]
    if encrypted and ctx.settings.age_identity_file is None:
        raise ConfigError(
            f"{len(encrypted)} of the backups to verify are encrypted (e.g. {encrypted[0].id}): "
            "verify --deep needs CLOUDBACKUP_AGE_IDENTITY_FILE",
            "set it where the identity is, or verify without --deep (no key needed)",
        )


def _decryption(ctx: Context, manifest: Manifest) -> Decryption | None:
    """How ``--deep`` opens this archive; ConfigError (exit 2) when it is encrypted and
    there is no identity of its recipients."""
    if not manifest.encrypted:
        return None
    keyring = keyring_at(ctx.settings.age_identity_file)
    return decryption_for(keyring, manifest.recipients, manifest.archive, "verify --deep")


@dataclass
class VerifyResult:
    """One copy checked. Until it is found to match, a copy counts as differing from its
    manifest (INTEGRITY); one that could not be checked at all is FAILED."""

    id: str
    where: str
    detail: str = ""
    host: str = ""
    source: str = ""
    outcome: Outcome = Outcome.INTEGRITY

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "where": self.where, "ok": self.ok, "detail": self.detail}


def select_refs(
    refs: Iterable[BackupRef], ids: Sequence[str], source: str | None, host: str | None
) -> list[BackupRef]:
    chosen = []
    for ref in refs:
        if host and ref.host != host:
            continue
        if source and ref.source != source:
            continue
        if ids and ref.id not in ids:
            continue
        chosen.append(ref)
    return chosen


def verify_local_ref(ctx: Context, ref: BackupRef, *, deep: bool = False) -> VerifyResult:
    from cloudbackup.stream.pipeline import walk_stored

    result = VerifyResult(ref.id, "local", "", ref.host, ref.source)
    try:
        manifest = ctx.local_catalog.manifest(ref)
        assert ref.archive_key
        path = ctx.local.path(ref.archive_key)
        progress = ctx.progress(f"verify {ref.id}", manifest.size)
        if deep:
            from cloudbackup.stream.hashing import HashingReader

            decryption = _decryption(ctx, manifest)
            with open_regular(path) as raw:
                hashing = HashingReader(raw, progress)
                walked = walk_stored(hashing, manifest.compression, decryption)
                hashing.drain()
                digest, size = hashing.sha.hexdigest(), hashing.count
        else:
            digest, size = sha256_file(path, progress)
        getattr(progress, "close", lambda: None)()
        if size != manifest.size:
            result.detail = f"size {size} differs from the manifest's {manifest.size}"
        elif digest != manifest.sha256:
            result.detail = f"sha256 {digest} differs from the manifest's {manifest.sha256}"
        elif deep and (walked.file_count, walked.uncompressed_bytes) != (
            manifest.file_count,
            manifest.uncompressed_bytes,
        ):
            result.detail = (
                f"archive holds {plural(walked.file_count, 'file')} / {walked.uncompressed_bytes} bytes, "
                f"the manifest says {manifest.file_count} / {manifest.uncompressed_bytes}"
            )
        else:
            result.outcome = Outcome.OK
            result.detail = f"sha256 and size match ({size} bytes)" + (
                f"; {plural(walked.file_count, 'file')}, {walked.uncompressed_bytes} bytes walked"
                if deep
                else ""
            )
        if result.ok:
            listing = ctx.local_catalog.listing(ref.source, host=ref.host)
            _check_chain(listing, ref, manifest, result)
        if result.ok and deep and manifest.index is not None and ref.index_key:
            with open_regular(ctx.local.path(ref.index_key)) as raw:
                _check_index(raw, manifest, result)
    except ConfigError:  # an encrypted archive and no identity of its recipients: exit 2
        raise
    except CloudBackupError as exc:  # IntegrityError, or a manifest that cannot be read
        result.detail = str(exc)
        result.outcome = exc.outcome if exc.outcome is Outcome.INTEGRITY else Outcome.FAILED
    except OSError as exc:
        result.detail = f"cannot read: {exc.strerror}"
        result.outcome = Outcome.FAILED
    return result


def _check_chain(
    listing: Listing, ref: BackupRef, manifest: Manifest | None, result: VerifyResult
) -> None:
    """An incremental's ancestors all exist on the same side (LIST only): the backups
    before it down to a full; its manifest's parent (when read) is the one listed before it."""
    if not ref.incremental:
        return
    refs = listing.for_source(ref.host, ref.source)
    found = next((r for r in refs if r.id == ref.id), None)
    links = chain_of(refs, found) if found is not None else None
    problem = None
    if links is None:
        problem = "no full backup before it"
    elif manifest is not None and manifest.parent != links[-2].id:
        problem = f"its parent {manifest.parent} is missing (the backup before it is {links[-2].id})"
    elif manifest is not None and manifest.base != links[0].id:
        problem = f"its base {manifest.base} is missing"
    if problem is not None:
        result.outcome = Outcome.INTEGRITY
        result.detail = f"its chain is broken ({result.where}): {problem}"
        return
    assert links is not None
    result.detail += f"; chain of {len(links)} link(s) from {links[0].id} present"


def _check_index(raw: Any, manifest: Manifest, result: VerifyResult) -> None:
    """``--deep``: the index's bytes are the ones its manifest records."""
    assert manifest.index is not None
    digest = hashlib.sha256()
    size = 0
    while chunk := raw.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    if (size, digest.hexdigest()) != (manifest.index.size, manifest.index.sha256):
        result.outcome = Outcome.INTEGRITY
        result.detail = f"the index {manifest.index.name} differs from its manifest"
        return
    result.detail += "; index matches"


def verify_remote_ref(ctx: Context, ref: BackupRef, *, deep: bool = False) -> VerifyResult:
    """HEAD the manifest and the archive (no GET); ``deep`` streams and walks the archive.
    A store verified by re-hashing (a directory destination) reads the archive back."""
    result = VerifyResult(ref.id, "remote", "", ref.host, ref.source)
    assert ctx.remote is not None
    try:
        assert ref.manifest_key and ref.archive_key
        if ctx.remote.verify_method is VerifyMethod.REHASH:
            _rehash(ctx, ref, deep, result)
        else:
            _compare_heads(ctx, ref, deep, result)
        if result.ok:
            _check_chain(ctx.remote_catalog.listing(all_hosts=False), ref, None, result)
        if result.ok and deep and ref.index_key:
            manifest = ctx.remote_catalog.manifest(ref)
            if manifest.index is not None:
                with ctx.remote.open(ref.index_key, size=manifest.index.size) as body:
                    _check_index(body, manifest, result)
    except IntegrityError as exc:
        result.detail = str(exc)
    except ConfigError:  # an encrypted archive and no identity of its recipients: exit 2
        raise
    except CloudBackupError as exc:
        result.detail = f"cannot verify: {exc}"
        result.outcome = Outcome.FAILED
    return result


def _compare_heads(ctx: Context, ref: BackupRef, deep: bool, result: VerifyResult) -> None:
    assert ctx.remote is not None and ref.manifest_key and ref.archive_key
    mhead = ctx.remote.head(ref.manifest_key)
    if mhead is None:
        result.detail = "manifest object is missing"
        return
    manifest: Manifest | None = None
    facts = parse_manifest_metadata(mhead.metadata, ref)
    if facts is None or deep:
        manifest = ctx.remote_catalog.manifest(ref)
    if facts is None:
        assert manifest is not None
        upload = manifest.upload
        sha256, size = manifest.sha256, manifest.size
        checksum = upload.checksum if upload else None
    else:
        sha256, size, checksum = facts.sha256, facts.size, facts.checksum
        if manifest is not None and (manifest.sha256, manifest.size) != (sha256, size):
            result.detail = "the manifest object's metadata disagrees with its body"
            return
    head = ctx.remote.head(ref.archive_key)
    if head is None:
        result.detail = "archive object is missing"
        return
    problems = head_problems(head, size, sha256, checksum)
    if problems:
        result.detail = "; ".join(problems)
        return
    detail = (
        f"size, sha256 metadata and S3 checksum match ({size} bytes)"
        if "sha256" in head.metadata
        else f"size and S3 checksum match ({size} bytes; streamed: sha256 in the manifest)"
    )
    if deep:
        assert manifest is not None
        read = _read_back(ctx, ref, manifest, deep=True, result=result)
        if read is None:
            return
        detail = f"streamed and re-hashed {read}"
    result.outcome = Outcome.OK
    result.detail = detail


def _rehash(ctx: Context, ref: BackupRef, deep: bool, result: VerifyResult) -> None:
    """Read the archive back and hash it against its manifest (and walk it with ``deep``)."""
    assert ctx.remote is not None and ref.archive_key
    manifest = ctx.remote_catalog.manifest(ref)
    head = ctx.remote.head(ref.archive_key)
    if head is None:
        result.detail = "archive object is missing"
        return
    if head.size != manifest.size:
        result.detail = f"size {head.size} ≠ {manifest.size}"
        return
    read = _read_back(ctx, ref, manifest, deep=deep, result=result)
    if read is not None:
        result.outcome = Outcome.OK
        result.detail = f"re-hashed {read}: sha256 and size match"


def _read_back(
    ctx: Context, ref: BackupRef, manifest: Manifest, *, deep: bool, result: VerifyResult
) -> str | None:
    """Stream the archive, hash it (and walk it with ``deep``); what was read, in words, or
    None with ``result.detail`` saying what differs. A corrupt archive whose bytes match
    the manifest raises IntegrityError."""
    from cloudbackup.stream.hashing import HashingReader
    from cloudbackup.stream.pipeline import walk_stored

    assert ctx.remote is not None and ref.archive_key
    size, sha256 = manifest.size, manifest.sha256
    progress = ctx.progress(f"verify {ref.id}", size)
    corrupt: IntegrityError | None = None
    walked = None
    decryption = _decryption(ctx, manifest) if deep else None
    with ctx.remote.open(ref.archive_key, size=size) as body:
        hashing = HashingReader(body, progress)
        if deep:
            try:
                walked = walk_stored(hashing, manifest.compression, decryption)
            except IntegrityError as exc:
                corrupt = exc  # report the checksum first: it says the bytes changed
        hashing.drain()
    getattr(progress, "close", lambda: None)()
    if hashing.count != size or hashing.sha.hexdigest() != sha256:
        result.detail = (
            f"downloaded sha256 {hashing.sha.hexdigest()} ({hashing.count} bytes) ≠ manifest {sha256}"
        )
        return None
    if corrupt is not None:
        raise corrupt
    if walked is None:
        return f"{size} bytes"
    if (walked.file_count, walked.uncompressed_bytes) != (
        manifest.file_count,
        manifest.uncompressed_bytes,
    ):
        result.detail = (
            f"archive holds {plural(walked.file_count, 'file')} / {walked.uncompressed_bytes} bytes, "
            f"manifest says {manifest.file_count} / {manifest.uncompressed_bytes}"
        )
        return None
    return (
        f"{size} bytes; {plural(walked.file_count, 'file')}, {walked.uncompressed_bytes} bytes walked"
    )
