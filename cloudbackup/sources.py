"""Source specs and the entries each kind of source feeds to the archive writer.

A source yields ``FileEntry`` objects (the member name, the ``lstat`` and the directory
handle to open it through: see cloudbackup.walk); the archive writer turns them into tar
members. Directory and glob sources walk by directory descriptor. Database and command
sources first spool a consistent copy into the local dir (never ``/tmp``) and yield that
file by path.
"""

from __future__ import annotations

import errno
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
from cloudbackup.walk import DirCursor, DirHandle, DirTable, FileEntry

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


def _is_special(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _open_root(root: str) -> DirHandle:
    """The walk's root, opened once by path (a symlink there was resolved by the source)."""
    try:
        return DirTable(root).open_root()
    except FileNotFoundError:
        raise SourceError(
            f"source path {root} does not exist", "check the path or the mount"
        ) from None
    except PermissionError:
        raise SourceError(
            f"source path {root} is not readable", "run as a user who can read it"
        ) from None
    except OSError as exc:
        # O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR (or ELOOP) rather than a follow.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise SourceError(
                f"source path {root} was replaced by a symlink since it was resolved",
                "check the path",
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise SourceError(
                f"source path {root} is not a directory", "give a directory or a glob"
            ) from None
        raise SourceError(f"source path {root}: {exc.strerror}", "check the path") from None


@dataclass
class _Level:
    """One directory on the walk's stack: its handle, sorted names and entry (glob mode)."""

    handle: DirHandle
    names: list[str]
    entry: FileEntry | None
    index: int = 0


def walk_tree(
    root: str,
    ctx: SourceContext,
    *,
    select: Callable[[str], bool] | None = None,
) -> Iterator[FileEntry]:
    """Depth-first and sorted, by directory descriptor, iterative, never following symlinks.

    Every directory is opened relative to its parent with O_NOFOLLOW and must be the
    directory the parent's listing showed; one that was swapped (for a symlink or anything
    else) is skipped with a warning. ``select`` filters non-directories (glob sources);
    parent directories of selected entries are emitted before them. Holds one name list
    per level and a bounded number of descriptors (see cloudbackup.walk), whatever the depth.
    """
    top = _open_root(root)
    warn = ctx.warn
    exclude = ctx.exclude if ctx.exclude else None
    skip = ctx.skip_inodes
    visited: set[tuple[int, int]] = {(top.dev, top.ino)}
    pending: list[FileEntry] = []  # glob mode: directories of the current path not yet emitted
    cursor = DirCursor()
    try:
        try:
            names = sorted(os.listdir(cursor.fd_for(top)))
        except OSError as exc:
            warn("unreadable", f"{root}: cannot list directory ({exc.strerror})")
            return
        stack = [_Level(top, names, None)]
        rel = ""  # the member name of the directory on top of the stack
        while stack:
            level = stack[-1]
            names = level.names
            if level.index >= len(names):
                stack.pop()
                if pending and pending[-1] is level.entry:
                    pending.pop()
                rel = rel[: len(rel) - len(level.handle.name) - 1] if len(stack) > 1 else ""
                continue
            name = names[level.index]
            level.index += 1
            arcname = f"{rel}/{name}" if rel else name
            if exclude is not None and exclude.matches_child(arcname, name):
                continue
            try:
                fd = cursor.fd_for(level.handle)
            except OSError as exc:
                # Its descriptor had been closed (bounded window) and it moved since.
                gone = isinstance(exc, FileNotFoundError)
                warn(
                    "vanished" if gone else "unreadable",
                    f"{level.handle.path}: "
                    + ("replaced during the walk" if gone else f"cannot reopen ({exc.strerror})")
                    + "; the rest of it skipped",
                )
                level.index = len(names)
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                warn("vanished", f"{level.handle.child_path(name)}: vanished while reading")
                continue
            except OSError as exc:
                warn("unreadable", f"{level.handle.child_path(name)}: cannot stat ({exc.strerror})")
                continue
            key = (st.st_dev, st.st_ino)
            if key in skip:
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                if key in visited:
                    warn(
                        "skipped",
                        f"{level.handle.child_path(name)}: directory loop (bind mount?) skipped",
                    )
                    continue
                visited.add(key)
                try:
                    child = level.handle.open_child(name, st, fd)
                except FileNotFoundError:
                    warn(
                        "vanished",
                        f"{level.handle.child_path(name)}: replaced during the walk; "
                        "skipped (never followed)",
                    )
                    continue
                except OSError as exc:
                    entry = FileEntry(None, arcname, st, level.handle, name)
                    warn("unreadable", f"{entry.path}: cannot list directory ({exc.strerror})")
                    if select is None:
                        yield entry
                    continue
                entry = FileEntry(None, arcname, st, level.handle, name, child)
                if select is None:
                    yield entry
                else:
                    pending.append(entry)
                try:
                    child_names = sorted(os.listdir(cursor.fd_for(child)))
                except OSError as exc:
                    gone = isinstance(exc, FileNotFoundError)
                    warn(
                        "vanished" if gone else "unreadable",
                        f"{entry.path}: "
                        + ("replaced during the walk" if gone else "cannot list directory")
                        + ("" if gone else f" ({exc.strerror})"),
                    )
                    if pending and pending[-1] is entry:
                        pending.pop()
                    continue
                stack.append(_Level(child, child_names, entry))
                rel = arcname
            elif _is_special(mode):
                warn("skipped", f"{level.handle.child_path(name)}: {_kind_name(mode)} skipped")
            else:
                if select is not None:
                    if not select(arcname):
                        continue
                    if pending:
                        yield from pending
                        pending.clear()
                yield FileEntry(None, arcname, st, level.handle, name)
    finally:
        cursor.release()


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
