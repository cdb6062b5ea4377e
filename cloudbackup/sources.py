"""Source specs and the entries each kind of source feeds to the archive writer.

A source yields ``FileEntry`` objects (a path on disk, the member name it gets in the
archive and its ``lstat``); the archive writer turns them into tar members. Database and
command sources first spool a consistent copy into the local dir (never ``/tmp``) and
yield that file.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from cloudbackup.errors import SourceError
from cloudbackup.model import valid_name
from cloudbackup.patterns import PathMatcher, compile_glob, has_wildcard, split_glob

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


def redact_url(text: str) -> str:
    """Replace URL passwords (``user:pw@``) and ``password=`` values with ``***``.

    Works on any text (no URL parsing, which may fail on the very input being reported).
    """
    text = re.sub(r"(://[^/@\s:]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)


def url_secrets(url: str) -> list[str]:
    """Every form of the secrets in a URL, raw and URL-encoded, for the log filter."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return found
    raw = []
    if parts.password:
        raw.append(parts.password)
    for match in re.finditer(r"(?i)password=([^&]*)", parts.query):
        raw.append(match[1])
    for secret in raw:
        for form in {secret, unquote(secret), quote(unquote(secret), safe="")}:
            if form and form not in found:
                found.append(form)
    return found


@dataclass(frozen=True)
class SourceSpec:
    """One parsed source spec. ``spec`` may hold a password: use ``redacted`` for output."""

    name: str
    kind: str
    spec: str = field(repr=False)

    @property
    def redacted(self) -> str:
        if self.kind == "postgresql":
            return redact_url(self.spec)
        return self.spec

    @property
    def secrets(self) -> list[str]:
        return url_secrets(self.spec) if self.kind == "postgresql" else []

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
        try:
            parts = urlsplit(raw)
        except ValueError:
            raise ValueError(f"cannot parse {redact_url(raw)!r} as a URL") from None
        dbname = unquote(parts.path.lstrip("/"))
        if not dbname:
            raise ValueError("the URL names no database: use postgresql://user@host:5432/dbname")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"bad port in {redact_url(raw)!r}") from None
        if "\n" in raw or " " in raw:
            raise ValueError("a PostgreSQL URL cannot contain spaces")
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


@dataclass(frozen=True)
class FileEntry:
    """A filesystem object to archive: its path, member name and ``lstat``."""

    path: str
    arcname: str
    st: os.stat_result


Warn = Callable[[str, str], None]  # (category, message); categories: vanished, unreadable, skipped


@dataclass
class SourceContext:
    """What a source needs from the run: where to spool, what to skip, where to warn."""

    spool_dir: Path
    backup_id: str
    exclude: PathMatcher
    skip_inodes: frozenset[tuple[int, int]]
    warn: Warn
    log: Callable[[str], None] = lambda message: None


def _is_special(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def walk_tree(
    root: str,
    ctx: SourceContext,
    *,
    select: Callable[[str], bool] | None = None,
) -> Iterator[FileEntry]:
    """Depth-first, sorted, never following symlinks. ``select`` filters non-directories
    (glob sources); parent directories of selected entries are emitted before them."""
    visited: set[tuple[int, int]] = set()
    try:
        root_st = os.stat(root)
    except FileNotFoundError:
        raise SourceError(
            f"source path {root} does not exist", "check the path or the mount"
        ) from None
    except PermissionError:
        raise SourceError(
            f"source path {root} is not readable", "run as a user who can read it"
        ) from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise SourceError(f"source path {root} is not a directory", "give a directory or a glob")
    visited.add((root_st.st_dev, root_st.st_ino))
    pending_dirs: list[FileEntry] = []  # glob mode: parents not yet emitted

    def scan(directory: str, rel: str) -> Iterator[FileEntry]:
        try:
            with os.scandir(directory) as it:
                names = sorted(entry.name for entry in it)
        except FileNotFoundError:
            ctx.warn("vanished", f"{directory}: vanished while reading")
            return
        except OSError as exc:
            ctx.warn("unreadable", f"{directory}: cannot list directory ({exc.strerror})")
            return
        for name in names:
            path = os.path.join(directory, name)
            arcname = f"{rel}/{name}" if rel else name
            if ctx.exclude and ctx.exclude.matches(arcname):
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                ctx.warn("vanished", f"{path}: vanished while reading")
                continue
            except OSError as exc:
                ctx.warn("unreadable", f"{path}: cannot stat ({exc.strerror})")
                continue
            if (st.st_dev, st.st_ino) in ctx.skip_inodes:
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in visited:
                    ctx.warn("skipped", f"{path}: directory loop (bind mount?) skipped")
                    continue
                visited.add((st.st_dev, st.st_ino))
                entry = FileEntry(path, arcname, st)
                if select is None:
                    yield entry
                    yield from scan(path, arcname)
                else:
                    pending_dirs.append(entry)
                    depth = len(pending_dirs)
                    yield from scan(path, arcname)
                    del pending_dirs[depth - 1 :]
            elif _is_special(st.st_mode):
                ctx.warn("skipped", f"{path}: {_kind_name(st.st_mode)} skipped")
            else:
                if select is not None:
                    if not select(arcname):
                        continue
                    yield from pending_dirs
                    pending_dirs.clear()
                yield FileEntry(path, arcname, st)

    # In glob mode, parents are emitted lazily: a cleared entry must not be re-emitted,
    # so ``pending_dirs`` only ever holds the not-yet-emitted tail of the current path.
    yield from scan(root, "")


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


class DirectorySource(Source):
    kind = "directory"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        # A top-level symlink is resolved once; the real path is recorded in the manifest.
        self.root = os.path.realpath(spec.spec)

    @property
    def real_path(self) -> str:
        return self.root

    def root_device(self) -> int | None:
        try:
            return os.stat(self.root).st_dev
        except OSError:
            return None

    def check(self) -> str:
        root = self.root
        if not os.path.exists(root):
            raise SourceError(
                f"source {self.name}: {self.spec.spec} does not exist", "check the path"
            )
        if not os.path.isdir(root):
            raise SourceError(f"source {self.name}: {root} is not a directory", "give a directory")
        if not os.access(root, os.R_OK | os.X_OK):
            raise SourceError(f"source {self.name}: {root} is not readable", "fix its permissions")
        return f"directory {root}"

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        yield from walk_tree(self.root, ctx)


class GlobSource(Source):
    kind = "glob"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self.base, self.pattern = split_glob(spec.spec)
        self.regex = compile_glob(self.pattern)

    def root_device(self) -> int | None:
        try:
            return os.stat(os.path.realpath(self.base)).st_dev
        except OSError:
            return None

    def check(self) -> str:
        if not os.path.isdir(self.base):
            raise SourceError(
                f"source {self.name}: {self.base} does not exist", "check the glob's directory"
            )
        return f"glob {self.pattern} under {self.base}"

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        yield from walk_tree(
            os.path.realpath(self.base), ctx, select=lambda rel: bool(self.regex.fullmatch(rel))
        )


def make_source(spec: SourceSpec) -> Source:
    from cloudbackup import dbsources  # database and command sources live beside this module

    factories: dict[str, Callable[[SourceSpec], Source]] = {
        "directory": DirectorySource,
        "glob": GlobSource,
        "sqlite": dbsources.SQLiteSource,
        "postgresql": dbsources.PostgresSource,
        "command": dbsources.CommandSource,
    }
    return factories[spec.kind](spec)
