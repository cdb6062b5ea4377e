"""What every kind of source shares: the ``Source`` base class, its context, parsed specs
and the redaction of the secrets a spec may hold.

A source yields ``FileEntry`` objects (the member name, the ``lstat`` and the directory
handle to open it through: see cloudbackup.fs.walk); the archive writer turns them into tar
members. Directory and glob sources walk by directory descriptor. Database and command
sources first spool a consistent copy into the local dir (never ``/tmp``) and yield that
file by path.
"""

from __future__ import annotations

import os
import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from cloudbackup.core.model import valid_name
from cloudbackup.core.patterns import PathMatcher, has_wildcard, split_glob
from cloudbackup.fs.walk import FileEntry

KINDS = ("directory", "glob", "sqlite", "postgresql", "command")
_NAMED_RE = re.compile(r"^([A-Za-z0-9._-]+)=(.+)$", re.DOTALL)


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


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ENCODE_HINT = (
    "URL-encode '@', '/', '?', '#' and '%' in the user name and password "
    "(%40, %2F, %3F, %23, %25)"
)


def secret_forms(secret: str) -> list[str]:
    """A secret as written and decoded, and URL-encoded as a person or a tool writes it:
    every form the log filter must replace."""
    decoded = unquote(secret)
    forms = (secret, decoded, quote(decoded, safe=""), quote(decoded))
    return [form for index, form in enumerate(forms) if form and form not in forms[:index]]


@dataclass(frozen=True)
class DbUrl:
    """``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?query]``, split once.

    The one parser of database URLs: the authority ends at the first ``/``, ``?`` or ``#``;
    the user part ends at the authority's LAST ``@`` (so a password may hold an unencoded
    ``@``) and the user name at its first ``:``; the password is everything in between.
    Fields stay as written (percent-encoded). An ``@`` after the authority, a ``#`` or a bad
    port is refused: each means a special character of the password was not encoded, and
    guessing would connect somewhere else or leave part of the password in plain sight.
    ``redacted`` and ``secrets`` come from these fields, so what is hidden is exactly what
    the connection uses (``cloudbackup.sources.pgtools.parse_url`` connects from the same value).
    """

    scheme: str
    user: str | None  # None: no user part (no "@")
    password: str | None = field(repr=False)  # None: no ":" in the user part
    hostport: str
    path: str  # "" or "/..."
    query: str  # without the "?"

    @classmethod
    def parse(cls, text: str) -> DbUrl:
        """Raise ValueError (whose message never holds the password) for what cannot be used."""
        match = _SCHEME_RE.match(text)  # at the start only
        if not match:
            raise ValueError("not a URL: use scheme://user@host:port/dbname")
        rest = text[match.end() :]
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        authority, tail = rest[:end], rest[end:]
        if "@" in tail or "#" in tail:
            raise ValueError(f"an '@' or '#' after the host: {_ENCODE_HINT}")
        userinfo, at, hostport = authority.rpartition("@")
        user = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            password = secret if colon else None
        path, _, query = tail.partition("?")
        url = cls(match[1], user, password, hostport, path, query)
        url.hosts()  # validates every host and port
        return url

    def hosts(self) -> tuple[str | None, str | None]:
        """``h1:5432,h2:5433`` (libpq's multi-host form) → ``("h1,h2", "5432,5433")``,
        decoded; None for no host / no port. ValueError for a bad port or bracket."""
        pairs = [_split_hostport(item) for item in self.hostport.split(",")]
        if len(pairs) == 1:
            return pairs[0]
        hosts = ",".join(host or "" for host, _port in pairs)
        ports = ",".join(port or "" for _host, port in pairs)
        return hosts or None, ports.strip(",") and ports or None

    def query_items(self) -> list[tuple[str, str, str]]:
        """``(decoded key, raw key, raw value)`` for every ``key=value`` of the query."""
        items = []
        for item in filter(None, self.query.split("&")):
            raw_key, _, raw_value = item.partition("=")
            items.append((unquote(raw_key), raw_key, raw_value))
        return items

    @property
    def redacted(self) -> str:
        """The URL with its password and every ``password``-like query value as ``***``."""
        text = f"{self.scheme}://"
        if self.user is not None:
            text += self.user + (":***" if self.password is not None else "") + "@"
        text += self.hostport + self.path
        if self.query:
            items = []
            for key, raw_key, raw_value in self.query_items():
                secret = "password" in key.lower()
                items.append(f"{raw_key}={'***' if secret else raw_value}")
            text += "?" + "&".join(items)
        return text

    @property
    def secrets(self) -> list[str]:
        """Every form of the password and of ``password``-like query values."""
        raw = [self.password] if self.password else []
        raw += [value for key, _raw_key, value in self.query_items() if "password" in key.lower()]
        found: list[str] = []
        for secret in raw:
            found += [form for form in secret_forms(secret) if form not in found]
        return found


def _split_hostport(text: str) -> tuple[str | None, str | None]:
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        if end < 0:
            raise ValueError("bad host: unbalanced '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("bad host: text after ']'")
        port = rest[1:] or None
    else:
        raw_host, sep, raw_port = text.rpartition(":")
        host, port = (unquote(raw_host), raw_port or None) if sep else (unquote(text), None)
    if port is not None and not _PORT_RE.fullmatch(port):
        raise ValueError(f"bad port (or an unencoded character in the password): {_ENCODE_HINT}")
    return host or None, port


def redact_url(text: str) -> str:
    """Any text holding a URL (a spec, a restore target), with the password hidden.

    A URL that parses is redacted from its parsed value (:attr:`DbUrl.redacted`); one that
    does not is cut after its host's first characters whenever it could hold a secret (an
    ``@`` or a ``password``), since where its password ends cannot be known.
    """
    scheme = _SCHEME_RE.search(text)
    if scheme is None:
        return text
    try:
        return text[: scheme.start()] + DbUrl.parse(text[scheme.start() :]).redacted
    except ValueError:
        pass
    if "@" not in text and "password" not in unquote(text).lower():
        return text
    return re.sub(r"(://[^:@/?#\s]*).*", r"\1***", text, count=1, flags=re.DOTALL)


def url_secrets(url: str) -> list[str]:
    """Every form of the secrets in a URL, raw and URL-encoded, for the log filter."""
    try:
        return DbUrl.parse(url).secrets
    except ValueError:
        return []


@dataclass(frozen=True)
class SourceSpec:
    """One parsed source spec. ``spec`` may hold a password: use ``redacted`` for output."""

    name: str
    kind: str
    spec: str = field(repr=False)

    @property
    def url(self) -> DbUrl | None:
        """The parsed URL of a database source (the one value connection and redaction use)."""
        return DbUrl.parse(self.spec) if self.kind == "postgresql" else None

    @property
    def redacted(self) -> str:
        url = self.url
        return url.redacted if url is not None else self.spec

    @property
    def secrets(self) -> list[str]:
        url = self.url
        return url.secrets if url is not None else []

    def __repr__(self) -> str:
        return f"SourceSpec(name={self.name!r}, kind={self.kind!r}, spec={self.redacted!r})"


def parse_spec(text: str) -> SourceSpec:
    """Parse ``[name=]spec``; raise ValueError with a reason a person can act on."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty source spec")
    name: str | None = None
    match = _NAMED_RE.match(raw)
    if match and not raw.startswith(("/", "sqlite:", "postgres:", "postgresql:", "cmd:")):
        name, raw = match[1], match[2].strip()
    if raw.startswith("sqlite:"):
        path = raw[len("sqlite://") :] if raw.startswith("sqlite://") else ""
        if not path.startswith("/"):
            raise ValueError("use sqlite:///absolute/path/to/file.db")
        kind = "sqlite"
        default = Path(path).stem
    elif raw.startswith(("postgresql://", "postgres://")):
        if re.search(r"\s", raw):
            raise ValueError("a PostgreSQL URL cannot contain spaces (URL-encode them as %20)")
        url = DbUrl.parse(raw)  # its ValueError says what to encode, never the password
        dbname = unquote(url.path.lstrip("/"))
        if not dbname:
            raise ValueError("the URL names no database: use postgresql://user@host:5432/dbname")
        kind = "postgresql"
        default = dbname
    elif raw.startswith("cmd:"):
        try:
            argv = shlex.split(raw[4:])
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not argv:
            raise ValueError("cmd: needs a command, e.g. shop=cmd:mysqldump shop")
        if name is None:
            raise ValueError("a command source needs a name: NAME=cmd:...")
        kind, default = "command", ""
    elif has_wildcard(raw):
        if name is None:
            raise ValueError("a glob source needs a name: NAME=/path/**/*.conf")
        try:
            split_glob(raw)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        kind, default = "glob", ""
    else:
        if "://" in raw:
            raise ValueError(
                "unknown scheme; use a path, sqlite:///..., postgresql://... or cmd:..."
            )
        kind = "directory"
        default = os.path.basename(os.path.normpath(raw))
    name = name or default
    if not valid_name(name):
        raise ValueError(
            f"source name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(give one with NAME=spec)"
        )
    return SourceSpec(name=name, kind=kind, spec=raw)


Warn = Callable[[str, str], None]
"""(category, message); categories: vanished, unreadable, skipped (and the writer's changed)."""


@dataclass
class SourceContext:
    """What a source needs from the run: where to spool, what to skip, where to warn."""

    spool_dir: Path
    backup_id: str
    exclude: PathMatcher
    skip_inodes: frozenset[tuple[int, int]]
    warn: Warn
    log: Callable[[str], None] = lambda message: None


class Source(ABC):
    """Base of every source kind: each kind says how to check itself and what to archive."""

    kind = ""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.name = spec.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.redacted!r})"

    def root_device(self) -> int | None:
        return None

    @property
    def real_path(self) -> str | None:
        return None

    @abstractmethod
    def check(self) -> str:
        """Raise SourceError when the source cannot be backed up; return a detail line."""

    @abstractmethod
    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        """What to archive, in order; spool files are cleaned up when the iterator closes."""


