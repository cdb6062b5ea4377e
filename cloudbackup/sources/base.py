"""What every kind of source shares: the ``Source`` base class, its context, parsed specs
and the redaction of the secrets a spec may hold.

A source yields ``FileEntry`` objects (the member name, the ``lstat`` and the directory
handle to open it through: see cloudbackup.fs.walk); the archive writer turns them into tar
members. Directory and glob sources walk by directory descriptor. Database and command
sources first spool a consistent copy into the local dir (never ``/tmp``) and yield that
file by path.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from cloudbackup.core import childenv
from cloudbackup.core.model import MemberSchema
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.fs.walk import FileEntry

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
    """One parsed source spec (see ``cloudbackup.sources.registry.parse_spec``). ``spec`` may
    hold a password: ``redacted`` is what output shows, ``secrets`` what the log filter
    hides; both come from the kind, which alone knows where a secret can be."""

    name: str
    kind: str
    spec: str = field(repr=False)
    redacted: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.redacted:
            object.__setattr__(self, "redacted", self.spec)

    def __repr__(self) -> str:
        return f"SourceSpec(name={self.name!r}, kind={self.kind!r}, spec={self.redacted!r})"


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


class RestoreAs(enum.Enum):
    """How a backup of a kind is restored; ``cloudbackup.restore.targets`` has one target
    for each (the source class declares which: restore needs no kind names)."""

    TREE = "tree"  # a directory: --to DIR
    FILE = "file"  # one file: --to FILE, or --to - (stdout)
    SQLITE = "sqlite"  # a SQLite database file: --to FILE, checked, the old one kept aside
    POSTGRESQL = "postgresql"  # a database: --to postgresql://...


#: What a source yields to the archive writer; the generator's return value is the member
#: facts its manifest records (the dump's name and versions...), known once it is read.
Entries = Generator[FileEntry, None, dict[str, Any]]


class EntryStream:
    """The entries of one source, for the writer; ``members`` holds the facts the source
    returned once they were all read (None until then)."""

    def __init__(self, entries: Entries) -> None:
        self._entries = entries
        self.members: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[FileEntry]:
        self.members = yield from self._entries


class Source(ABC):
    """Base of every kind of source: it owns everything that differs by kind.

    The class says how a spec is recognised and named (:meth:`claims`, :meth:`parse`), what
    of it is secret, what its manifest records about its members (``member_schema``), how
    it is restored (``restore_as``, :meth:`restore_member`), what the shrink guard
    compares, whether the writer may read ahead and whether it can chain. An instance
    checks itself and yields its entries. A new kind is one module defining a subclass and
    one line in ``cloudbackup.sources.registry``.
    """

    kind: ClassVar[str] = ""
    #: A spec starting with one of these is never read as ``NAME=spec`` (``cmd:a=b``).
    scheme_prefixes: ClassVar[tuple[str, ...]] = ()
    #: The member facts its manifest records, checked when a manifest is read back.
    member_schema: ClassVar[MemberSchema] = {}
    restore_as: ClassVar[RestoreAs] = RestoreAs.TREE
    #: The shrink guard compares file counts as well as bytes (a tree); else bytes only.
    counts_files: ClassVar[bool] = False
    #: Its entries stay valid once the next one is asked for (files in place, not a spool
    #: removed after its entry): the writer may read ahead of them.
    prefetch: ClassVar[bool] = False
    #: Backed up as incremental chains (SPEC "Incremental archives"): trees only.
    chain_capable: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def claims(cls, raw: str) -> bool:
        """True when ``raw`` (a spec without its ``NAME=``) is of this kind. The registry
        asks the kinds in its order; the last one takes whatever is left."""

    @classmethod
    @abstractmethod
    def parse(cls, raw: str, name: str | None) -> str:
        """Check ``raw`` (``name``: the ``NAME=`` given, if any); return the default name.
        Raise ValueError with a reason a person can act on (never holding a secret)."""

    @classmethod
    def redact(cls, raw: str) -> str:
        """``raw`` as output may show it."""
        return raw

    @classmethod
    def secrets_of(cls, raw: str) -> tuple[str, ...]:
        """Every form of every secret in ``raw``, for the log filter."""
        return ()

    @classmethod
    def restore_member(cls, source: str, members: Mapping[str, Any]) -> str | None:
        """The member a single-file restore hands on (``restore_as`` other than TREE), named
        after the source name the key says or a plain name the parsed manifest holds, never
        after a path; None when the manifest does not say."""
        return None

    def __init__(self, spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> None:
        self.spec = spec
        self.name = spec.name
        #: The base environment of the programs a source runs (``Settings.child_env``).
        self.env = env

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.redacted!r})"

    def root_device(self) -> int | None:
        """The device of the source's root (the shrink guard notices an unmounted one)."""
        return None

    @property
    def real_path(self) -> str | None:
        """The real path a directory source resolved to (recorded in the manifest)."""
        return None

    @abstractmethod
    def check(self) -> str:
        """Raise SourceError when the source cannot be backed up; return a detail line."""

    @abstractmethod
    def entries(self, ctx: SourceContext) -> Entries:
        """What to archive, in order; spool files are cleaned up when the generator ends.
        Returns the member facts for the manifest."""

    def survey(self, ctx: SourceContext) -> tuple[int, int] | None:
        """Files and bytes that would be archived, found without reading data or running
        anything (``backup --dry-run``); None when that cannot be known without running it."""
        return None
