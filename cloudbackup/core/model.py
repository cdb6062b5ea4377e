"""Backup ids, object names and manifests: the one place that formats and parses them."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudbackup.core.errors import IntegrityError

MANIFEST_FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_TS_FORMAT = "%Y%m%dT%H%M%SZ"
_ID_RE = re.compile(
    r"^(?P<source>[A-Za-z0-9._-]+?)-(?P<ts>\d{8}T\d{6}Z)(?:-(?P<seq>[2-9]|[1-9]\d+))?$"
)

COMPRESSION_EXT: dict[str, str] = {
    "zstd": ".tar.zst",
    "gzip": ".tar.gz",
    "xz": ".tar.xz",
    "bzip2": ".tar.bz2",
    "none": ".tar",
}
MANIFEST_SUFFIX = ".manifest.json"
#: An incremental archive's name carries it before the tar extension: ``<id>.incr.tar.zst``.
INCR_MARK = ".incr"
#: The per-backup index of a directory or glob source: ``<id>.index.zst``.
INDEX_SUFFIX = ".index.zst"
#: Appended to archive and index names when they are encrypted.
AGE_SUFFIX = ".age"
UPLOAD_SUFFIX = ".upload.json"
PARTIAL_SUFFIX = ".partial"
ENCRYPTION = "age"
#: An age X25519 recipient: ``age1`` and 58 bech32 characters (checked fully by pyrage
#: where recipients are configured; here only the shape of what a manifest records).
RECIPIENT_RE = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
HOST_CLAIM = ".host-id"


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name)) and name not in {".", ".."}


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, to the second."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, order=True)
class BackupId:
    """``<source>-<YYYYmmddTHHMMSSZ>`` with ``-N`` for a second backup in the same second."""

    source: str
    created_at: datetime
    seq: int = 1

    def __post_init__(self) -> None:
        if not valid_name(self.source):
            raise ValueError(f"invalid source name {self.source!r}")

    @classmethod
    def new(cls, source: str, moment: datetime, seq: int = 1) -> BackupId:
        return cls(source, moment.astimezone(UTC).replace(microsecond=0), seq)

    def __str__(self) -> str:
        text = f"{self.source}-{self.created_at.strftime(_TS_FORMAT)}"
        return text if self.seq == 1 else f"{text}-{self.seq}"

    @classmethod
    def parse(cls, text: str) -> BackupId:
        match = _ID_RE.fullmatch(text)
        if not match:
            raise ValueError(f"not a backup id: {text!r}")
        moment = datetime.strptime(match["ts"], _TS_FORMAT).replace(tzinfo=UTC)
        return cls(match["source"], moment, int(match["seq"] or 1))

    def next(self) -> BackupId:
        return BackupId(self.source, self.created_at, self.seq + 1)


@dataclass(frozen=True)
class ParsedName:
    """What an object name says about itself."""

    host: str
    source: str
    backup_id: BackupId
    kind: str  # "archive" | "manifest" | "upload" | "partial" | "index"
    compression: str | None = None
    #: An incremental archive (``<id>.incr.tar.zst``): names carry the chain.
    incremental: bool = False
    #: ``.age`` appended (an encrypted archive or index).
    encrypted: bool = False


def archive_name(
    backup_id: BackupId, compression: str, *, incremental: bool = False, encrypted: bool = False
) -> str:
    """``<id>.tar.zst``; ``<id>.incr.tar.zst`` for an incremental; ``.age`` when encrypted."""
    mark = INCR_MARK if incremental else ""
    return f"{backup_id}{mark}{COMPRESSION_EXT[compression]}{AGE_SUFFIX if encrypted else ''}"


def archive_names(backup_id: BackupId) -> set[str]:
    """Every name an archive of this backup may have (any compression, full or incremental,
    encrypted or not)."""
    return {
        archive_name(backup_id, c, incremental=i, encrypted=e)
        for c in COMPRESSION_EXT
        for i in (False, True)
        for e in (False, True)
    }


def index_name(backup_id: BackupId, *, encrypted: bool = False) -> str:
    """``<id>.index.zst`` (``.age`` appended when encrypted)."""
    return f"{backup_id}{INDEX_SUFFIX}{AGE_SUFFIX if encrypted else ''}"


def manifest_name(backup_id: BackupId) -> str:
    return f"{backup_id}{MANIFEST_SUFFIX}"


def upload_name(backup_id: BackupId) -> str:
    return f"{backup_id}{UPLOAD_SUFFIX}"


def key_for(prefix: str, host: str, backup_id: BackupId, name: str) -> str:
    """``<prefix>/<host>/<source>/<name>``; an empty prefix drops its slash."""
    parts = [p for p in prefix.strip("/").split("/") if p] + [host, backup_id.source, name]
    return "/".join(parts)


def host_claim_key(prefix: str, host: str) -> str:
    """``<prefix>/<host>/.host-id``: the key of a host's claim (see SPEC "Host")."""
    return "/".join([p for p in prefix.strip("/").split("/") if p] + [host, HOST_CLAIM])


def name_for(
    prefix: str,
    host: str,
    backup_id: BackupId,
    kind: str,
    compression: str = "zstd",
    *,
    encrypted: bool = False,
) -> str:
    if kind == "archive":
        name = archive_name(backup_id, compression, encrypted=encrypted)
    elif kind == "manifest":
        name = manifest_name(backup_id)
    elif kind == "upload":
        name = upload_name(backup_id)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return key_for(prefix, host, backup_id, name)


def parse_name(key: str, prefix: str = "") -> ParsedName | None:
    """Exact inverse of :func:`name_for`; ``None`` for keys that are not backups."""
    rest = key
    clean = prefix.strip("/")
    if clean:
        if not key.startswith(clean + "/"):
            return None
        rest = key[len(clean) + 1 :]
    parts = rest.split("/")
    if len(parts) != 3:
        return None
    host, source, filename = parts
    if not (valid_name(host) and valid_name(source)):
        return None
    kind = None
    compression = None
    incremental = encrypted = False
    stem = filename
    if filename.endswith(PARTIAL_SUFFIX):
        kind, stem = "partial", filename[: -len(PARTIAL_SUFFIX)]
    for suffix, k in ((MANIFEST_SUFFIX, "manifest"), (UPLOAD_SUFFIX, "upload")):
        if kind is None and stem.endswith(suffix):
            kind, stem = k, stem[: -len(suffix)]
    if kind in (None, "partial"):
        if stem.endswith(AGE_SUFFIX):
            encrypted, stem = True, stem[: -len(AGE_SUFFIX)]
        if stem.endswith(INDEX_SUFFIX):
            stem = stem[: -len(INDEX_SUFFIX)]
            kind = kind or "index"
        else:
            # Longest extension first: ".tar.zst" before ".tar".
            for comp, ext in sorted(COMPRESSION_EXT.items(), key=lambda kv: -len(kv[1])):
                if stem.endswith(ext):
                    compression, stem = comp, stem[: -len(ext)]
                    kind = kind or "archive"
                    break
            else:
                if kind is None:
                    return None
            if stem.endswith(INCR_MARK):
                incremental, stem = True, stem[: -len(INCR_MARK)]
    try:
        backup_id = BackupId.parse(stem)
    except ValueError:
        return None
    if backup_id.source != source:
        return None
    return ParsedName(
        host, source, backup_id, kind or "archive", compression, incremental, encrypted
    )


@dataclass
class UploadRecord:
    """What an upload left in S3, so any machine can verify it without downloading."""

    key: str
    part_size: int
    part_count: int
    checksum_algorithm: str | None
    checksum: str | None  # composite "<b64>-N" for multipart, plain "<b64>" for one PUT
    etag: str | None = None
    upload_id: str | None = None  # set while a multipart upload is in progress
    uploaded_at: str | None = None
    verified_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IndexFacts:
    """The index object of a backup: its name (``<id>.index.zst``), size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The immutable record of one archive; written after the archive is durable.

    Built by the backup that wrote the archive, or by :func:`parse_manifest` from bytes
    read back (never trusted as they are)."""

    id: str
    host: str
    source: str
    kind: str
    spec: str  # redacted
    created_at: str
    archive: str
    size: int
    sha256: str
    compression: str
    compression_level: int | None
    file_count: int
    uncompressed_bytes: int
    machine_id: str
    tool_version: str
    warnings: list[str] = field(default_factory=list)
    root_device: int | None = None
    root: str | None = None  # the real path a directory source resolved to
    members: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT
    upload: UploadRecord | None = None
    #: "age" when the archive is encrypted, to ``recipients`` (public keys; no secret).
    encryption: str | None = None
    recipients: list[str] = field(default_factory=list)
    #: The chain (SPEC "Incremental archives"): 0 = full; the backup just before this one;
    #: the full this chain starts from (the backup itself for a full).
    level: int = 0
    parent: str | None = None
    base: str | None = None
    #: The index written in the same pass (directory and glob sources).
    index: IndexFacts | None = None
    #: Totals of the whole tree (an incremental's archive holds only what changed): what
    #: the shrink guard compares.
    tree_files: int | None = None
    tree_bytes: int | None = None
    #: When the walk of this backup started (ns since the epoch): the "racy clean" rule.
    walk_started_ns: int | None = None

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def incremental(self) -> bool:
        return self.level > 0

    @property
    def total_files(self) -> int:
        return self.file_count if self.tree_files is None else self.tree_files

    @property
    def total_bytes(self) -> int:
        return self.uncompressed_bytes if self.tree_bytes is None else self.tree_bytes

    @property
    def backup_id(self) -> BackupId:
        return BackupId.parse(self.id)

    @property
    def created(self) -> datetime:
        return parse_time(self.created_at)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.upload is None:
            data.pop("upload")
        if self.encryption is None:
            data.pop("encryption")
            data.pop("recipients")
        return data

    def to_json(self) -> bytes:
        # ASCII escapes keep non-UTF-8 names (surrogates) representable.
        return (
            json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"
        ).encode()


@dataclass
class BackupRef:
    """One backup as seen in a listing (no download needed: names carry source and time)."""

    host: str
    source: str
    backup_id: BackupId
    where: str  # "local" | "remote"
    archive_key: str | None = None
    archive_size: int | None = None
    manifest_key: str | None = None
    compression: str | None = None
    archive_mtime: datetime | None = None
    verified: bool = False
    manifest_size: int | None = None
    #: The name says ``.incr``: its parent is the backup just before it (LIST is enough).
    incremental: bool = False
    index_key: str | None = None
    index_size: int | None = None
    encrypted: bool = False
    #: An encrypted backup's plaintext index (``<id>.index.zst`` beside ``.index.zst.age``):
    #: kept in the local dir only, the parent of the next incremental.
    plain_index_key: str | None = None

    @property
    def level_name(self) -> str:
        return "incr" if self.incremental else "full"

    @property
    def id(self) -> str:
        return str(self.backup_id)

    @property
    def created_at(self) -> datetime:
        return self.backup_id.created_at


@dataclass
class Listing:
    """Backups found by one LIST: complete ones, orphan archives, upload records, claims."""

    refs: list[BackupRef] = field(default_factory=list)
    orphans: list[BackupRef] = field(default_factory=list)  # archive without manifest
    stray_manifests: list[BackupRef] = field(default_factory=list)  # manifest without archive
    upload_keys: dict[str, str] = field(default_factory=dict)  # backup id -> key
    partials: list[str] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)

    def for_source(self, host: str, source: str) -> list[BackupRef]:
        return [r for r in self.refs if r.host == host and r.source == source]

    def newest(self, host: str, source: str) -> BackupRef | None:
        refs = self.for_source(host, source)
        return max(refs, key=lambda r: (r.created_at, r.backup_id.seq)) if refs else None

    def find(self, backup_id: str, host: str | None = None) -> BackupRef | None:
        for ref in self.refs:
            if ref.id == backup_id and (host is None or ref.host == host):
                return ref
        return None

    def parent_of(self, ref: BackupRef) -> BackupRef | None:
        """The backup just before ``ref`` (same host and source, id order) in this listing."""
        before = [
            r
            for r in self.for_source(ref.host, ref.source)
            if (r.created_at, r.backup_id.seq) < (ref.created_at, ref.backup_id.seq)
        ]
        return before[-1] if before else None


def chain_of(refs: Sequence[Any], ref: Any) -> list[Any] | None:
    """The chain ``ref`` needs, base first, among ``refs`` (one host and source, in id order,
    as a listing holds them): the backups from the nearest full before it up to it. None when
    a link is missing there (the first backup of ``refs`` is an incremental)."""
    position = next(i for i, r in enumerate(refs) if r is ref)
    start = position
    while getattr(refs[start], "incremental", False):
        if start == 0:
            return None
        start -= 1
    return list(refs[start : position + 1])


def build_listing(objects: Any, *, prefix: str, where: str) -> Listing:
    """Group LIST entries (objects with ``key``, ``size``, ``modified``) into backups."""
    archives: dict[tuple[str, str], Any] = {}
    manifests: dict[tuple[str, str], Any] = {}
    indexes: dict[tuple[str, str], Any] = {}
    plain_indexes: dict[tuple[str, str], Any] = {}
    parsed: dict[tuple[str, str], ParsedName] = {}
    listing = Listing()
    clean = prefix.strip("/")
    for obj in objects:
        name = parse_name(obj.key, clean)
        if name is None:
            rest = obj.key[len(clean) + 1 :] if clean else obj.key
            parts = rest.split("/")
            if len(parts) == 2 and parts[1] == HOST_CLAIM:
                listing.hosts.add(parts[0])
            continue
        listing.hosts.add(name.host)
        ident = (name.host, str(name.backup_id))
        if name.kind == "archive":
            archives[ident] = obj
            parsed[ident] = name
        elif name.kind == "manifest":
            manifests[ident] = obj
            parsed.setdefault(ident, name)
        elif name.kind == "index":
            # An encrypted backup keeps both locally: the encrypted index is the one its
            # manifest describes, the plaintext one is the next incremental's parent.
            (indexes if name.encrypted else plain_indexes)[ident] = obj
            parsed.setdefault(ident, name)
        elif name.kind == "upload":
            listing.upload_keys[str(name.backup_id)] = obj.key
        elif name.kind == "partial":
            listing.partials.append(obj.key)
    for ident, name in parsed.items():
        archive = archives.get(ident)
        manifest = manifests.get(ident)
        plain_index = plain_indexes.get(ident)
        index = indexes.get(ident, plain_index)
        ref = BackupRef(
            host=name.host,
            source=name.source,
            backup_id=name.backup_id,
            where=where,
            archive_key=archive.key if archive else None,
            archive_size=archive.size if archive else None,
            manifest_key=manifest.key if manifest else None,
            compression=name.compression,
            archive_mtime=archive.modified if archive else index.modified if index else None,
            manifest_size=manifest.size if manifest else None,
            incremental=name.incremental,
            index_key=index.key if index else None,
            index_size=index.size if index else None,
            encrypted=name.encrypted,
            plain_index_key=plain_index.key if plain_index and plain_index is not index else None,
        )
        if archive and manifest:
            listing.refs.append(ref)
        elif archive or not manifest:  # an archive or index without its manifest
            listing.orphans.append(ref)
        else:
            listing.stray_manifests.append(ref)
    key = lambda r: (r.host, r.source, r.created_at, r.backup_id.seq)  # noqa: E731
    listing.refs.sort(key=key)
    listing.orphans.sort(key=key)
    return listing


# ---------------------------------------------------------------- parsing what was read back
#
# Manifests and upload records come back from the bucket and the local dir, which others
# can write: they are parsed into validated values here, once, against the key they were
# read from. Nothing downstream re-reads JSON, and no field of a manifest ever becomes a
# path or a key: those come from the key (a BackupRef built from a listing) alone.

#: A manifest is a few KiB (its warnings list can grow); anything this large is not one.
MAX_MANIFEST_BYTES = 64 * 1024**2
_MAX_INT = 2**63 - 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})$"
)
MANIFEST_HINT = (
    "it is damaged or was not written by cloudbackup: do not rely on this backup (restore "
    "an older one with --at, or the other copy with --from), and find out what changed it"
)
_MISSING: Any = object()


class _Invalid(Exception):
    """What is wrong with a document; the caller says which object it is."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _take(data: dict[str, Any], name: str, default: Any = _MISSING, within: str = "") -> Any:
    if name in data:
        return data[name]
    if default is _MISSING:
        raise _Invalid(f"has no {within + '.' if within else ''}{name}")
    return default


def _int(value: Any, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    # bool is an int subclass: true/false is never a count.
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise _Invalid(f"has {name} {_show(value)}, not a non-negative integer")
    return value


def _str(value: Any, name: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"has {name} {_show(value)}, not a string")
    return value


def _time(value: Any, name: str, *, optional: bool = False) -> Any:
    """An RFC 3339 time, returned in the canonical form ``format_time`` writes."""
    if value is None and optional:
        return None
    text = _str(value, name)
    if not _RFC3339_RE.fullmatch(text):
        raise _Invalid(f"has {name} {_show(text)}, not an RFC 3339 time")
    try:
        moment = parse_time(text.upper())
    except (ValueError, OverflowError):
        raise _Invalid(f"has {name} {_show(text)}, not a time in the calendar") from None
    if moment.microsecond:
        raise _Invalid(f"has {name} {_show(text)}, not a whole second")
    return format_time(moment)


def _plain_member(value: Any, name: str) -> str:
    """A member name that is one path component, nothing else."""
    text = _str(value, name)
    if (
        text in ("", ".", "..")
        or "/" in text
        or "\0" in text
        or len(text.encode(errors="surrogateescape")) > 255
    ):
        raise _Invalid(f"has {name} {_show(text)}, not a plain member name")
    return text


def _exact(value: Any, name: str, expected: str) -> str:
    if value != expected:
        raise _Invalid(f"has {name} {_show(value)}, not {expected!r}")
    return expected


# ---------------------------------------------------------------- member facts
#
# Each kind of source records facts about its members in the manifest (which member is the
# database file, the dump's format...). A kind declares them as a MemberSchema: field name ->
# one of the checks below, in this module's terms, so the one parser can validate them
# without knowing the kinds (the source registry hands the schemas in).


class MemberField(ABC):
    """How one member fact is checked when a manifest is read back."""

    @abstractmethod
    def check(self, value: Any, name: str, source: str) -> Any:
        """The value as the manifest holds it; _Invalid when it is not what the kind writes."""


@dataclass(frozen=True)
class Count(MemberField):
    """A non-negative integer."""

    def check(self, value: Any, name: str, source: str) -> Any:
        return _int(value, name)


@dataclass(frozen=True)
class Text(MemberField):
    """Any string."""

    def check(self, value: Any, name: str, source: str) -> Any:
        return _str(value, name)


@dataclass(frozen=True)
class Exactly(MemberField):
    """Exactly this string; ``{source}`` stands for the source name the key says."""

    template: str

    def check(self, value: Any, name: str, source: str) -> Any:
        return _exact(value, name, self.template.format(source=source))


@dataclass(frozen=True)
class MemberName(MemberField):
    """One plain member name (one path component) ending in ``suffix``."""

    suffix: str = ""

    def check(self, value: Any, name: str, source: str) -> Any:
        member = _plain_member(value, name)
        if not member.endswith(self.suffix):
            raise _Invalid(f"has {name} {_show(member)}, not a {self.suffix} member")
        return member


MemberSchema = Mapping[str, MemberField]
#: What the tar writer records for every kind.
TAR_MEMBERS: MemberSchema = {"dirs": Count(), "symlinks": Count(), "hardlinks": Count()}


def _members(value: Any, schema: MemberSchema, source: str) -> dict[str, Any]:
    """The member facts the kind's schema names (unknown ones are dropped, as unknown fields
    are)."""
    if not isinstance(value, dict):
        raise _Invalid(f"has members {_show(value)}, not an object")
    members: dict[str, Any] = {}
    for name, check in {**TAR_MEMBERS, **schema}.items():
        if name in value:
            members[name] = check.check(value[name], f"members.{name}", source)
    return members


def _upload_from(
    data: Any,
    backup_id: BackupId,
    host: str,
    archive: str | None,
    what: str = "upload",
    *,
    prefix: str | None = None,
) -> UploadRecord:
    """An upload record that names this backup's archive (``archive``: exactly that one).
    With ``prefix``, its key must be exactly the key this tool builds for that archive
    under the prefix (a record is acted upon: an upload it names may be resumed or
    aborted); without, its last components must be."""
    if not isinstance(data, dict):
        raise _Invalid(f"has {what} {_show(data)}, not an object")
    key = _str(_take(data, "key", within=what), f"{what}.key")
    parts = key.split("/")
    names = {archive} if archive else archive_names(backup_id)
    if prefix is not None:
        valid = key in {key_for(prefix, host, backup_id, name) for name in names}
    else:
        valid = (
            len(parts) >= 3
            and not any(p in ("", ".", "..") for p in parts)
            and parts[-3:-1] == [host, backup_id.source]
            and parts[-1] in names
        )
    if not valid:
        raise _Invalid(f"has {what}.key {_show(key)}, not the key of this backup's archive")
    algorithm = _str(
        _take(data, "checksum_algorithm", None), f"{what}.checksum_algorithm", optional=True
    )
    if algorithm not in (None, "SHA256"):
        raise _Invalid(f"has {what}.checksum_algorithm {_show(algorithm)}, not SHA256")
    text = {
        name: _str(_take(data, name, None), f"{what}.{name}", optional=True)
        for name in ("checksum", "etag", "upload_id")
    }
    return UploadRecord(
        key=key,
        part_size=_int(_take(data, "part_size", within=what), f"{what}.part_size"),
        part_count=_int(_take(data, "part_count", within=what), f"{what}.part_count"),
        checksum_algorithm=algorithm,
        checksum=text["checksum"],
        etag=text["etag"],
        upload_id=text["upload_id"],
        uploaded_at=_time(_take(data, "uploaded_at", None), f"{what}.uploaded_at", optional=True),
        verified_at=_time(_take(data, "verified_at", None), f"{what}.verified_at", optional=True),
    )


def _manifest_from(data: Any, ref: BackupRef, kinds: Mapping[str, MemberSchema]) -> Manifest:
    if not isinstance(data, dict):
        raise _Invalid(f"is a JSON {type(data).__name__}, not an object")
    version = data.get("format")
    if type(version) is not int or version != MANIFEST_FORMAT:
        raise _Invalid(
            f"has format {_show(version)}; this cloudbackup reads format {MANIFEST_FORMAT}"
        )
    expected_id = str(ref.backup_id)
    if _str(_take(data, "id"), "id") != expected_id:
        raise _Invalid(f"describes backup {_show(data['id'])}, not {expected_id} as its key says")
    if _str(_take(data, "host"), "host") != ref.host:
        raise _Invalid(f"names host {_show(data['host'])}, not {ref.host} as its key says")
    if _str(_take(data, "source"), "source") != ref.source:
        raise _Invalid(f"names source {_show(data['source'])}, not {ref.source} as its key says")
    kind = _str(_take(data, "kind"), "kind")
    if kind not in kinds:
        raise _Invalid(f"has an unknown source kind {_show(kind)}")
    compression = _str(_take(data, "compression"), "compression")
    if compression not in COMPRESSION_EXT:
        raise _Invalid(f"has an unknown compression {_show(compression)}")
    encryption, recipients = _encryption(data)
    level = _int(_take(data, "level", 0), "level")
    parent, base = _chain(data, ref, level)
    archive = archive_name(
        ref.backup_id, compression, incremental=level > 0, encrypted=encryption is not None
    )
    if _str(_take(data, "archive"), "archive") != archive:
        raise _Invalid(f"names archive {_show(data['archive'])}, not {archive} as its key says")
    if ref.archive_key is not None and ref.archive_key.rsplit("/", 1)[-1] != archive:
        raise _Invalid(f"names archive {archive}, but the archive listed is {ref.archive_key}")
    created_at = _time(_take(data, "created_at"), "created_at")
    if parse_time(created_at) != ref.backup_id.created_at:
        raise _Invalid(f"has created_at {created_at}, not the time its id says")
    sha256 = _str(_take(data, "sha256"), "sha256")
    if not _SHA256_RE.fullmatch(sha256):
        raise _Invalid(f"has sha256 {_show(sha256)}, not 64 lowercase hex digits")
    warnings = _take(data, "warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise _Invalid(f"has warnings {_show(warnings)}, not a list of strings")
    upload = data.get("upload")
    return Manifest(
        id=expected_id,
        host=ref.host,
        source=ref.source,
        kind=kind,
        spec=_str(_take(data, "spec"), "spec"),
        created_at=created_at,
        archive=archive,
        size=_int(_take(data, "size"), "size"),
        sha256=sha256,
        compression=compression,
        compression_level=_int(
            _take(data, "compression_level", None), "compression_level", optional=True
        ),
        file_count=_int(_take(data, "file_count"), "file_count"),
        uncompressed_bytes=_int(_take(data, "uncompressed_bytes"), "uncompressed_bytes"),
        machine_id=_str(_take(data, "machine_id"), "machine_id"),
        tool_version=_str(_take(data, "tool_version"), "tool_version"),
        warnings=list(warnings),
        root_device=_int(_take(data, "root_device", None), "root_device", optional=True),
        root=_str(_take(data, "root", None), "root", optional=True),
        members=_members(_take(data, "members", {}), kinds[kind], ref.source),
        upload=None if upload is None else _upload_from(upload, ref.backup_id, ref.host, archive),
        encryption=encryption,
        recipients=recipients,
        level=level,
        parent=parent,
        base=base,
        index=_index_facts(_take(data, "index", None), ref.backup_id, encryption is not None),
        tree_files=_int(_take(data, "tree_files", None), "tree_files", optional=True),
        tree_bytes=_int(_take(data, "tree_bytes", None), "tree_bytes", optional=True),
        walk_started_ns=_int(
            _take(data, "walk_started_ns", None), "walk_started_ns", optional=True
        ),
    )


def _encryption(data: dict[str, Any]) -> tuple[str | None, list[str]]:
    """``encryption`` (absent/null, or "age") and its ``recipients`` (age public keys)."""
    encryption = _str(_take(data, "encryption", None), "encryption", optional=True)
    recipients = _take(data, "recipients", [])
    if encryption is None:
        if recipients:
            raise _Invalid("has recipients but no encryption")
        return None, []
    if encryption != ENCRYPTION:
        raise _Invalid(f"has an unknown encryption {_show(encryption)}")
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(isinstance(r, str) and RECIPIENT_RE.fullmatch(r) for r in recipients)
    ):
        raise _Invalid(f"has recipients {_show(recipients)}, not a list of age public keys")
    return encryption, list(recipients)


def _earlier_id(value: Any, name: str, ref: BackupRef) -> str:
    """A backup id of the same source, older than ``ref``'s."""
    text = _str(value, name)
    try:
        other = BackupId.parse(text)
    except ValueError:
        raise _Invalid(f"has {name} {_show(text)}, not a backup id") from None
    if other.source != ref.source or str(other) != text:
        raise _Invalid(f"has {name} {_show(text)}, not a backup of source {ref.source}")
    mine = ref.backup_id
    if (other.created_at, other.seq) >= (mine.created_at, mine.seq):
        raise _Invalid(f"has {name} {_show(text)}, not a backup older than {mine}")
    return text


def _chain(data: dict[str, Any], ref: BackupRef, level: int) -> tuple[str | None, str | None]:
    """``parent`` and ``base``: none and the backup itself (or absent) for a full; older
    backups of the same source for an incremental."""
    parent = _take(data, "parent", None)
    base = _take(data, "base", None)
    if level == 0:
        if parent is not None:
            raise _Invalid(f"is a full backup (level 0) with parent {_show(parent)}")
        if base is not None and base != str(ref.backup_id):
            raise _Invalid(f"is a full backup (level 0) with base {_show(base)}")
        return None, base
    parent_id = _earlier_id(parent, "parent", ref)
    base_id = _earlier_id(base, "base", ref)
    if BackupId.parse(base_id) > BackupId.parse(parent_id):
        raise _Invalid(f"has base {base_id} newer than its parent {parent_id}")
    return parent_id, base_id


def _index_facts(value: Any, backup_id: BackupId, encrypted: bool) -> IndexFacts | None:
    """``index``: the copy uploaded, encrypted like the archive when the backup is."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(f"has index {_show(value)}, not an object")
    name = _str(_take(value, "name", within="index"), "index.name")
    expected = index_name(backup_id, encrypted=encrypted)
    if name != expected:
        raise _Invalid(f"has index.name {_show(name)}, not {expected}")
    sha256 = _str(_take(value, "sha256", within="index"), "index.sha256")
    if not _SHA256_RE.fullmatch(sha256):
        raise _Invalid(f"has index.sha256 {_show(sha256)}, not 64 lowercase hex digits")
    return IndexFacts(name, _int(_take(value, "size", within="index"), "index.size"), sha256)


def _load_json(raw: bytes | str) -> Any:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _Invalid(f"is {len(raw)} bytes, more than any manifest holds")
    try:
        return json.loads(raw)
    except RecursionError:
        raise _Invalid("is not JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise _Invalid(f"is not JSON ({exc})") from None


def parse_manifest(
    raw: bytes | str, ref: BackupRef, kinds: Mapping[str, MemberSchema]
) -> Manifest:
    """The one way bytes read back become a :class:`Manifest`.

    ``ref`` is the backup as its key (a listing) names it. Every field is checked: a JSON
    object of a known format whose ``id``, ``host``, ``source``, ``archive`` and
    ``created_at`` agree with the key; a ``kind`` among ``kinds`` (each kind's member schema:
    see ``cloudbackup.sources.registry``) and a known ``compression``; non-negative
    integers; a lowercase hex ``sha256``; ``warnings`` a list of strings; ``members`` of the
    kind's schema and an ``upload`` of the shape cloudbackup writes. Anything else — or bytes that are not JSON
    at all — is an :class:`IntegrityError` (exit 3) naming the key. Unknown fields are
    dropped, so the value is the same whatever else a newer writer added.
    """
    key = ref.manifest_key or manifest_name(ref.backup_id)
    try:
        return _manifest_from(_load_json(raw), ref, kinds)
    except _Invalid as exc:
        raise IntegrityError(f"the {ref.where} manifest {key} {exc}", MANIFEST_HINT) from None


def check_manifest_size(ref: BackupRef) -> None:
    """Refuse, before reading it, a manifest the listing says is far too large to be one."""
    if ref.manifest_size is not None and ref.manifest_size > MAX_MANIFEST_BYTES:
        raise IntegrityError(
            f"the {ref.where} manifest {ref.manifest_key} is {ref.manifest_size} bytes, "
            "more than any manifest holds",
            MANIFEST_HINT,
        )


def parse_upload_record(
    raw: bytes | str, backup_id: BackupId, host: str, *, prefix: str
) -> UploadRecord:
    """A local ``<id>.upload.json`` (the local dir is untrusted too); IntegrityError when it
    is not a record of this backup's upload: its key must be exactly the key of this
    backup's archive under the bucket ``prefix`` (``key_for``), so a forged record can
    never make the tool resume or abort an upload anywhere else."""
    try:
        return _upload_from(_load_json(raw), backup_id, host, None, what="record", prefix=prefix)
    except _Invalid as exc:
        raise IntegrityError(f"the upload record of {backup_id} {exc}") from None


@dataclass(frozen=True)
class ManifestFacts:
    """What remote verify needs, as the manifest object's metadata carries it (HEAD, no GET)."""

    sha256: str
    size: int
    checksum: str | None


def parse_manifest_metadata(metadata: dict[str, str], ref: BackupRef) -> ManifestFacts | None:
    """The facts in a manifest object's user metadata; ``None`` when it carries none (an
    object written without them: read the body). Metadata is read back from the bucket as
    well: facts that are malformed or disagree with the key are an IntegrityError."""
    if "sha256" not in metadata or "size" not in metadata:
        return None
    sha256, size = metadata["sha256"], metadata["size"]
    problem = None
    if not _SHA256_RE.fullmatch(sha256):
        problem = f"sha256 {_show(sha256)}, not 64 lowercase hex digits"
    elif not (size.isascii() and size.isdigit()) or len(size) > 19 or int(size) > _MAX_INT:
        problem = f"size {_show(size)}, not a byte count"
    else:
        for name, expected in (("source", ref.source), ("host", ref.host)):
            if metadata.get(name, expected) != expected:
                problem = f"{name} {_show(metadata[name])}, not {expected} as its key says"
    if problem is not None:
        raise IntegrityError(
            f"the {ref.where} manifest {ref.manifest_key} has metadata {problem}", MANIFEST_HINT
        )
    return ManifestFacts(sha256, int(size), metadata.get("s3-checksum"))


def manifest_ref(key: str, *, prefix: str = "", where: str = "local") -> BackupRef | None:
    """The BackupRef of a manifest known by its key alone (``None``: not a manifest key), to
    parse a manifest found without a listing (``<host>/<source>/<id>.manifest.json`` locally)."""
    name = parse_name(key, prefix)
    if name is None or name.kind != "manifest":
        return None
    return BackupRef(name.host, name.source, name.backup_id, where, manifest_key=key)
