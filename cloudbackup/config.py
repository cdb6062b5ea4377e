"""Settings resolved once: command line > environment > .env file > default.

``load`` is pure: the caller passes the environment, the ``.env`` values and the
machine facts (hostname, home); nothing here reads ``os.environ`` or the clock.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cloudbackup.core import childenv, retention
from cloudbackup.core.errors import ConfigError
from cloudbackup.core.model import valid_name
from cloudbackup.sources.base import SourceSpec, redact_url
from cloudbackup.sources.registry import parse_spec

COMPRESSIONS = ("zstd", "gzip", "xz", "bzip2", "none")
LEVEL_RANGES = {"zstd": (1, 19), "gzip": (1, 9), "bzip2": (1, 9), "xz": (0, 9), "none": (0, 0)}
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6, "bzip2": 9, "xz": 6, "none": None}
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR")
SSE_MODES = ("AES256", "aws:kms")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_USER_TAGS = 7
MAX_PART_SIZE = 5 * 1024**3  # S3's largest part
MAX_LOCK_DAYS = 36500  # S3's longest Object Lock retention: 100 years
_TAG_RE = re.compile(r"^[\w .:/=+\-@]{1,128}$")

KNOWN_VARIABLES = (
    "CLOUDBACKUP_SOURCES",
    "CLOUDBACKUP_EXCLUDE",
    "CLOUDBACKUP_LOCAL_DIR",
    "CLOUDBACKUP_HOST",
    "CLOUDBACKUP_COMPRESSION",
    "CLOUDBACKUP_COMPRESSION_LEVEL",
    "CLOUDBACKUP_S3_BUCKET",
    "CLOUDBACKUP_DEST",
    "CLOUDBACKUP_LOCAL_ONLY",
    "CLOUDBACKUP_S3_PREFIX",
    "CLOUDBACKUP_S3_ENDPOINT_URL",
    "CLOUDBACKUP_S3_STORAGE_CLASS",
    "CLOUDBACKUP_S3_COMPAT",
    "CLOUDBACKUP_S3_SSE",
    "CLOUDBACKUP_S3_KMS_KEY_ID",
    "CLOUDBACKUP_S3_OBJECT_LOCK",
    "CLOUDBACKUP_S3_TAGS",
    "CLOUDBACKUP_LOCAL_RETENTION",
    "CLOUDBACKUP_REMOTE_RETENTION",
    "CLOUDBACKUP_SHRINK_GUARD",
    "CLOUDBACKUP_RETRY_ATTEMPTS",
    "CLOUDBACKUP_PING_URL",
    "CLOUDBACKUP_LOG_FILE",
    "CLOUDBACKUP_LOG_LEVEL",
)
# Read by the tool but not part of the user-facing table (tuning knobs).
EXTRA_VARIABLES = (
    "CLOUDBACKUP_S3_PART_SIZE",
    "CLOUDBACKUP_S3_CONCURRENCY",
    "CLOUDBACKUP_S3_ADDRESSING",
    "CLOUDBACKUP_S3_DOWNLOAD",
    "CLOUDBACKUP_S3_UPLOAD",
)


def split_list(value: str) -> list[str]:
    """Split on newlines when there are any, else on commas outside ``{...}``."""
    text = value.strip()
    if not text:
        return []
    if "\n" in text:
        return [line.strip() for line in text.splitlines() if line.strip()]
    items: list[str] = []
    depth, current = 0, list[str]()
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


@dataclass(frozen=True)
class ObjectLock:
    mode: str  # "GOVERNANCE" | "COMPLIANCE"
    days: int

    def __str__(self) -> str:
        return f"{self.mode.lower()}:{self.days}d"


@dataclass(frozen=True, kw_only=True)
class Settings:
    sources: tuple[SourceSpec, ...] = ()
    exclude: tuple[str, ...] = ()
    local_dir: Path
    host: str
    host_explicit: bool = False
    compression: str = "zstd"
    compression_level: int | None = 3
    s3_bucket: str | None = None
    #: A directory destination (``CLOUDBACKUP_DEST=file:///path``) instead of a bucket.
    dest: Path | None = None
    local_only: bool = False
    s3_prefix: str = "cloudbackup"
    s3_endpoint_url: str | None = None
    s3_storage_class: str = "STANDARD"
    s3_compat: bool = False
    s3_sse: str | None = None
    s3_kms_key_id: str | None = None
    s3_object_lock: ObjectLock | None = None
    s3_tags: tuple[tuple[str, str], ...] = ()
    s3_part_size: int | None = None
    s3_concurrency: int = 4
    s3_addressing: str = "auto"
    s3_download: str = "single"
    s3_upload: str = "stream"
    local_retention: retention.Policy = field(
        default_factory=lambda: retention.parse_policy("last=3")
    )
    remote_retention: retention.Policy | None = None
    shrink_guard: float | None = 0.5
    retry_attempts: int = 5
    ping_url: str | None = None
    log_file: Path | None = None
    log_level: str = "INFO"
    env_file: Path | None = None
    warnings: tuple[str, ...] = ()
    #: The base environment of every child process: this process's environment without its
    #: secrets (``childenv.scrub``); children get ``childenv.build(child_env, extra)``.
    child_env: Mapping[str, str] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    @property
    def remote_configured(self) -> bool:
        """An offsite destination is configured: a bucket or a directory."""
        return self.s3_bucket is not None or self.dest is not None

    @property
    def remote_name(self) -> str:
        """The offsite destination in words (``bucket B``, ``destination file:///p``)."""
        if self.dest is not None:
            return f"destination {self.dest.as_uri()}"
        return f"bucket {self.s3_bucket}"

    def source(self, name: str) -> SourceSpec | None:
        for spec in self.sources:
            if spec.name == name:
                return spec
        return None


class _Resolver:
    """Looks a variable up in cli > environ > dotenv order and remembers where it came from."""

    def __init__(
        self, cli: Mapping[str, Any], environ: Mapping[str, str], dotenv: Mapping[str, str | None]
    ) -> None:
        self.cli, self.environ, self.dotenv = cli, environ, dotenv

    def get(self, var: str) -> tuple[str | None, str]:
        value = self.cli.get(var)
        if value is not None:
            return str(value), "command line"
        if var in self.environ:
            return self.environ[var], "environment"
        dot = self.dotenv.get(var)
        if dot is not None:
            return dot, ".env file"
        return None, "default"


def shown(value: str, limit: int = 100) -> str:
    """``repr(value)``, cut short when long: an error line stays one readable line."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit])[:-1] + f"...' ({len(value)} characters)"


def _fail(var: str, value: str, where: str, why: str) -> ConfigError:
    return ConfigError(f"{var}={shown(value)} ({where}) is invalid: {why}")


def _not_utf8(var: str, value: str, where: str) -> ConfigError | None:
    """Bytes that are not UTF-8 reach Python as lone surrogates: refuse them by name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ConfigError(
            f"{var} ({where}) is not valid UTF-8: {shown(value)}",
            "write the value in UTF-8",
        )
    return None


def _dest(var: str, value: str, where: str) -> Path:
    """A ``file://`` URL of an absolute local path (``file:///mnt/nas/backups``)."""
    text = value.strip()
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise _fail(var, value, where, f"not a URL ({exc})") from None
    if parts.scheme != "file":
        raise _fail(var, value, where, "only file:// URLs are supported (file:///mnt/nas/backups)")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _fail(var, value, where, "use file:///absolute/path (no host, query or fragment)")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise _fail(var, value, where, "use file:///absolute/path")
    clean = Path(os.path.normpath(path))
    if clean == Path("/") or ".." in Path(path).parts:
        raise _fail(var, value, where, "name a directory below / (without ..)")
    return clean


def _http_url(var: str, value: str, where: str) -> str:
    """An http(s) URL with a host (and a valid port, if any)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise _fail(var, value, where, f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", value):
        raise _fail(var, value, where, "use an http(s)://host[:port] URL")
    return value


def _flag(var: str, value: str | None, where: str) -> bool:
    if value is None or value.strip() == "":
        return False
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _fail(var, value, where, "use 1 or 0")


def _int(var: str, value: str, where: str, low: int, high: int | None = None) -> int:
    try:
        if len(value.strip()) > 30:
            raise ValueError("too many digits")
        number = int(value.strip())
    except ValueError:
        raise _fail(var, value, where, "not a whole number") from None
    if number < low or (high is not None and number > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(var, value, where, f"must be {bound}")
    return number


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d{1,30})\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{shown(text)} is not a size like 64MiB")
    unit = (match[2] or "B").upper().rstrip("B").rstrip("I")
    return int(match[1]) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]


def parse_object_lock(text: str) -> ObjectLock:
    match = re.fullmatch(r"(governance|compliance):(\d{1,9})d", text.strip(), re.IGNORECASE)
    if not match or not 1 <= int(match[2]) <= MAX_LOCK_DAYS:
        raise ValueError(
            "use governance:<days>d or compliance:<days>d, e.g. governance:30d "
            f"(1 to {MAX_LOCK_DAYS} days)"
        )
    return ObjectLock(match[1].upper(), int(match[2]))


def parse_tags(text: str) -> tuple[tuple[str, str], ...]:
    tags: list[tuple[str, str]] = []
    for item in split_list(text):
        if "=" not in item:
            raise ValueError(f"tag {item!r} is not key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if not key or not _TAG_RE.match(key) or (value and not _TAG_RE.match(value)):
            raise ValueError(f"tag {item!r} has characters S3 does not accept")
        if key.lower().startswith(("cloudbackup:", "aws:")):
            raise ValueError(f"tag key {key!r} is reserved")
        if any(key == k for k, _ in tags):
            raise ValueError(f"tag key {key!r} given twice")
        tags.append((key, value))
    if len(tags) > MAX_USER_TAGS:
        raise ValueError(
            f"{len(tags)} tags given, at most {MAX_USER_TAGS} (S3 allows 10 per object "
            "and cloudbackup uses 3)"
        )
    return tuple(tags)


def parse_shrink_guard(text: str) -> float | None:
    clean = text.strip().lower()
    if clean in ("off", "0", "0%", "none"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", clean)
    if not match or not 0 < float(match[1]) <= 100:
        raise ValueError("use a percentage such as 50% (or off)")
    return float(match[1]) / 100


# Long: one block per variable, each read, parsed and checked in the order of the README table.
def load(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str | None],
    *,
    hostname: str,
    home: Path | None,
    env_file: Path | None = None,
) -> Settings:
    """Resolve every setting once and validate it; raise ConfigError naming the culprit.

    ``cli`` maps variable names to command-line values (``None`` = not given), except
    ``extra_exclude`` (added to ``CLOUDBACKUP_EXCLUDE``) and ``sources`` (replacing
    ``CLOUDBACKUP_SOURCES``). ``home`` is None when this user has no home directory.
    """
    r = _Resolver(cli, environ, dotenv)
    warnings: list[str] = []
    known = set(KNOWN_VARIABLES) | set(EXTRA_VARIABLES)
    for var in sorted({*environ, *(k for k, v in dotenv.items() if v is not None)}):
        if var.startswith("CLOUDBACKUP_") and var not in known:
            warnings.append(f"unknown variable {shown(var)} ignored (check its spelling)")
    for name, text in sorted(environ.items()):
        if name.startswith("CLOUDBACKUP_") and (error := _not_utf8(name, text, "environment")):
            raise error

    # Sources: arguments replace CLOUDBACKUP_SOURCES.
    sources: list[SourceSpec] = []
    raw_specs: list[tuple[str, str]] = []
    if cli.get("sources"):
        raw_specs = [(s, "command line") for s in cli["sources"]]
    else:
        value, where = r.get("CLOUDBACKUP_SOURCES")
        if value:
            raw_specs = [(s, f"CLOUDBACKUP_SOURCES, {where}") for s in split_list(value)]
    for text, where in raw_specs:
        try:
            sources.append(parse_spec(text))
        except ValueError as exc:
            raise ConfigError(f"source {redact_url(text)!r} ({where}) is invalid: {exc}") from None
    seen: set[str] = set()
    for spec in sources:
        if spec.name in seen:
            raise ConfigError(
                f"two sources are named {spec.name!r}",
                "give one of them an explicit name, e.g. www2=/path",
            )
        seen.add(spec.name)

    value, where = r.get("CLOUDBACKUP_EXCLUDE")
    exclude = tuple(split_list(value or "")) + tuple(cli.get("extra_exclude") or ())

    value, where = r.get("CLOUDBACKUP_LOCAL_DIR")
    if value:
        local_dir = Path(value).expanduser()
        if not local_dir.is_absolute():
            raise _fail("CLOUDBACKUP_LOCAL_DIR", value, where, "use an absolute path")
    else:
        # The XDG spec: a relative XDG_DATA_HOME is invalid and ignored.
        xdg = environ.get("XDG_DATA_HOME", "")
        if os.path.isabs(xdg):
            local_dir = Path(xdg) / "cloudbackup"
        elif home is not None:
            local_dir = home / ".local" / "share" / "cloudbackup"
        else:
            raise ConfigError(
                "no local dir: CLOUDBACKUP_LOCAL_DIR is not set and this user has no home "
                "directory (HOME)",
                "set CLOUDBACKUP_LOCAL_DIR to an absolute path",
            )

    value, where = r.get("CLOUDBACKUP_HOST")
    host_explicit = cli.get("CLOUDBACKUP_HOST") is not None
    host = (value or hostname).strip()
    if not valid_name(host) or host.startswith("."):
        raise _fail("CLOUDBACKUP_HOST", host, where, "use letters, digits, '.', '_' or '-'")

    value, where = r.get("CLOUDBACKUP_COMPRESSION")
    compression = (value or "zstd").strip().lower()
    if compression not in COMPRESSIONS:
        hint = " (zip is not supported: it loses Unix owners, modes and symlinks)"
        raise _fail(
            "CLOUDBACKUP_COMPRESSION",
            value or "",
            where,
            "choose one of " + ", ".join(COMPRESSIONS) + (hint if compression == "zip" else ""),
        )
    value, where = r.get("CLOUDBACKUP_COMPRESSION_LEVEL")
    level = DEFAULT_LEVELS[compression]
    if value not in (None, "") and compression != "none":
        low, high = LEVEL_RANGES[compression]
        level = _int("CLOUDBACKUP_COMPRESSION_LEVEL", value or "", where, low, high)

    bucket, where = r.get("CLOUDBACKUP_S3_BUCKET")
    bucket = (bucket or "").strip() or None
    if bucket and (
        not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket)
        or ".." in bucket
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)
        or bucket.startswith("xn--")
    ):
        raise _fail("CLOUDBACKUP_S3_BUCKET", bucket, where, "not a valid S3 bucket name")
    value, where = r.get("CLOUDBACKUP_DEST")
    dest = _dest("CLOUDBACKUP_DEST", value, where) if value and value.strip() else None
    if dest is not None and bucket:
        raise ConfigError(
            "CLOUDBACKUP_DEST and CLOUDBACKUP_S3_BUCKET are both set",
            "the offsite copy goes to one destination: unset one of them",
        )
    value, where = r.get("CLOUDBACKUP_LOCAL_ONLY")
    local_only = _flag("CLOUDBACKUP_LOCAL_ONLY", value, where)

    value, where = r.get("CLOUDBACKUP_S3_PREFIX")
    prefix = "cloudbackup" if value is None else value.strip().strip("/")
    if prefix and not all(valid_name(part) for part in prefix.split("/")):
        raise _fail(
            "CLOUDBACKUP_S3_PREFIX",
            value or "",
            where,
            "use letters, digits, '.', '_', '-' and '/'",
        )

    endpoint, where = r.get("CLOUDBACKUP_S3_ENDPOINT_URL")
    endpoint = (endpoint or "").strip() or None
    if endpoint:
        _http_url("CLOUDBACKUP_S3_ENDPOINT_URL", endpoint, where)

    value, where = r.get("CLOUDBACKUP_S3_STORAGE_CLASS")
    storage_class = (value or "STANDARD").strip().upper()
    if storage_class not in STORAGE_CLASSES:
        raise _fail(
            "CLOUDBACKUP_S3_STORAGE_CLASS",
            value or "",
            where,
            "only instant-read classes are supported: " + ", ".join(STORAGE_CLASSES),
        )
    value, where = r.get("CLOUDBACKUP_S3_COMPAT")
    compat = _flag("CLOUDBACKUP_S3_COMPAT", value, where)

    value, where = r.get("CLOUDBACKUP_S3_SSE")
    sse = (value or "").strip() or None
    if sse and sse not in SSE_MODES:
        raise _fail("CLOUDBACKUP_S3_SSE", sse, where, "use AES256 or aws:kms")
    kms, where = r.get("CLOUDBACKUP_S3_KMS_KEY_ID")
    kms = (kms or "").strip() or None
    if kms and sse != "aws:kms":
        raise _fail(
            "CLOUDBACKUP_S3_KMS_KEY_ID", kms, where, "only used with CLOUDBACKUP_S3_SSE=aws:kms"
        )

    value, where = r.get("CLOUDBACKUP_S3_OBJECT_LOCK")
    lock = None
    if value and value.strip():
        try:
            lock = parse_object_lock(value)
        except ValueError as exc:
            raise _fail("CLOUDBACKUP_S3_OBJECT_LOCK", value, where, str(exc)) from None

    if lock is not None and dest is not None:
        raise ConfigError(
            "CLOUDBACKUP_S3_OBJECT_LOCK cannot be used with CLOUDBACKUP_DEST",
            "Object Lock is an S3 feature: a directory destination has no WORM retention",
        )

    value, where = r.get("CLOUDBACKUP_S3_TAGS")
    try:
        tags = parse_tags(value or "")
    except ValueError as exc:
        raise _fail("CLOUDBACKUP_S3_TAGS", value or "", where, str(exc)) from None
    if tags and compat:
        warnings.append("CLOUDBACKUP_S3_TAGS is ignored with CLOUDBACKUP_S3_COMPAT=1 (no tagging)")

    value, where = r.get("CLOUDBACKUP_S3_PART_SIZE")
    part_size = None
    if value:
        try:
            part_size = parse_size(value)
        except ValueError as exc:
            raise _fail("CLOUDBACKUP_S3_PART_SIZE", value, where, str(exc)) from None
        if part_size < 5 * 1024**2:
            raise _fail("CLOUDBACKUP_S3_PART_SIZE", value, where, "S3 parts are at least 5MiB")
        if part_size > MAX_PART_SIZE:
            raise _fail("CLOUDBACKUP_S3_PART_SIZE", value, where, "S3 parts are at most 5GiB")
    value, where = r.get("CLOUDBACKUP_S3_CONCURRENCY")
    concurrency = _int("CLOUDBACKUP_S3_CONCURRENCY", value, where, 1, 64) if value else 4
    value, where = r.get("CLOUDBACKUP_S3_ADDRESSING")
    addressing = (value or "auto").strip().lower()
    if addressing not in ("auto", "path", "virtual"):
        raise _fail("CLOUDBACKUP_S3_ADDRESSING", addressing, where, "use auto, path or virtual")

    value, where = r.get("CLOUDBACKUP_S3_DOWNLOAD")
    download = (value or "single").strip().lower()
    if download not in ("single", "ranged"):
        raise _fail("CLOUDBACKUP_S3_DOWNLOAD", download, where, "use single or ranged")
    value, where = r.get("CLOUDBACKUP_S3_UPLOAD")
    upload = (value or "stream").strip().lower()
    if upload not in ("stream", "after"):
        raise _fail("CLOUDBACKUP_S3_UPLOAD", upload, where, "use stream or after")

    def policy(var: str, default: str | None) -> retention.Policy | None:
        value, where = r.get(var)
        text = default if value is None else value
        if text is None:
            return None
        try:
            return retention.parse_policy(text)
        except ConfigError as exc:
            raise ConfigError(
                f"{var}={shown(text)} ({where}) is invalid: {exc.message}", exc.hint
            ) from None
        except ValueError:  # a number too long for int() (over 4,300 digits)
            raise _fail(var, text, where, "a number in it is far too long") from None

    local_policy = policy("CLOUDBACKUP_LOCAL_RETENTION", "last=3")
    assert local_policy is not None
    remote_policy = policy("CLOUDBACKUP_REMOTE_RETENTION", None)

    value, where = r.get("CLOUDBACKUP_SHRINK_GUARD")
    try:
        shrink = parse_shrink_guard(value) if value not in (None, "") else 0.5
    except ValueError as exc:
        raise _fail("CLOUDBACKUP_SHRINK_GUARD", value or "", where, str(exc)) from None

    value, where = r.get("CLOUDBACKUP_RETRY_ATTEMPTS")
    attempts = _int("CLOUDBACKUP_RETRY_ATTEMPTS", value, where, 1, 100) if value else 5

    ping, where = r.get("CLOUDBACKUP_PING_URL")
    ping = (ping or "").strip().rstrip("/") or None
    if ping:
        _http_url("CLOUDBACKUP_PING_URL", ping, where)

    value, where = r.get("CLOUDBACKUP_LOG_FILE")
    log_file = Path(value).expanduser() if value and value.strip() else None
    if log_file and not log_file.is_absolute():
        raise _fail("CLOUDBACKUP_LOG_FILE", value or "", where, "use an absolute path")
    value, where = r.get("CLOUDBACKUP_LOG_LEVEL")
    log_level = (value or "INFO").strip().upper()
    if log_level not in LOG_LEVELS:
        raise _fail("CLOUDBACKUP_LOG_LEVEL", value or "", where, "use " + ", ".join(LOG_LEVELS))

    return Settings(
        sources=tuple(sources),
        exclude=exclude,
        local_dir=local_dir,
        host=host,
        host_explicit=host_explicit,
        compression=compression,
        compression_level=level,
        s3_bucket=bucket,
        dest=dest,
        local_only=local_only,
        s3_prefix=prefix,
        s3_endpoint_url=endpoint,
        s3_storage_class=storage_class,
        s3_compat=compat,
        s3_sse=sse,
        s3_kms_key_id=kms,
        s3_object_lock=lock,
        s3_tags=tags,
        s3_part_size=part_size,
        s3_concurrency=concurrency,
        s3_addressing=addressing,
        s3_download=download,
        s3_upload=upload,
        local_retention=local_policy,
        remote_retention=remote_policy,
        shrink_guard=shrink,
        retry_attempts=attempts,
        ping_url=ping,
        log_file=log_file,
        log_level=log_level,
        env_file=env_file,
        warnings=tuple(warnings),
        child_env=childenv.scrub(environ),
    )
