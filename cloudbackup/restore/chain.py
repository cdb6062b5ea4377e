"""Restore of an incremental backup: its chain, applied link by link into one staging dir.

SPEC "Incremental archives": the links (the full the chain starts from, then each
incremental up to the one asked for) are found by LIST alone; each is taken from local when
its archive is there, else from the bucket, and streamed through the archive pipeline
(``restore.apply.stream_archive``: read once, hashed while it is applied) into the same
staging directory. Every path is taken from the link its record in
the final index names (``in``): nothing is overwritten and nothing deleted afterwards, so a
path deleted along the chain is simply never extracted. A link that is missing, or whose
manifest does not name the link before it as its parent, or whose bytes fail their checksum,
is an IntegrityError naming it: the staging dir is discarded and nothing reaches the target.

The final index is the local one when it matches the head's manifest, else the bucket's
(for a restore only: an index from the bucket is never a backup's parent), checked against
the head's manifest digest before it is used; an encrypted backup's index is ciphertext
like its archive and goes through the decryption stage with the identity. Membership is a streaming merge-join of each
link's members (in walk order) with the final index (in the same order): memory stays flat.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, IntegrityError
from cloudbackup.core.model import BackupRef, Manifest
from cloudbackup.restore.select import Candidate, Copy, _listings, choose_copy, peek_manifest
from cloudbackup.stream.age import Decryption, decryption_for, keyring_at
from cloudbackup.stream.index import IndexInvalid, lines_with, parse_path, read_index

LOG = logging.getLogger("cloudbackup")
HINT = "restore another copy (--from local/remote) or an older backup (--at)"


@dataclass
class Link:
    """One archive of the chain: its candidate and the copy chosen (verified)."""

    cand: Candidate
    copy: Copy | None = None


def chain_candidates(ctx: Context, head: Candidate, from_: str | None) -> list[Candidate]:
    """The candidates of ``head``'s chain, base first, by LIST (local and remote merged):
    the backups before it down to the nearest full. IntegrityError when no full is found."""
    local, remote = _listings(ctx, from_)
    merged: dict[str, Candidate] = {}
    incremental: dict[str, bool] = {}
    for listing in (local, remote):
        for ref in listing.for_source(head.host, head.backup_id.source):
            cand = merged.setdefault(ref.id, Candidate(ref.backup_id, ref.host))
            if ref.where == "local":
                cand.local = ref
            else:
                cand.remote = ref
            incremental[ref.id] = incremental.get(ref.id, False) or ref.incremental
    ordered = sorted(merged.values(), key=lambda c: (c.backup_id.created_at, c.backup_id.seq))
    position = next(i for i, c in enumerate(ordered) if c.id == head.id)
    links = [ordered[position]]
    while incremental[links[0].id]:
        if position == 0:
            raise IntegrityError(
                f"{head.id}: the chain is broken: no full backup before {links[0].id} "
                "(local or remote)",
                HINT,
            )
        position -= 1
        links.insert(0, ordered[position])
    return links


def check_links(links: Sequence[Link]) -> None:
    """Each incremental's manifest names the link before it as its parent, and the chain's
    full as its base: a link missing in the middle is named."""
    base = links[0].cand.id
    for previous, link in zip(links, links[1:], strict=False):
        assert link.copy is not None
        manifest = link.copy.manifest
        if manifest.level == 0:
            raise IntegrityError(f"{link.cand.id}: listed as incremental, its manifest is full")
        if manifest.parent != previous.cand.id:
            raise IntegrityError(
                f"{link.cand.id}: its parent {manifest.parent} is missing "
                f"(the backup before it is {previous.cand.id})",
                HINT,
            )
        if manifest.base != base:
            raise IntegrityError(f"{link.cand.id}: its base {manifest.base} is missing", HINT)


def choose_link(ctx: Context, cand: Candidate, from_: str | None) -> Copy:
    """The copy of one link (local when it is there, else remote; verified as it is
    streamed); an error names the link."""
    try:
        return choose_copy(ctx, cand, from_, peek_manifest(ctx, cand, from_))
    except CloudBackupError as exc:
        raise IntegrityError(f"link {cand.id} of the chain: {exc.message}", HINT) from None


def final_index(ctx: Context, head: Copy, other: BackupRef | None) -> bytes:
    """The head's index (compressed), checked against its manifest: the local one when it
    matches, else the bucket's (restore only: never a parent)."""
    facts = head.manifest.index
    if facts is None:
        raise IntegrityError(f"{head.manifest.id}: its manifest records no index", HINT)
    decryption = index_decryption(ctx, head.manifest)
    problems = []
    for ref in (head.ref, other):
        if ref is None or ref.index_key is None:
            continue
        try:
            if ref.where == "local":
                data = ctx.local.get_bytes(ref.index_key)
            else:
                assert ctx.remote is not None
                data = ctx.remote.get_bytes(ref.index_key)
        except (OSError, CloudBackupError) as exc:
            problems.append(f"{ref.where}: {getattr(exc, 'strerror', None) or exc}")
            continue
        if len(data) == facts.size and hashlib.sha256(data).hexdigest() == facts.sha256:
            return data if decryption is None else decrypted(decryption, data)
        problems.append(f"the {ref.where} index differs from its manifest")
    raise IntegrityError(
        f"{head.manifest.id}: no usable index ({'; '.join(problems) or 'none listed'})", HINT
    )


def index_decryption(ctx: Context, manifest: Manifest) -> Decryption | None:
    """How to open an encrypted backup's index (the one uploaded is ciphertext, like its
    archive): None when it is not encrypted; the archive's exit-2 ConfigError, before
    anything is read, without an identity of its recipients."""
    if manifest.index is None or not manifest.encrypted:
        return None
    keyring = keyring_at(ctx.settings.age_identity_file)
    return decryption_for(keyring, manifest.recipients, manifest.index.name, "restore")


def decrypted(decryption: Decryption, data: bytes) -> bytes:
    """The plaintext (still compressed) of an encrypted index already checked against its
    manifest; age's authentication covers it (IntegrityError when tampered)."""
    reader = decryption.open(io.BytesIO(data))
    chunks = []
    try:
        while chunk := reader.read(1 << 20):
            chunks.append(chunk)
    finally:
        reader.close()
    return b"".join(chunks)


class Membership:
    """Whether a member of a link is the copy the final index names: a merge-join with the
    paths of the final index's records that name this link (``paths``), asked in walk
    order (an out-of-order question is answered no, and the restore's counts then say
    something is missing). Walk order compares paths component by component; so does a
    plain comparison of the paths with ``/`` made NUL (below every character a name can
    hold), which is what is compared: one string per path, no list of its components."""

    def __init__(self, paths: Iterator[str]) -> None:
        self.paths = paths
        self.current: str | None = None
        self.key = ""
        self.done = False
        self.advance()

    def advance(self) -> None:
        try:
            self.current = next(self.paths)
            self.key = self.current.replace("/", "\0")
        except StopIteration:
            self.current, self.done = None, True
        except IndexInvalid as exc:
            raise IntegrityError(f"the final index is invalid: {exc}", HINT) from None

    def __call__(self, path: str) -> bool:
        key = path.replace("/", "\0")
        while not self.done and self.key < key:
            self.advance()
        return self.current is not None and self.key == key


def membership(index: bytes, owner: str) -> Callable[[str], bool]:
    """The merge-join for link ``owner``: only the records that name it are read (a JSON
    string holds no unescaped quote, so ``"in":"<owner>"`` is found only as the field)."""
    needle = f'"in":{json.dumps(owner)}'.encode()

    def paths() -> Iterator[str]:
        for line in lines_with(io.BytesIO(index), needle):
            yield parse_path(line)

    return Membership(paths())


def index_totals(
    index: bytes, source: str, include: Callable[[str], bool] | None
) -> tuple[int, int]:
    """Files and bytes the final index lists (those ``include`` matches)."""
    files = size = 0
    try:
        for record in read_index(io.BytesIO(index), source):
            if record.type == "dir" or (include is not None and not include(record.path)):
                continue
            files += 1
            size += record.size if record.type == "file" else 0
    except IndexInvalid as exc:
        raise IntegrityError(f"the final index is invalid: {exc}", HINT) from None
    return files, size


def expected_totals(manifest: Manifest) -> tuple[int, int]:
    return manifest.total_files, manifest.total_bytes
