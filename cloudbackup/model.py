"""Backup ids, object names and manifests: the one place that formats and parses them."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

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
UPLOAD_SUFFIX = ".upload.json"
PARTIAL_SUFFIX = ".partial"
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
        match = _ID_RE.match(text)
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
    kind: str  # "archive" | "manifest" | "upload" | "partial"
    compression: str | None = None


def archive_name(backup_id: BackupId, compression: str) -> str:
    return f"{backup_id}{COMPRESSION_EXT[compression]}"


def manifest_name(backup_id: BackupId) -> str:
    return f"{backup_id}{MANIFEST_SUFFIX}"


def upload_name(backup_id: BackupId) -> str:
    return f"{backup_id}{UPLOAD_SUFFIX}"


def key_for(prefix: str, host: str, backup_id: BackupId, name: str) -> str:
    """``<prefix>/<host>/<source>/<name>``; an empty prefix drops its slash."""
    parts = [p for p in prefix.strip("/").split("/") if p] + [host, backup_id.source, name]
    return "/".join(parts)


def name_for(
    prefix: str, host: str, backup_id: BackupId, kind: str, compression: str = "zstd"
) -> str:
    if kind == "archive":
        name = archive_name(backup_id, compression)
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
    stem = filename
    if filename.endswith(PARTIAL_SUFFIX):
        kind, stem = "partial", filename[: -len(PARTIAL_SUFFIX)]
    for suffix, k in ((MANIFEST_SUFFIX, "manifest"), (UPLOAD_SUFFIX, "upload")):
        if kind is None and stem.endswith(suffix):
            kind, stem = k, stem[: -len(suffix)]
    if kind in (None, "partial"):
        # Longest extension first: ".tar.zst" before ".tar".
        for comp, ext in sorted(COMPRESSION_EXT.items(), key=lambda kv: -len(kv[1])):
            if stem.endswith(ext):
                compression, stem = comp, stem[: -len(ext)]
                kind = kind or "archive"
                break
        else:
            if kind is None:
                return None
    try:
        backup_id = BackupId.parse(stem)
    except ValueError:
        return None
    if backup_id.source != source:
        return None
    return ParsedName(host, source, backup_id, kind or "archive", compression)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UploadRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    """The immutable record of one archive; written after the archive is durable."""

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
        return data

    def to_json(self) -> bytes:
        # ASCII escapes keep non-UTF-8 names (surrogates) representable.
        return (
            json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError("not a cloudbackup manifest (format version missing or unknown)")
        upload = data.pop("upload", None)
        known = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        if upload:
            manifest.upload = UploadRecord.from_dict(upload)
        return manifest


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

    @property
    def id(self) -> str:
        return str(self.backup_id)

    @property
    def created_at(self) -> datetime:
        return self.backup_id.created_at

    @property
    def complete(self) -> bool:
        return self.archive_key is not None and self.manifest_key is not None


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


def build_listing(objects: Any, *, prefix: str, where: str) -> Listing:
    """Group LIST entries (objects with ``key``, ``size``, ``modified``) into backups."""
    archives: dict[tuple[str, str], Any] = {}
    manifests: dict[tuple[str, str], Any] = {}
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
        elif name.kind == "upload":
            listing.upload_keys[str(name.backup_id)] = obj.key
        elif name.kind == "partial":
            listing.partials.append(obj.key)
    for ident, name in parsed.items():
        archive = archives.get(ident)
        manifest = manifests.get(ident)
        ref = BackupRef(
            host=name.host,
            source=name.source,
            backup_id=name.backup_id,
            where=where,
            archive_key=archive.key if archive else None,
            archive_size=archive.size if archive else None,
            manifest_key=manifest.key if manifest else None,
            compression=name.compression,
            archive_mtime=archive.modified if archive else None,
        )
        if archive and manifest:
            listing.refs.append(ref)
        elif archive:
            listing.orphans.append(ref)
        else:
            listing.stray_manifests.append(ref)
    key = lambda r: (r.host, r.source, r.created_at, r.backup_id.seq)  # noqa: E731
    listing.refs.sort(key=key)
    listing.orphans.sort(key=key)
    return listing
