"""Settings from one table: command line > environment > .env file > default.

:data:`VARIABLES` is the one list of the variables cloudbackup reads: each row names the
variable, the :class:`Settings` field it sets, its parser, its default, one line of
documentation, and whether it is a tuning knob, can be set per source or is a secret. From
it come :func:`load`, the unknown-variable warning, ``.env.example`` and the README's tables
(``python -m cloudbackup.config --env-example`` / ``--readme-tables``;
``scripts/config-docs`` writes both files, and a test keeps them in step).

Every variable ``CLOUDBACKUP_X`` may instead be given as ``CLOUDBACKUP_X_FILE=/path`` (the
value is the file's content); a per-source row also as ``CLOUDBACKUP_X__<SOURCE>`` (and
``CLOUDBACKUP_X__<SOURCE>_FILE``), which :meth:`Settings.for_source` applies.

``load`` reads no environment and no clock: the caller passes the environment, the ``.env``
values and the machine facts (hostname, home). The only files it reads are those the
``_FILE`` forms name.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cloudbackup.core import childenv, retention
from cloudbackup.core.errors import ConfigError, UsageError
from cloudbackup.core.model import valid_name
from cloudbackup.sources.base import SourceSpec, redact_url
from cloudbackup.sources.registry import parse_spec
from cloudbackup.stream.age import parse_recipients

COMPRESSIONS = ("zstd", "gzip", "xz", "bzip2", "none")
LEVEL_RANGES = {"zstd": (1, 19), "gzip": (1, 9), "bzip2": (1, 9), "xz": (0, 9), "none": (0, 0)}
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6, "bzip2": 9, "xz": 6, "none": None}
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR")
SSE_MODES = ("AES256", "aws:kms")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_USER_TAGS = 7
MAX_PART_SIZE = 5 * 1024**3  # S3's largest part
MAX_LOCK_DAYS = 36500  # S3's longest Object Lock retention: 100 years
#: A .env file or a ``_FILE`` value larger than this is not one (a wrong path, a device).
MAX_TEXT_FILE = 1024 * 1024
_TAG_RE = re.compile(r"^[\w .:/=+\-@]{1,128}$")

PREFIX = "CLOUDBACKUP_"
FILE_FORM = "_FILE"
PER_SOURCE = "__"
_SUFFIX_RE = re.compile(r"[A-Z0-9_]+")


# ---------------------------------------------------------------- parsers (text -> value)


class Invalid(ValueError):
    """A value a parser refuses: ``reason`` says why, ``hint`` (optional) what to do."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


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


def shown(value: str, limit: int = 100) -> str:
    """``repr(value)``, cut short when long: an error line stays one readable line."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit])[:-1] + f"...' ({len(value)} characters)"


@dataclass(frozen=True)
class ObjectLock:
    mode: str  # "GOVERNANCE" | "COMPLIANCE"
    days: int

    def __str__(self) -> str:
        return f"{self.mode.lower()}:{self.days}d"


def _choice(*choices: str, fold: Callable[[str], str] = str.lower, why: str = "") -> Any:
    """A parser accepting one of ``choices`` (compared after ``fold``)."""

    def parse(text: str) -> str:
        value = fold(text.strip())
        if value not in choices:
            raise Invalid(why or "use " + ", ".join(choices))
        return value

    return parse


parse_storage_class = _choice(
    *STORAGE_CLASSES,
    fold=str.upper,
    why="only instant-read classes are supported: " + ", ".join(STORAGE_CLASSES),
)
parse_sse = _choice(*SSE_MODES, fold=str, why="use AES256 or aws:kms")
parse_log_level = _choice(*LOG_LEVELS, fold=str.upper)


def _whole(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A parser of a whole number between ``low`` and ``high`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            if len(text.strip()) > 30:
                raise ValueError("too many digits")
            number = int(text.strip())
        except ValueError:
            raise Invalid("not a whole number") from None
        if (low is not None and number < low) or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise Invalid(f"must be {bound}")
        return number

    return parse


def parse_flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise Invalid("use 1 or 0")


def parse_http_url(text: str) -> str:
    """An http(s) URL with a host (and a valid port, if any)."""
    value = text.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise Invalid(f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", value):
        raise Invalid("use an http(s)://host[:port] URL")
    return value


def parse_dest(text: str) -> Path:
    """A ``file://`` URL of an absolute local path (``file:///mnt/nas/backups``)."""
    value = text.strip()
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise Invalid(f"not a URL ({exc})") from None
    if parts.scheme != "file":
        raise Invalid("only file:// URLs are supported (file:///mnt/nas/backups)")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise Invalid("use file:///absolute/path (no host, query or fragment)")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise Invalid("use file:///absolute/path")
    clean = Path(os.path.normpath(path))
    if clean == Path("/") or ".." in Path(path).parts:
        raise Invalid("name a directory below / (without ..)")
    return clean


def parse_ping_url(text: str) -> str:
    return parse_http_url(text.strip().rstrip("/"))


# A comma separates two targets only when a URL follows it, so ``?to=a@x.org,b@x.org`` stays whole.
_TARGET_SPLIT_RE = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
NOTIFY_ON = ("failure", "warning", "always")


def parse_notify_targets(text: str | None) -> tuple[str, ...]:
    """The Apprise URLs in ``CLOUDBACKUP_NOTIFY``: one per line, or comma-separated.

    A comma splits only where another URL (``scheme://``) follows, so a URL's own commas
    (``mailto://...?to=a@example.org,b@example.org``) stay in it. Blank lines and lines
    starting with ``#`` (in a ``CLOUDBACKUP_NOTIFY_FILE``) are ignored, duplicates dropped.
    Whether Apprise can use them is checked at start-up (``ops.notify.validate``).
    """
    targets: list[str] = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in _TARGET_SPLIT_RE.split(line):
            part = part.strip().rstrip(",").strip()
            if part and part not in targets:
                targets.append(part)
    return tuple(targets)


def parse_command_line(text: str) -> str | None:
    """A hook's shell command line (``/bin/sh -c``); blank is unset."""
    return text.strip() or None


def parse_hook_timeout(text: str) -> float:
    """A duration (``90s``, ``10m``, ``1h``) in seconds, at least one second."""
    try:
        seconds = retention.Duration.parse(text.strip()).delta.total_seconds()
    except ConfigError as exc:
        raise Invalid(exc.message, exc.hint) from None
    if seconds < 1:
        raise Invalid(f"{text.strip()!r} is too short", "give at least 1s, e.g. 10m")
    return seconds


def parse_absolute_path(text: str) -> Path:
    path = Path(text.strip()).expanduser()
    if not path.is_absolute():
        raise Invalid("use an absolute path")
    return path


def parse_host(text: str) -> str:
    host = text.strip()
    if not valid_name(host) or host.startswith("."):
        raise Invalid("use letters, digits, '.', '_' or '-'")
    return host


def parse_compression(text: str) -> str:
    value = text.strip().lower()
    if value not in COMPRESSIONS:
        hint = " (zip is not supported: it loses Unix owners, modes and symlinks)"
        raise Invalid("choose one of " + ", ".join(COMPRESSIONS) + (hint if value == "zip" else ""))
    return value


def parse_bucket(text: str) -> str:
    bucket = text.strip()
    if (
        not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket)
        or ".." in bucket
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)
        or bucket.startswith("xn--")
    ):
        raise Invalid("not a valid S3 bucket name")
    return bucket


def parse_prefix(text: str) -> str:
    prefix = text.strip().strip("/")
    if prefix and not all(valid_name(part) for part in prefix.split("/")):
        raise Invalid("use letters, digits, '.', '_', '-' and '/'")
    return prefix


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d{1,30})\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{shown(text)} is not a size like 64MiB")
    unit = (match[2] or "B").upper().rstrip("B").rstrip("I")
    return int(match[1]) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]


def parse_part_size(text: str) -> int:
    size = parse_size(text)
    if size < 5 * 1024**2:
        raise Invalid("S3 parts are at least 5MiB")
    if size > MAX_PART_SIZE:
        raise Invalid("S3 parts are at most 5GiB")
    return size


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


@dataclass(frozen=True)
class FullEvery:
    """``CLOUDBACKUP_FULL_EVERY``: a duration (a full when the newest full is at least that
    old), a count ``N`` (a full after every ``N-1`` incrementals), or 0 (every backup full)."""

    count: int | None = None
    age: timedelta | None = None

    @property
    def always(self) -> bool:
        return self.count is not None and self.count <= 1

    def __str__(self) -> str:
        if self.age is not None:
            return retention.format_duration(self.age)
        return str(self.count)


def parse_full_every(text: str) -> FullEvery:
    clean = text.strip()
    if clean.isascii() and clean.isdigit():
        if len(clean) > 9:
            raise ValueError("the count is far too large")
        return FullEvery(count=int(clean))
    try:
        return FullEvery(age=retention.parse_duration(clean))
    except ConfigError:
        raise ValueError(
            "use a duration such as 7d, a count such as 7, or 0 (every backup full)"
        ) from None


def parse_policy(text: str) -> retention.Policy:
    try:
        return retention.parse_policy(text)
    except ConfigError as exc:
        raise Invalid(exc.message, exc.hint) from None
    except ValueError:  # a number too long for int() (over 4,300 digits)
        raise Invalid("a number in it is far too long") from None


def parse_patterns(text: str) -> tuple[str, ...]:
    return tuple(split_list(text))


class BadSpec(Invalid):
    """A source spec that does not parse; ``redacted`` is the spec as output may show it."""

    def __init__(self, redacted: str, reason: str) -> None:
        super().__init__(reason)
        self.redacted = redacted


def parse_sources(text: str | Sequence[str]) -> tuple[SourceSpec, ...]:
    """Source specs (a variable's text, or the command line's arguments), names unique."""
    specs: list[SourceSpec] = []
    for item in split_list(text) if isinstance(text, str) else text:
        try:
            specs.append(parse_spec(item))
        except ValueError as exc:
            raise BadSpec(redact_url(item), str(exc)) from None
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"two sources are named {spec.name!r}",
                "give one of them an explicit name, e.g. www2=/path",
            )
        seen.add(spec.name)
    return tuple(specs)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Given:
    """A value as given: its text and where it came from (for error messages)."""

    name: str
    text: str
    where: str


@dataclass(frozen=True)
class Variable:
    """One row of the table: a variable, how it is read, and how it is documented."""

    name: str
    #: The :class:`Settings` field it sets.
    field: str
    #: text -> value; raises ValueError (or :class:`Invalid`) with a reason a person can act on.
    parse: Callable[[str], Any]
    #: The default as text (parsed by ``parse``); None: unset (the field's value is None or
    #: ``empty``, or a rule of :func:`load` decides it from the machine).
    default: str | None
    #: One line for the README (Markdown).
    doc: str
    #: The README's default column, when it is not ``default`` itself.
    shown_default: str | None = None
    #: A tuning knob (its own README table, not in ``.env.example``) vs a user-facing one.
    tuning: bool = False
    #: May be set per source (``NAME__<SOURCE>``; :meth:`Settings.for_source`).
    per_source: bool = False
    #: Its value never appears in an error message.
    secret: bool = False
    #: The value when unset and there is no default.
    empty: Any = None
    #: An empty value is parsed (``""`` is a policy that keeps everything, a prefix of none)
    #: instead of meaning "unset".
    empty_is_value: bool = False
    #: ``.env.example``: the comment above the line (default: ``doc``), the example value,
    #: and whether the line is active or commented out.
    note: str | None = None
    example: str = ""
    example_on: bool = False

    @property
    def default_value(self) -> Any:
        return self.empty if self.default is None else self.parse(self.default)

    def invalid(self, given: Given, exc: ValueError) -> ConfigError:
        """The error for a value it refuses: naming the variable, where the value came
        from and (unless secret) the value — a URL's password redacted — and why."""
        value = "" if self.secret else f"={shown(redact_url(given.text))}"
        hint = exc.hint if isinstance(exc, Invalid) else None
        return ConfigError(f"{given.name}{value} ({given.where}) is invalid: {exc}", hint)


class SourcesVariable(Variable):
    """``CLOUDBACKUP_SOURCES``: the spec that does not parse is named, redacted."""

    def invalid(self, given: Given, exc: ValueError) -> ConfigError:
        if isinstance(exc, BadSpec):
            where = f"{given.name}, {given.where}"
            return ConfigError(f"source {exc.redacted!r} ({where}) is invalid: {exc}")
        return super().invalid(given, exc)


_SPECS_NOTE = """What to back up: newline-separated specs (or commas outside {...}).
  /srv/www                                  a directory (name: www)
  conf=/opt/app/config/**/*.{yaml,json}      a glob (needs a name)
  sqlite:///var/lib/app/app.db               a SQLite database (online copy)
  postgresql://backup@localhost:5432/shop    a PostgreSQL database (pg_dump -Fc)
  shop=cmd:mysqldump --single-transaction shop   a command's output"""

# The table: one row per variable, in the order of the README. Each row: name, field,
# parser, default (text), doc; then how it is shown and what more it is.
VARIABLES: tuple[Variable, ...] = (
    SourcesVariable(
        "CLOUDBACKUP_SOURCES", "sources", parse_sources, None,
        "source specs (newline-separated, or commas outside `{}`)",
        shown_default="required for `backup`/`run` without arguments", secret=True, empty=(),
        note=_SPECS_NOTE, example='"/srv/www\nsqlite:///var/lib/app/app.db"', example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_EXCLUDE", "exclude", parse_patterns, None,
        "exclude globs, same separators (`*.tmp`, `node_modules`, `**/cache/**`)",
        shown_default="none", per_source=True, empty=(),
        note="Exclude globs (same separators): a bare name matches at any depth, a path "
        "with / from the root.",
        example="*.tmp,node_modules,**/cache/**", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_LOCAL_DIR", "local_dir", parse_absolute_path, None,
        "where archives are kept",
        shown_default="`$XDG_DATA_HOME/cloudbackup` or `~/.local/share/cloudbackup`",
        example="/var/backups/cloudbackup", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_HOST", "host", parse_host, None,
        "host name used in paths",
        shown_default="hostname", example="web1",
    ),
    Variable(
        "CLOUDBACKUP_COMPRESSION", "compression", parse_compression, "zstd",
        "`zstd` \\| `gzip` \\| `xz` \\| `bzip2` \\| `none`",
        per_source=True, example="zstd", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_COMPRESSION_LEVEL", "compression_level", _whole(), None,
        "zstd 1–19, gzip/bzip2 1–9, xz 0–9; a source with a codec of its own takes that "
        "codec's default unless it sets a level too",
        shown_default="zstd 3, gzip 6, bzip2 9, xz 6", per_source=True,
        note="A level in the codec's range: zstd 1-19, gzip/bzip2 1-9, xz 0-9.", example="3",
    ),
    Variable(
        "CLOUDBACKUP_S3_BUCKET", "s3_bucket", parse_bucket, None,
        "bucket; unset: `backup` is local-only, `run` refuses unless `CLOUDBACKUP_LOCAL_ONLY=1`",
        example="my-backups", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_DEST", "dest", parse_dest, None,
        "a directory destination instead of a bucket (a mounted NAS, a USB disk): "
        "`file:///mnt/nas/backups`; excludes `CLOUDBACKUP_S3_BUCKET`",
        shown_default="unset", example="file:///mnt/nas/backups",
    ),
    Variable(
        "CLOUDBACKUP_LOCAL_ONLY", "local_only", parse_flag, "0",
        "`1`: no offsite copy is intended",
        shown_default="unset", example="1",
    ),
    Variable(
        "CLOUDBACKUP_S3_PREFIX", "s3_prefix", parse_prefix, "cloudbackup",
        "key prefix",
        empty_is_value=True, example="cloudbackup", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_ENDPOINT_URL", "s3_endpoint_url", parse_http_url, None,
        "S3-compatible endpoint (MinIO, R2, B2, moto); path-style addressing is used with "
        "an endpoint",
        shown_default="AWS", example="http://127.0.0.1:9000",
    ),
    Variable(
        "CLOUDBACKUP_S3_STORAGE_CLASS", "s3_storage_class", parse_storage_class, "STANDARD",
        "`STANDARD`, `STANDARD_IA`, `ONEZONE_IA`, `INTELLIGENT_TIERING`, `GLACIER_IR` "
        "(archives only; manifests stay `STANDARD`)",
        example="STANDARD",
    ),
    Variable(
        "CLOUDBACKUP_S3_COMPAT", "s3_compat", parse_flag, "0",
        "`1` for stores that reject newer S3 features: checksums only when required, no "
        "tagging",
        shown_default="unset", example="1",
    ),
    Variable(
        "CLOUDBACKUP_S3_SSE", "s3_sse", parse_sse, None,
        "server-side encryption: `AES256` \\| `aws:kms`",
        shown_default="bucket default", example="aws:kms",
    ),
    Variable(
        "CLOUDBACKUP_S3_KMS_KEY_ID", "s3_kms_key_id", str.strip, None,
        "KMS key id or ARN for `aws:kms`",
        shown_default="bucket default", example="arn:aws:kms:eu-west-1:111122223333:key/...",
    ),
    Variable(
        "CLOUDBACKUP_S3_OBJECT_LOCK", "s3_object_lock", parse_object_lock, None,
        "`governance:30d` / `compliance:90d`: WORM retention on archive and manifest",
        shown_default="off", example="governance:30d",
    ),
    Variable(
        "CLOUDBACKUP_S3_TAGS", "s3_tags", parse_tags, None,
        "extra tags on archives `k=v,k2=v2` (at most 7)",
        shown_default="none", empty=(), example="team=ops,env=prod",
    ),
    Variable(
        "CLOUDBACKUP_AGE_RECIPIENTS", "age_recipients", parse_recipients, None,
        "age public keys (`age1...`, comma/newline separated; `#` comments): archives and "
        "indexes are encrypted to them; `CLOUDBACKUP_AGE_RECIPIENTS_FILE` names a file of them, "
        "one per line. The host that backs up needs no secret key",
        shown_default="unset (no encryption)", empty=(),
        note="Encrypt archives with age to these public keys (age1..., from `cloudbackup key "
        "generate`); or CLOUDBACKUP_AGE_RECIPIENTS_FILE=/etc/cloudbackup/recipients.txt.",
        example="age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
    ),
    Variable(
        "CLOUDBACKUP_AGE_IDENTITY_FILE", "age_identity_file", parse_absolute_path, None,
        "age identity file (`AGE-SECRET-KEY-1...`), needed only to restore, `verify --deep` "
        "or read an index of encrypted backups; keep it off the host that backs up",
        shown_default="unset",
        note="Only where backups are restored (not on the server that backs up): the age "
        "identity file (mode 0600).",
        example="/root/cloudbackup-key.txt",
    ),
    Variable(
        "CLOUDBACKUP_LOCAL_RETENTION", "local_retention", parse_policy, "last=3",
        "retention policy for local copies (keys `last`, `hourly`, `daily`, `weekly`, "
        "`monthly`, `yearly`, `within`, `min`)",
        per_source=True, empty_is_value=True, example="last=3", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_REMOTE_RETENTION", "remote_retention", parse_policy, None,
        "retention policy for the offsite copies; unset: `run` does not prune them (a "
        "writer-only host; prune from a pruner job)",
        per_source=True, empty_is_value=True,
        example="daily=7,weekly=4,monthly=12", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_SHRINK_GUARD", "shrink_guard", parse_shrink_guard, "50%",
        "refuse a source that is empty, shrank by more than this, or moved filesystem "
        "(`off` to disable)",
        per_source=True, example="50%", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_FULL_EVERY", "full_every", parse_full_every, "7d",
        "directory and glob sources: a full backup when the newest full is this old (`7d`), "
        "after every `N-1` incrementals (`N`), or always (`0`)",
        per_source=True, example="7d",
    ),
    Variable(
        "CLOUDBACKUP_INCREMENTAL_IGNORE_INODE", "incremental_ignore_inode", parse_flag, "0",
        "`1`: change detection ignores inode numbers (NFS, overlayfs: not stable)",
        shown_default="unset", per_source=True, example="1",
    ),
    Variable(
        "CLOUDBACKUP_RETRY_ATTEMPTS", "retry_attempts", _whole(1, 100), "5",
        "attempts per S3 operation (transient errors only)",
        example="5", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_PING_URL", "ping_url", parse_ping_url, None,
        "healthchecks-style URL pinged by `run`: `/start`, success, `/fail`",
        example="https://hc-ping.com/your-uuid",
    ),
    Variable(
        "CLOUDBACKUP_NOTIFY", "notify", parse_notify_targets, None,
        "Apprise URLs notified after `run` (newline- or comma-separated): `mailtos://`, "
        "`ntfys://`, `slack://`, `json://` webhooks...; checked at start-up",
        shown_default="none", secret=True, empty=(),
        note="Where `run` sends its notification (Apprise URLs, newline- or comma-separated; "
        "they may hold passwords: keep this file 0600).",
        example="mailtos://user:password@smtp.example.org?to=ops@example.org",
    ),
    Variable(
        "CLOUDBACKUP_NOTIFY_ON", "notify_on", _choice(*NOTIFY_ON), "failure",
        "`failure` \\| `warning` (failures and warnings) \\| `always`",
        example="failure",
    ),
    Variable(
        "CLOUDBACKUP_BEFORE_RUN", "before_run", parse_command_line, None,
        "shell command line run before `run` backs up; failing, it stops the run",
        secret=True, example="systemctl stop app",
    ),
    Variable(
        "CLOUDBACKUP_AFTER_RUN", "after_run", parse_command_line, None,
        "shell command line run after every `run` (with `CLOUDBACKUP_RESULT`, "
        "`CLOUDBACKUP_EXIT_CODE`, `CLOUDBACKUP_SUMMARY`)",
        secret=True, example="systemctl start app",
    ),
    Variable(
        "CLOUDBACKUP_ON_FAILURE", "on_failure", parse_command_line, None,
        "shell command line run after a failed `run` (after `CLOUDBACKUP_AFTER_RUN`)",
        secret=True, example="/usr/local/bin/page-oncall cloudbackup",
    ),
    Variable(
        "CLOUDBACKUP_HOOK_TIMEOUT", "hook_timeout", parse_hook_timeout, "10m",
        "how long a hook may take (a duration); then its processes are killed",
        example="10m",
    ),
    Variable(
        "CLOUDBACKUP_LOG_FILE", "log_file", parse_absolute_path, None,
        "log file (rotated at 10 MiB, 5 kept)",
        shown_default="stderr only", example="/var/log/cloudbackup.log",
    ),
    Variable(
        "CLOUDBACKUP_LOG_LEVEL", "log_level", parse_log_level, "INFO",
        "`DEBUG` \\| `INFO` \\| `WARNING` \\| `ERROR`",
        example="INFO", example_on=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_PART_SIZE", "s3_part_size", parse_part_size, None,
        "multipart part size (e.g. `64MiB`), grown so an archive fits in 10,000 parts",
        shown_default="8 MiB", tuning=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_CONCURRENCY", "s3_concurrency", _whole(1, 64), "4",
        "parts sent (or, with `ranged`, fetched) at a time",
        tuning=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_ADDRESSING", "s3_addressing", _choice("auto", "path", "virtual"), "auto",
        "`auto` \\| `path` \\| `virtual`",
        tuning=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_DOWNLOAD", "s3_download", _choice("single", "ranged"), "single",
        "`single` streamed GET, or `ranged` parallel GETs for archives over 64 MiB",
        tuning=True,
    ),
    Variable(
        "CLOUDBACKUP_S3_UPLOAD", "s3_upload", _choice("stream", "after"), "stream",
        "`stream`: parts leave while the archive is written; `after`: archive first, then "
        "upload (every archive object with `sha256` metadata)",
        tuning=True,
    ),
)  # fmt: skip

ROWS: dict[str, Variable] = {row.name: row for row in VARIABLES}
BY_FIELD: dict[str, Variable] = {row.field: row for row in VARIABLES}
#: The variables of the README's main table and of ``.env.example``.
KNOWN_VARIABLES = tuple(row.name for row in VARIABLES if not row.tuning)
#: Tuning knobs: documented in the README's second table, not in the example.
EXTRA_VARIABLES = tuple(row.name for row in VARIABLES if row.tuning)


def _default(name: str) -> Any:
    """A :class:`Settings` field's default: its row's (the table is the one place)."""
    return BY_FIELD[name].default_value


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class Settings:
    sources: tuple[SourceSpec, ...] = _default("sources")
    exclude: tuple[str, ...] = _default("exclude")
    local_dir: Path
    host: str
    host_explicit: bool = False
    compression: str = _default("compression")
    compression_level: int | None = DEFAULT_LEVELS[_default("compression")]
    s3_bucket: str | None = _default("s3_bucket")
    #: A directory destination (``CLOUDBACKUP_DEST=file:///path``) instead of a bucket.
    dest: Path | None = _default("dest")
    local_only: bool = _default("local_only")
    s3_prefix: str = _default("s3_prefix")
    s3_endpoint_url: str | None = _default("s3_endpoint_url")
    s3_storage_class: str = _default("s3_storage_class")
    s3_compat: bool = _default("s3_compat")
    s3_sse: str | None = _default("s3_sse")
    s3_kms_key_id: str | None = _default("s3_kms_key_id")
    s3_object_lock: ObjectLock | None = _default("s3_object_lock")
    s3_tags: tuple[tuple[str, str], ...] = _default("s3_tags")
    s3_part_size: int | None = _default("s3_part_size")
    s3_concurrency: int = _default("s3_concurrency")
    s3_addressing: str = _default("s3_addressing")
    s3_download: str = _default("s3_download")
    s3_upload: str = _default("s3_upload")
    #: age recipients (public keys); empty: archives are not encrypted.
    age_recipients: tuple[str, ...] = _default("age_recipients")
    age_identity_file: Path | None = _default("age_identity_file")
    local_retention: retention.Policy = _default("local_retention")
    remote_retention: retention.Policy | None = _default("remote_retention")
    shrink_guard: float | None = _default("shrink_guard")
    full_every: FullEvery = _default("full_every")
    incremental_ignore_inode: bool = _default("incremental_ignore_inode")
    retry_attempts: int = _default("retry_attempts")
    ping_url: str | None = _default("ping_url")
    notify: tuple[str, ...] = _default("notify")
    notify_on: str = _default("notify_on")
    before_run: str | None = _default("before_run")
    after_run: str | None = _default("after_run")
    on_failure: str | None = _default("on_failure")
    hook_timeout: float = _default("hook_timeout")
    log_file: Path | None = _default("log_file")
    log_level: str = _default("log_level")
    env_file: Path | None = None
    warnings: tuple[str, ...] = ()
    #: Per-source values (``CLOUDBACKUP_<SETTING>__<SOURCE>``): source suffix -> field ->
    #: value, already resolved against the global values (see :meth:`for_source`).
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
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

    def only(self, names: Sequence[str]) -> Settings:
        """These configured sources only (``--source NAME``), in the order given; a name
        that is not configured is a usage error (exit 2)."""
        configured = {spec.name: spec for spec in self.sources}
        unknown = [name for name in names if name not in configured]
        if unknown:
            raise UsageError(
                f"no configured source named {', '.join(map(repr, unknown))}",
                "configured: " + (", ".join(configured) or "none (set CLOUDBACKUP_SOURCES)"),
            )
        chosen = tuple(configured[name] for name in dict.fromkeys(names))
        return dataclasses.replace(self, sources=chosen)

    def for_source(self, name: str) -> Settings:
        """The settings in effect for the source ``name``: its per-source values over the
        global ones (the command line's still win: they were applied when loading)."""
        values = self.overrides.get(source_suffix(name))
        return dataclasses.replace(self, **values) if values else self

    def overridden(self, field_name: str) -> bool:
        """Whether some source has its own value of ``field_name``."""
        return any(field_name in values for values in self.overrides.values())


def source_suffix(name: str) -> str:
    """The ``<SOURCE>`` of a per-source variable: the name upper-cased, ``-`` and ``.`` as ``_``."""
    return name.upper().replace("-", "_").replace(".", "_")


# ---------------------------------------------------------------- reading values


def read_text_file(path: Path, label: str) -> str:
    """A small UTF-8 text file (a .env file, a ``_FILE`` value). Anything else — missing,
    unreadable, a directory or device, over 1 MiB, holding a NUL byte, not UTF-8 — is a
    ConfigError (exit 2) naming ``label``; never a traceback."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the run (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist", "give the path of an existing file") from None
    except OSError as exc:
        raise ConfigError(
            f"{label} cannot be read: {exc.strerror or exc}", "check its permissions"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{label} is a directory", "give the path of a file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{label} is not a regular file", "give the path of a file")
        data = b""
        while len(data) <= MAX_TEXT_FILE and (chunk := os.read(fd, MAX_TEXT_FILE + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TEXT_FILE:
        raise ConfigError(f"{label} is larger than 1 MiB: not a settings file")
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ConfigError(f"{label} holds a NUL byte (line {line})", "it must be a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{label} is not valid UTF-8 (line {line})", "save it as UTF-8 text"
        ) from None


class Inputs:
    """The values given, by origin: command line > environment > .env file.

    In the environment and in the .env file, ``NAME_FILE=/path`` gives ``NAME`` the
    content of a file (trailing newlines removed); both forms in one place is an error.
    """

    def __init__(
        self,
        cli: Mapping[str, Any],
        environ: Mapping[str, str],
        dotenv: Mapping[str, str | None],
    ) -> None:
        self.cli = cli
        self.layers: tuple[tuple[str, Mapping[str, str]], ...] = (
            ("environment", environ),
            (".env file", {k: v for k, v in dotenv.items() if v is not None}),
        )

    def names(self) -> Iterator[tuple[str, str]]:
        """(name, origin) of every ``CLOUDBACKUP_*`` variable in the environment or .env."""
        for origin, values in self.layers:
            for name in sorted(values):
                if name.startswith(PREFIX):
                    yield name, origin

    def get(self, name: str, *, cli: bool = True) -> Given | None:
        value = self.cli.get(name) if cli else None
        if value is not None:
            return Given(name, str(value), "command line")
        for origin, values in self.layers:
            given = self._in(name, origin, values)
            if given is not None:
                return given
        return None

    def _in(self, name: str, origin: str, values: Mapping[str, str]) -> Given | None:
        file_var = name + FILE_FORM
        # An empty NAME_FILE is unset, as an empty value is; there is no LOG_FILE_FILE.
        path_text = "" if name.endswith(FILE_FORM) else values.get(file_var, "")
        if not path_text.strip():
            return Given(name, values[name], origin) if name in values else None
        if name in values:
            raise ConfigError(
                f"{name} and {file_var} are both set ({origin})", "set one of them"
            )
        path = Path(path_text.strip()).expanduser()
        if not path.is_absolute():
            raise ConfigError(
                f"{file_var}={shown(path_text)} ({origin}) is invalid: use an absolute path"
            )
        text = read_text_file(path, f"{file_var}={path} ({origin})")
        return Given(name, text.rstrip("\r\n"), f"{origin}, read from {path} by {file_var}")


def _value(row: Variable, given: Given | None) -> Any:
    """``given`` parsed by ``row`` (its default when not given or blank)."""
    if given is None or (not row.empty_is_value and not given.text.strip()):
        return row.default_value
    try:
        return row.parse(given.text)
    except ValueError as exc:
        raise row.invalid(given, exc) from None


def resolve_one(
    field_name: str,
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str | None],
) -> Any:
    """The value of one setting (a :class:`Settings` field), even when others are invalid
    (``run`` pings its failure URL for a configuration error); None when it is unset or
    itself invalid."""
    row = BY_FIELD[field_name]
    try:
        return _value(row, Inputs(cli, environ, dotenv).get(row.name))
    except (ConfigError, ValueError):
        return None


def command_line(
    *, sources: Sequence[str] | None = None, extra_exclude: Sequence[str] = (), **fields: Any
) -> dict[str, Any]:
    """The command line's values as :func:`load` takes them: options by :class:`Settings`
    field (``None``: not given), source arguments, and ``--exclude`` patterns."""
    given: dict[str, Any] = {BY_FIELD[name].name: value for name, value in fields.items()}
    return given | {"sources": list(sources or ()), "extra_exclude": list(extra_exclude)}


# ---------------------------------------------------------------- per-source values


def _classify(name: str) -> tuple[Variable, str] | None:
    """``(row, rest)`` for ``CLOUDBACKUP_<SETTING>__<rest>``; None for any other name.
    ConfigError when ``<SETTING>`` cannot be set per source."""
    base, sep, rest = name.partition(PER_SOURCE)
    if not sep or base not in ROWS:
        return None
    row = ROWS[base]
    if not row.per_source:
        per_source = ", ".join(r.name.removeprefix(PREFIX) for r in VARIABLES if r.per_source)
        raise ConfigError(
            f"{name}: {base} cannot be set per source",
            f"per-source settings: {per_source}",
        )
    return row, rest


def _known(name: str) -> bool:
    """A variable of the table, in any of its forms (per-source ones are checked apart)."""
    if name in ROWS:
        return True
    base = name.removesuffix(FILE_FORM)
    return base != name and base in ROWS and not base.endswith(FILE_FORM)


def _per_source_given(
    inputs: Inputs, suffixes: set[str] | None
) -> dict[tuple[str, str], Given]:
    """(field, source suffix) -> the per-source value given (environment over .env file).
    ``suffixes``: the configured sources' suffixes, when ``CLOUDBACKUP_SOURCES`` is in use."""
    found: dict[tuple[str, str], Given] = {}
    for origin, values in inputs.layers:
        here: dict[tuple[str, str], str] = {}
        for name in sorted(values):
            classified = _classify(name) if name.startswith(PREFIX) else None
            if classified is None:
                continue
            row, rest = classified
            suffix = _suffix_of(name, rest, suffixes)
            if not _SUFFIX_RE.fullmatch(suffix):
                raise ConfigError(
                    f"{name} ({origin}): {suffix!r} is not a source name as a variable "
                    "suffix",
                    "use the source name upper-cased, with '-' and '.' as '_'",
                )
            key = (row.field, suffix)
            if key in here:
                raise ConfigError(
                    f"{here[key]} and {name} are both set ({origin})", "set one of them"
                )
            here[key] = name
            if key not in found:
                variable = f"{row.name}{PER_SOURCE}{suffix}"
                given = inputs._in(variable, origin, values)
                assert given is not None
                found[key] = given
    return found


def _suffix_of(name: str, rest: str, suffixes: set[str] | None) -> str:
    """The source suffix of ``CLOUDBACKUP_<SETTING>__<rest>``: ``rest`` without ``_FILE``
    (the file form), unless ``rest`` itself names a configured source and the rest does not."""
    if not rest.endswith(FILE_FORM) or rest == FILE_FORM:
        return rest
    stem = rest.removesuffix(FILE_FORM)
    if suffixes is None or rest not in suffixes:
        return stem
    if stem in suffixes:
        raise ConfigError(
            f"{name} is ambiguous: sources map to both {stem} and {rest}",
            "rename one of the sources (NAME=spec)",
        )
    return rest


def _configured_suffixes(sources: Sequence[SourceSpec], origin: str) -> set[str]:
    """The suffixes of the configured sources; two sources on one suffix is an error."""
    suffixes: dict[str, str] = {}
    for spec in sources:
        suffix = source_suffix(spec.name)
        if suffix in suffixes:
            raise ConfigError(
                f"sources {suffixes[suffix]!r} and {spec.name!r} ({origin}) map to the same "
                f"per-source suffix {suffix}",
                "rename one of them (NAME=spec)",
            )
        suffixes[suffix] = spec.name
    return set(suffixes)


# ---------------------------------------------------------------- load


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
    for name, text in sorted(environ.items()):
        if name.startswith(PREFIX) and (error := _not_utf8(name, text)):
            raise error
    inputs = Inputs(cli, environ, dotenv)
    warnings = [
        f"unknown variable {shown(name)} ignored (check its spelling)"
        for name in sorted({name for name, _origin in inputs.names()})
        if not _known(name) and _classify(name) is None
    ]
    replaced = bool(cli.get("sources"))  # the command line's sources replace the variable's
    given = {
        row.field: None if replaced and row.field == "sources" else inputs.get(row.name)
        for row in VARIABLES
    }
    values = {row.field: _value(row, given[row.field]) for row in VARIABLES}
    if replaced:
        try:
            values["sources"] = parse_sources(cli["sources"])
        except BadSpec as exc:
            where = "command line"
            raise ConfigError(f"source {exc.redacted!r} ({where}) is invalid: {exc}") from None
    values["local_dir"] = values["local_dir"] or _default_local_dir(environ, home)
    values["host"] = values["host"] or _default_host(hostname)
    _set_level(values["compression"], given["compression_level"], values, inherited=None)
    _check_s3(values, given, warnings)
    values["exclude"] += tuple(cli.get("extra_exclude") or ())

    configured = given["sources"]
    suffixes = None
    if configured is not None and configured.text.strip():
        suffixes = _configured_suffixes(values["sources"], configured.where)
    overrides = _overrides(_per_source_given(inputs, suffixes), values, given, cli, suffixes)
    return Settings(
        **values,
        host_explicit=cli.get(BY_FIELD["host"].name) is not None,
        env_file=env_file,
        warnings=tuple(warnings),
        overrides=overrides,
        child_env=childenv.scrub(environ),
    )


def _not_utf8(name: str, value: str) -> ConfigError | None:
    """Bytes that are not UTF-8 reach Python as lone surrogates: refuse them by name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return ConfigError(
            f"{name} (environment) is not valid UTF-8: {shown(value)}",
            "write the value in UTF-8",
        )
    return None


def _default_local_dir(environ: Mapping[str, str], home: Path | None) -> Path:
    # The XDG spec: a relative XDG_DATA_HOME is invalid and ignored.
    xdg = environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "cloudbackup"
    if home is not None:
        return home / ".local" / "share" / "cloudbackup"
    raise ConfigError(
        f"no local dir: {BY_FIELD['local_dir'].name} is not set and this user has no home "
        "directory (HOME)",
        f"set {BY_FIELD['local_dir'].name} to an absolute path",
    )


def _default_host(hostname: str) -> str:
    row = BY_FIELD["host"]
    return str(_value(row, Given(row.name, hostname, "default: the hostname")))


def _set_level(
    codec: str, level: Given | None, values: dict[str, Any], *, inherited: int | None
) -> None:
    """The compression level in ``values`` for ``codec``: ``level`` (checked against the
    codec's range), else ``inherited``, else the codec's default; none for ``none``."""
    if codec == "none":
        values["compression_level"] = None
        return
    if level is None or not level.text.strip():
        values["compression_level"] = inherited if inherited is not None else DEFAULT_LEVELS[codec]
        return
    row = BY_FIELD["compression_level"]
    number = _value(row, level)
    low, high = LEVEL_RANGES[codec]
    if not low <= number <= high:
        raise row.invalid(level, Invalid(f"must be between {low} and {high}"))
    values["compression_level"] = number


def _check_s3(
    values: dict[str, Any], given: Mapping[str, Given | None], warnings: list[str]
) -> None:
    """The rules between the variables of the offsite copy."""
    bucket, local_only = BY_FIELD["s3_bucket"].name, BY_FIELD["local_only"].name
    dest, lock = BY_FIELD["dest"].name, BY_FIELD["s3_object_lock"].name
    if values["dest"] is not None and values["s3_bucket"]:
        raise ConfigError(
            f"{dest} and {bucket} are both set",
            "the offsite copy goes to one destination: unset one of them",
        )
    if values["dest"] is not None and values["s3_object_lock"] is not None:
        raise ConfigError(
            f"{lock} cannot be used with {dest}",
            "Object Lock is an S3 feature: a directory destination has no WORM retention",
        )
    if (values["s3_bucket"] or values["dest"] is not None) and values["local_only"]:
        warnings.append(f"{local_only}=1 is ignored: {bucket} is set, so copies go offsite")
    kms = given["s3_kms_key_id"]
    if values["s3_kms_key_id"] and values["s3_sse"] != "aws:kms":
        assert kms is not None
        only = f"only used with {BY_FIELD['s3_sse'].name}=aws:kms"
        raise BY_FIELD["s3_kms_key_id"].invalid(kms, Invalid(only))
    if values["s3_tags"] and values["s3_compat"]:
        warnings.append(
            f"{BY_FIELD['s3_tags'].name} is ignored with {BY_FIELD['s3_compat'].name}=1 "
            "(no tagging)"
        )


def _overrides(
    per_source: Mapping[tuple[str, str], Given],
    values: Mapping[str, Any],
    given: Mapping[str, Given | None],
    cli: Mapping[str, Any],
    suffixes: set[str] | None,
) -> dict[str, dict[str, Any]]:
    """source suffix -> field -> value: each source's own values, parsed like the global
    ones. A command-line option still wins; ``--exclude`` adds to a source's excludes; a
    source with a codec of its own takes that codec's default level unless it sets one."""
    by_suffix: dict[str, dict[str, Given]] = {}
    for (field_name, suffix), value in per_source.items():
        if suffixes is not None and suffix not in suffixes:
            raise ConfigError(
                f"{value.name} ({value.where}) names no source of {BY_FIELD['sources'].name}",
                "its sources as suffixes: " + (", ".join(sorted(suffixes)) or "none"),
            )
        by_suffix.setdefault(suffix, {})[field_name] = value
    on_cli = {name for name, value in given.items() if value and value.where == "command line"}
    overrides: dict[str, dict[str, Any]] = {}
    for suffix, fields in sorted(by_suffix.items()):
        own = {
            name: _value(BY_FIELD[name], value)
            for name, value in fields.items()
            if name != "compression_level" and name not in on_cli
        }
        if "exclude" in own:
            own["exclude"] += tuple(cli.get("extra_exclude") or ())
        codec = own.get("compression", values["compression"])
        if "compression_level" in fields or codec != values["compression"]:
            inherited = values["compression_level"] if codec == values["compression"] else None
            _set_level(codec, fields.get("compression_level"), own, inherited=inherited)
        if own:
            overrides[suffix] = own
    return overrides


# ---------------------------------------------------------------- documentation


ENV_EXAMPLE_HEADER = """\
# cloudbackup configuration (generated from cloudbackup/config.py by scripts/config-docs).
# Copy to /etc/cloudbackup.env (mode 0600) and point cron/systemd at it with
# `cloudbackup --env-file /etc/cloudbackup.env run`. Command-line options override the
# environment, which overrides this file. Credentials do NOT belong here: use an instance
# role, AWS_PROFILE or the standard AWS environment variables.
#
# Any variable may instead name a file holding its value: CLOUDBACKUP_X_FILE=/path (for
# secrets in a 0600 file or a systemd credential). Per-source settings override the global
# ones for one source: CLOUDBACKUP_<SETTING>__<SOURCE>, <SOURCE> being the source name
# upper-cased with - and . as _, e.g. CLOUDBACKUP_REMOTE_RETENTION__APP_DB=hourly=24,daily=7.
"""


def env_example() -> str:
    """``.env.example``: every user-facing variable with its note and an example line."""
    blocks = [ENV_EXAMPLE_HEADER]
    for row in VARIABLES:
        if row.tuning:
            continue
        note = row.note or _plain(row.doc[0].upper() + row.doc[1:]) + "."
        if row.per_source:
            note += f" Per source: {row.name}__<SOURCE>."
        lines = [
            f"# {part}".rstrip()
            for line in note.splitlines()
            for part in textwrap.wrap(line, 92) or [""]
        ]
        lines.append(f"{'' if row.example_on else '#'}{row.name}={row.example}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _plain(markdown: str) -> str:
    return markdown.replace("`", "").replace("\\|", "|")


def readme_tables() -> str:
    """The README's two tables of variables (user-facing, then tuning knobs)."""

    def table(rows: Sequence[Variable]) -> list[str]:
        lines = ["| variable | meaning | default | per source |", "|---|---|---|---|"]
        for row in rows:
            default = row.shown_default or (f"`{row.default}`" if row.default else "unset")
            per_source = "yes" if row.per_source else ""
            lines.append(f"| `{row.name}` | {row.doc} | {default} | {per_source} |")
        return lines

    main = table([row for row in VARIABLES if not row.tuning])
    knobs = table([row for row in VARIABLES if row.tuning])
    return "\n".join([*main, "", "Tuning knobs (not needed normally):", "", *knobs]) + "\n"


README_BEGIN = "<!-- variables: generated from cloudbackup/config.py by scripts/config-docs -->"
README_END = "<!-- variables: end -->"


def readme_with_tables(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`readme_tables`."""
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    end = readme.index(README_END)
    return readme[:start] + "\n" + readme_tables() + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cloudbackup.config --env-example | --readme-tables``: print one of them."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--env-example"]:
        sys.stdout.write(env_example())
        return 0
    if args == ["--readme-tables"]:
        sys.stdout.write(readme_tables())
        return 0
    sys.stderr.write("usage: python -m cloudbackup.config --env-example | --readme-tables\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
