"""PostgreSQL: ``pg_dump -Fc`` + ``pg_dumpall --globals-only`` for backup, ``pg_restore`` for
restore, through the client binaries (no driver).

Secrets: the URL's password reaches libpq only through a temporary passfile (``PGPASSFILE``,
mode 0600, in the spool or restore directory, deleted right after). Every client program
gets the CLI's scrubbed environment (``cloudbackup.core.childenv``: no ``PGPASSWORD``, no inherited
``PGPASSFILE``, no AWS or cloudbackup variables) plus that passfile. Connections are passed as a libpq conninfo string that
never holds a password; every message is scrubbed of the password before it is raised.

Spooling: the dump is written to ``<spool>/<id>.dump.partial`` (a seekable custom-format
file, so ``pg_restore -j`` works on it) and then archived; streaming straight into the tar
is impossible because a tar header needs the size up front. The size of a dump cannot be
known before it is made, so the free-space check uses an estimate: the previous dump of this
source (from the newest local manifest) × 2.5 (the dump plus its archive, plus 25 % growth),
else the database's on-disk size (``pg_database_size``), which a compressed custom-format
dump without index data (plus its archive) fits in for ordinary databases. When the estimate
is wrong, pg_dump or the archive writer fails on ENOSPC and nothing is kept.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cloudbackup.core import childenv
from cloudbackup.core.errors import IntegrityError, SourceError, UsageError
from cloudbackup.core.model import (
    Count,
    Exactly,
    MemberName,
    MemberSchema,
    Text,
    manifest_ref,
    parse_manifest,
)
from cloudbackup.fs.files import create_private
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import DbUrl, SourceContext, secret_forms
from cloudbackup.sources.process import describe_exit, run_logged

GLOBALS_MEMBER = "globals.sql"
#: What a PostgreSQL backup's manifest records about its members (see ``dump_entries``).
POSTGRES_MEMBERS: MemberSchema = {
    "database": Text(),
    "pg_dump_version": Text(),
    "server_version": Text(),
    "dump": MemberName(".dump"),
    "globals": Exactly(GLOBALS_MEMBER),
    "dump_format": Exactly("custom"),
    "dump_bytes": Count(),
}
CONNECT_TIMEOUT = "10"  # seconds; libpq's default is to wait forever on a silent host
PROBE_TIMEOUT = 120
_KEY_RE = re.compile(r"^[a-z_]+$")
# Keywords that would carry a secret on a command line: refused, not passed through.
_SECRET_KEYS = {"sslpassword"}
_URL_KEYS = {"host", "port", "user", "dbname"}
_FS = "\x1f"  # psql field separator: never inside the values we read

Log = Callable[[str], None]


# ---------------------------------------------------------------- connection


@dataclass(frozen=True)
class ConnInfo:
    """A parsed ``postgresql://`` URL: libpq keywords without the password, and the password."""

    dbname: str
    params: tuple[tuple[str, str], ...]
    password: str | None = field(default=None, repr=False)

    def get(self, key: str) -> str | None:
        for name, value in self.params:
            if name == key:
                return value
        return None

    def with_db(self, dbname: str) -> ConnInfo:
        return ConnInfo(dbname, self.params, self.password)

    def conninfo(self, *, dbname: bool = True) -> str:
        """A libpq conninfo string (``key='value' ...``); never holds the password."""
        items = list(self.params)
        if dbname:
            items.append(("dbname", self.dbname))
        return " ".join(f"{key}={_quote_value(value)}" for key, value in items)

    @property
    def where(self) -> str:
        host = self.get("host") or "the local socket"
        port = self.get("port")
        return f"{host}:{port}" if port else host

    @property
    def secrets(self) -> list[str]:
        return secret_forms(self.password) if self.password else []


def _quote_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_url(url: str) -> ConnInfo:
    """Parse ``postgresql://user[:password]@host[:port]/db[?key=value...]``.

    The URL is split by :class:`cloudbackup.sources.DbUrl`, the same value redaction uses
    (the password ends at the authority's last ``@``). Query keywords are libpq's
    (``sslmode``, ``host=/socket/dir``, ``connect_timeout``...); they override the URL's
    parts, as in libpq. Raises SourceError; messages never hold the password.
    """
    try:
        parts = DbUrl.parse(url)
    except ValueError as exc:
        raise SourceError(f"cannot use the PostgreSQL URL: {exc}", "check its syntax") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise SourceError("not a postgresql:// URL", "use postgresql://user@host:5432/dbname")
    user = unquote(parts.user) if parts.user else None
    password = unquote(parts.password) if parts.password is not None else None
    host, port = parts.hosts()
    params: dict[str, str] = {}
    if host:
        params["host"] = host
    if port:
        params["port"] = port
    if user:
        params["user"] = user
    dbname = unquote(parts.path.lstrip("/"))
    # Not parse_qsl: libpq decodes %XX only, a "+" stays a "+" (it may be in a password).
    for key, _raw_key, raw_value in parts.query_items():
        value = unquote(raw_value)
        if not _KEY_RE.match(key):
            raise SourceError(f"unknown connection parameter {key!r} in the PostgreSQL URL")
        if key == "password":
            password = value
        elif key in _SECRET_KEYS:
            raise SourceError(
                f"{key} in the URL is not supported (it would appear on a command line)",
                "use a client key without a passphrase, readable only by this user",
            )
        elif key == "dbname":
            dbname = value
        else:
            params[key] = value
    if not dbname:
        raise SourceError("the PostgreSQL URL names no database", "add /dbname to it")
    if password is not None and ("\n" in password or "\r" in password):
        raise SourceError(
            "a password with a line break cannot be used", "change it or use ~/.pgpass"
        )
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    params.setdefault("application_name", "cloudbackup")
    ordered = tuple(sorted(params.items(), key=lambda kv: (kv[0] not in _URL_KEYS, kv[0])))
    return ConnInfo(dbname=dbname, params=ordered, password=password or None)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class PgEnv:
    """Environment (and inherited descriptors) for every libpq child process."""

    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()


def child_env(base: Mapping[str, str], passfile: str | None = None) -> dict[str, str]:
    """The environment of a libpq client: ``base`` scrubbed (no ``PGPASSWORD``, no inherited
    ``PGPASSFILE``: see ``cloudbackup.core.childenv``), plus the passfile the tool made."""
    # English messages: they are parsed for hints (password, server not running, version).
    extra = {"LC_MESSAGES": "C"}
    if base.get("LC_ALL"):
        extra["LC_CTYPE"] = base.get("LC_CTYPE") or base["LC_ALL"]
    if passfile is not None:
        extra["PGPASSFILE"] = passfile
    env = childenv.build(base, extra)
    env.pop("LC_ALL", None)  # it would override LC_MESSAGES
    return env


def _passfile_line(password: str) -> str:
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextmanager
def pg_env(
    password: str | None,
    directory: Path | None,
    stem: str,
    *,
    base: Mapping[str, str] = childenv.NO_ENV,
) -> Iterator[PgEnv]:
    """Yield the children's environment (``base``, scrubbed); with a password, a passfile
    exists meanwhile.

    The passfile is ``<directory>/<stem>.pgpass.partial`` (mode 0600, so a crash leaves it
    to the stale-partial cleanup), deleted on exit. Without a directory (``check``), it is
    an anonymous in-memory file (``memfd``) handed to the child as ``/dev/fd/N``.
    """
    if password is None:
        yield PgEnv(child_env(base))
        return
    data = _passfile_line(password).encode()
    if directory is None and hasattr(os, "memfd_create"):
        fd = os.memfd_create("cloudbackup-pgpass", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o600)  # libpq ignores a passfile others could read
            yield PgEnv(child_env(base, f"/dev/fd/{fd}"), (fd,))
        finally:
            os.close(fd)
        return
    if directory is None:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="cloudbackup-"))  # 0700
        cleanup_dir = True
    else:
        cleanup_dir = False
    path = directory / f"{stem}.pgpass.partial"
    try:
        path.unlink(missing_ok=True)  # a leftover of a killed run
        create_private(path)
        with open(path, "wb") as handle:
            handle.write(data)
        yield PgEnv(child_env(base, str(path)))
    finally:
        path.unlink(missing_ok=True)
        if cleanup_dir:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- client binaries


@dataclass(frozen=True)
class Tools:
    bindir: Path
    version: str  # e.g. "15.8"
    major: int

    def path(self, name: str) -> str:
        return str(self.bindir / name)


def _major_of(path: str) -> int:
    match = re.search(r"/postgresql/(\d+)/bin$|pgsql-(\d+)/bin$", path)
    return int(next(g for g in match.groups() if g)) if match else 0


def _search_path(env: Mapping[str, str]) -> str:
    return env.get("PATH") or os.defpath


def candidate_dirs(env: Mapping[str, str] = childenv.NO_ENV) -> list[Path]:
    """Where client binaries may live, in order of preference: ``pg_config --bindir``, the
    versioned directories (newest first), then every entry of ``env``'s PATH holding
    ``pg_dump``."""
    found: list[Path] = []
    pg_config = shutil.which("pg_config", path=_search_path(env))
    out = _ask(pg_config, "--bindir", env) if pg_config else None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        found.append(Path(out.stdout.strip()))
    versioned = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    found.extend(Path(p) for p in sorted(versioned, key=_major_of, reverse=True))
    for entry in _search_path(env).split(os.pathsep):
        if entry and os.access(os.path.join(entry, "pg_dump"), os.X_OK):
            found.append(Path(entry))
    unique: list[Path] = []
    seen: set[str] = set()
    for directory in found:
        key = os.path.realpath(directory)
        if key not in seen and directory.is_dir():
            seen.add(key)
            unique.append(directory)
    return unique


#: ``--version`` answers by (path, mtime): a program replaced in place is asked again.
_VERSIONS: dict[tuple[str, float], tuple[str, int] | None] = {}


def _ask(
    program: str, option: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str] | None:
    """``program option`` (``--version``, ``--bindir``) in the scrubbed environment."""
    try:
        return subprocess.run(
            [program, option],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=childenv.build(env),
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _probe_version(path: str, env: Mapping[str, str]) -> tuple[str, int] | None:
    out = _ask(path, "--version", env)
    if out is None:
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        return None
    major = int(match[1])
    return (f"{major}.{match[2]}" if match[2] else str(major)), major


def tool_version(
    path: str, env: Mapping[str, str] = childenv.NO_ENV
) -> tuple[str, int] | None:
    """``("15.8", 15)`` from ``path --version``; None when it does not run."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    key = (path, mtime)
    if key not in _VERSIONS:
        _VERSIONS[key] = _probe_version(path, env)
    return _VERSIONS[key]


def install_hint(major: int | None) -> str:
    if major:
        return (
            f"install the PostgreSQL {major} client tools: postgresql-client-{major} "
            f"(Debian/Ubuntu, from apt.postgresql.org) or postgresql{major} (RHEL/Fedora, PGDG)"
        )
    return (
        "install the PostgreSQL client tools matching the server's major version, e.g. "
        "postgresql-client-16 (Debian/Ubuntu, from apt.postgresql.org) or postgresql16 (RHEL)"
    )


def find_tools(
    names: Sequence[str],
    *,
    env: Mapping[str, str] = childenv.NO_ENV,
    min_major: int | None = None,
    server_version: str | None = None,
) -> Tools:
    """The first candidate directory holding every program in ``names`` whose version
    (of ``names[0]``) is at least ``min_major``. SourceError with the package to install."""
    available: list[Tools] = []
    for directory in candidate_dirs(env):
        if not all(os.access(directory / name, os.X_OK) for name in names):
            continue
        version = tool_version(str(directory / names[0]), env)
        if version is None:
            continue
        tools = Tools(directory, *version)
        if min_major is None or tools.major >= min_major:
            return tools
        available.append(tools)
    missing = " and ".join(names)
    if not available:
        raise SourceError(
            f"{missing} not found (looked in pg_config --bindir, /usr/lib/postgresql/*/bin "
            "and PATH)",
            install_hint(min_major),
        )
    newest = max(available, key=lambda t: t.major)
    raise SourceError(
        f"{names[0]} {newest.version} ({newest.bindir}) is older than the server "
        f"(PostgreSQL {server_version or min_major}) and cannot dump it",
        install_hint(min_major),
    )


# ---------------------------------------------------------------- errors


_PREFIX_RE = re.compile(
    r"^(?:pg_dump|pg_dumpall|pg_restore|psql)(?:: (?:error|fatal|detail|hint|warning))?:\s*"
)


_ERROR_LINE_RE = re.compile(r"^\S+: (error|fatal|detail|hint):|^\s|^(Query|Command) was:")


def _error_text(lines: Sequence[str]) -> str:
    """The error part of a client's stderr, as one line."""
    start = 0
    for index, line in enumerate(lines):
        if re.search(r"\b(error|fatal|FATAL|ERROR):", line):
            start = index
            break
    parts = []
    for line in lines[start:]:
        text = _PREFIX_RE.sub("", line.strip())
        if text.startswith("password retrieved from file"):
            continue  # our temporary passfile: noise
        if text and not text.startswith("warning:"):
            parts.append(re.sub(r"\s+", " ", text))
    text = "; ".join(parts) or "no error output"
    return text if len(text) <= 400 else text[:397] + "..."


def _hint_for(text: str) -> str:
    lowered = text.lower()
    if "password authentication failed" in lowered:
        return "check the user and password in the URL (URL-encode @ : / % in them)"
    if "no password supplied" in lowered:
        return "put the password in the URL or in ~/.pgpass"
    if "connection refused" in lowered or "is the server running" in lowered:
        return "is the server running and accepting connections on that host and port?"
    if "timeout expired" in lowered:
        return "is the host reachable (firewall, address)?"
    if "could not translate host name" in lowered:
        return "check the host name in the URL"
    if "does not exist" in lowered and "database" in lowered:
        return "check the database name in the URL"
    if "permission denied" in lowered:
        return "grant the backup user the needed privileges (e.g. pg_read_all_data)"
    if "no space left" in lowered:
        return "free some space or move CLOUDBACKUP_LOCAL_DIR"
    return "see the log for the full error output"


def _version_mismatch(text: str) -> int | None:
    match = re.search(r"server version: (\d+)", text)
    return int(match[1]) if match and "mismatch" in text else None


# ---------------------------------------------------------------- psql


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    version: str  # "15.8"
    database_size: int

    @property
    def major(self) -> int:
        return self.version_num // 10000 if self.version_num >= 100000 else self.version_num // 100


def _psql(
    psql: str,
    conn: ConnInfo,
    pgenv: PgEnv,
    sql: str,
    *,
    variables: dict[str, str] | None = None,
    stop_on_error: bool = True,
) -> subprocess.CompletedProcess[str]:
    argv = [psql, "-X", "-q", "-w", "-A", "-t", "-F", _FS, "-v"]
    argv.append(f"ON_ERROR_STOP={1 if stop_on_error else 0}")
    for name, value in (variables or {}).items():
        argv += ["-v", f"{name}={value}"]
    argv += ["-d", conn.conninfo(), "-f", "-"]
    try:
        return subprocess.run(
            argv,
            input=sql,
            capture_output=True,
            text=True,
            env=pgenv.env,
            pass_fds=pgenv.pass_fds,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SourceError(f"{psql} not found", install_hint(None)) from None
    except subprocess.TimeoutExpired:
        raise SourceError(
            f"PostgreSQL at {conn.where} did not answer within {PROBE_TIMEOUT} s",
            "check the server's load and locks",
        ) from None


def _connect_error(label: str, conn: ConnInfo, stderr: str) -> SourceError:
    full = _scrub(_error_text(stderr.splitlines()), conn.secrets)
    # "connection to server at "h", port 5432 failed: FATAL:  password authentication
    # failed ...": the place is in our own message already, the hint says the rest.
    text = re.sub(r"^connection to server (at|on) .*? failed: (FATAL: )?", "", full)
    text = re.sub(r"; Is the server running .*?(?=;|$)", "", text)
    return SourceError(
        f"{label}: cannot connect to PostgreSQL at {conn.where}: {text}", _hint_for(full)
    )


_PROBE_SQL = (
    "SELECT current_setting('server_version_num'), current_setting('server_version'), "
    "pg_database_size(current_database());\n"
)


def _probe(psql: str, conn: ConnInfo, pgenv: PgEnv, label: str) -> ServerInfo:
    out = _psql(psql, conn, pgenv, _PROBE_SQL)
    if out.returncode != 0:
        raise _connect_error(label, conn, out.stderr)
    try:
        num, version, size = out.stdout.strip().splitlines()[-1].split(_FS)
        return ServerInfo(int(num), version.split()[0], int(size))
    except (ValueError, IndexError):
        raise SourceError(
            f"{label}: unexpected answer from PostgreSQL at {conn.where}: {out.stdout.strip()[:200]!r}"
        ) from None


def _server_and_dump_tools(
    psql: str, conn: ConnInfo, pgenv: PgEnv, label: str, env: Mapping[str, str]
) -> tuple[ServerInfo, Tools]:
    """The server's facts, and the pg_dump/pg_dumpall that can dump it (its major or newer)."""
    info = _probe(psql, conn, pgenv, label)
    try:
        tools = find_tools(
            ("pg_dump", "pg_dumpall"),
            env=env,
            min_major=info.major,
            server_version=info.version,
        )
    except SourceError as exc:
        raise SourceError(f"{label}: {exc.message}", exc.hint) from None
    return info, tools


def _any_psql(env: Mapping[str, str]) -> str | None:
    for directory in candidate_dirs(env):
        if os.access(directory / "psql", os.X_OK):
            return str(directory / "psql")
    return shutil.which("psql", path=_search_path(env))


def _psql_or_fail(what: str, env: Mapping[str, str]) -> str:
    psql = _any_psql(env)
    if psql is None:
        raise SourceError(
            f"{what} not found (looked in pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)",
            install_hint(None),
        )
    return psql


# ---------------------------------------------------------------- backup


def _conn_of(name: str, url: str) -> ConnInfo:
    try:
        return parse_url(url)
    except SourceError as exc:
        raise SourceError(f"source {name}: {exc.message}", exc.hint) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_source(
    name: str, url: str, env: Mapping[str, str], workdir: Path | None = None
) -> str:
    """Source ``name`` at ``url`` is reachable, authenticated, pg_dump present and new
    enough: one detail line, or SourceError saying what to fix. ``env``: the base
    environment of the client programs."""
    label = f"source {name}"
    conn = _conn_of(name, url)
    psql = _psql_or_fail("pg_dump (and psql)", env)
    with pg_env(conn.password, workdir, "check", base=env) as pgenv:
        info, tools = _server_and_dump_tools(psql, conn, pgenv, label, env)
    return (
        f"postgresql {conn.dbname} at {conn.where}: server {info.version}, "
        f"pg_dump {tools.version} ({tools.bindir}), database {_human(info.database_size)}"
    )


def _previous_dump_bytes(spool_dir: Path) -> int | None:
    """The dump size the newest local manifest of this source recorded, if any."""
    for path in sorted(spool_dir.glob("*.manifest.json"), reverse=True):
        ref = manifest_ref("/".join(path.parts[-3:]))
        if ref is None:
            continue
        try:
            manifest = parse_manifest(path.read_bytes(), ref, {"postgresql": POSTGRES_MEMBERS})
            value = manifest.members.get("dump_bytes")
        except (OSError, IntegrityError):
            continue
        if value:
            return int(value)
    return None


def required_space(database_size: int, previous_dump: int | None) -> tuple[int, str]:
    """Free bytes a dump needs before it starts, and why (see the module docstring)."""
    if previous_dump:
        return int(previous_dump * 2.5), f"2.5 × the previous dump ({_human(previous_dump)})"
    return database_size, "the database's size on disk"


def _run_dump(
    label: str,
    argv: list[str],
    conn: ConnInfo,
    pgenv: PgEnv,
    log: Log,
    tools: Tools,
) -> None:
    program = os.path.basename(argv[0])

    def log_line(line: str) -> None:
        # Errors become the SourceError's message: logging them too would report one
        # failure twice. Warnings and notices go to the log.
        if not _ERROR_LINE_RE.search(line[len(label) + 2 :]):
            log(_scrub(line, conn.secrets))

    code, tail = run_logged(
        argv,
        stdout=subprocess.DEVNULL,
        label=label,
        log=log_line,
        env=pgenv.env,
        pass_fds=pgenv.pass_fds,
    )
    if code == 0:
        return
    text = _scrub(_error_text(tail), conn.secrets)
    server_major = _version_mismatch(text)
    if server_major:
        raise SourceError(
            f"{label}: {program} {tools.version} is older than the server "
            f"(PostgreSQL {server_major})",
            install_hint(server_major),
        )
    raise SourceError(f"{label}: {program} {describe_exit(code)}: {text}", _hint_for(text))


def _dump(
    label: str,
    conn: ConnInfo,
    env: Mapping[str, str],
    ctx: SourceContext,
    dump_path: Path,
    globals_path: Path,
) -> tuple[Tools, ServerInfo]:
    """Check the server and the tools and the free space, then run ``pg_dumpall
    --globals-only`` into ``globals_path`` and ``pg_dump -Fc`` into ``dump_path``."""
    spool = ctx.spool_dir
    psql = _psql_or_fail("pg_dump (and psql)", env)
    with pg_env(conn.password, spool, ctx.backup_id, base=env) as pgenv:
        info, tools = _server_and_dump_tools(psql, conn, pgenv, label, env)
        needed, basis = required_space(info.database_size, _previous_dump_bytes(spool))
        free = shutil.disk_usage(spool).free
        if free < needed:
            raise SourceError(
                f"{label}: not enough free space in {spool} for the dump: {_human(free)} "
                f"free, {_human(needed)} wanted ({basis})",
                "free some space or move CLOUDBACKUP_LOCAL_DIR",
            )
        ctx.log(
            f"{label}: dumping {conn.dbname} from {conn.where} (PostgreSQL {info.version}, "
            f"{_human(info.database_size)} on disk) with pg_dump {tools.version}"
        )
        create_private(globals_path)
        _run_dump(
            label,
            [
                tools.path("pg_dumpall"),
                "--globals-only",
                "--no-role-passwords",
                "--no-sync",
                "-w",
                "-f",
                str(globals_path),
                "-l",
                conn.dbname,
                "-d",
                conn.conninfo(dbname=False),
            ],
            conn,
            pgenv,
            ctx.log,
            tools,
        )
        create_private(dump_path)
        _run_dump(
            label,
            [
                tools.path("pg_dump"),
                "-Fc",
                "--no-sync",
                "-w",
                "-f",
                str(dump_path),
                "-d",
                conn.conninfo(),
            ],
            conn,
            pgenv,
            ctx.log,
            tools,
        )
    return tools, info


def dump_entries(
    name: str, url: str, env: Mapping[str, str], ctx: SourceContext
) -> Generator[FileEntry, None, dict[str, Any]]:
    """Dump the database of source ``name`` and the cluster's globals into the spool dir,
    then yield them as ``<db>.dump`` and ``globals.sql``; the spool files are removed in any
    case. Returns the member facts (``POSTGRES_MEMBERS``) for the manifest."""
    label = f"source {name}"
    conn = _conn_of(name, url)
    spool = ctx.spool_dir
    dump_path = spool / f"{ctx.backup_id}.dump.partial"
    globals_path = spool / f"{ctx.backup_id}.globals.sql.partial"
    member = conn.dbname.replace("/", "_").replace("\0", "_") + ".dump"
    try:
        tools, info = _dump(label, conn, env, ctx, dump_path, globals_path)
        dump_st = os.lstat(dump_path)
        if dump_st.st_size == 0:
            raise SourceError(f"{label}: pg_dump wrote an empty file", "see the log")
        facts = {
            "database": conn.dbname,
            "dump": member,
            "dump_format": "custom",
            "dump_bytes": dump_st.st_size,
            "globals": GLOBALS_MEMBER,
            "pg_dump_version": tools.version,
            "server_version": info.version,
        }
        ctx.log(f"{label}: pg_dump wrote {_human(dump_st.st_size)}")
        yield FileEntry(str(dump_path), member, dump_st)
        yield FileEntry(str(globals_path), GLOBALS_MEMBER, os.lstat(globals_path))
        return facts
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SourceError(
                f"{label}: no space left in {spool}",
                "free some space or move CLOUDBACKUP_LOCAL_DIR",
            ) from None
        raise
    finally:
        dump_path.unlink(missing_ok=True)
        globals_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- restore


_NONEMPTY_SQL = r"""
SELECT
  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e'))
  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                      AND d.objid = p.oid AND d.deptype = 'e'))
  + (SELECT count(*) FROM pg_namespace n
    WHERE n.nspname NOT IN ('public', 'information_schema') AND n.nspname !~ '^pg_'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass
                      AND d.objid = n.oid AND d.deptype = 'e'));
"""

_IDENT = r'(?:"(?:[^"]|"")+"|[^\s;"]+)'
_CREATE_ROLE_RE = re.compile(rf"^CREATE ROLE ({_IDENT});$")
_ROLE_LINE_RE = re.compile(rf"^(?:ALTER ROLE|COMMENT ON ROLE) ({_IDENT}) ")
_GRANT_RE = re.compile(rf"^GRANT ({_IDENT}) TO ({_IDENT})(.*?)(?: GRANTED BY {_IDENT})?;$")


def _unquote_ident(ident: str) -> str:
    if ident.startswith('"') and ident.endswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident


def _one_statement(line: str) -> bool:
    """True for exactly one complete SQL statement that psql runs as such: quotes balanced,
    one ``;`` at the very end, no comment, and no backslash (psql meta-commands such as ``\\!`` run
    anywhere outside quotes; pg_dumpall writes none in role statements)."""
    if "\\" in line or not line.endswith(";"):
        return False
    quote_char = ""
    for index, char in enumerate(line):
        if quote_char:
            if char == quote_char:
                quote_char = ""  # a doubled quote reopens at once: same effect
        elif char in "'\"":
            quote_char = char
        elif char == ";" and index != len(line) - 1:
            return False
        elif line[index : index + 2] in ("--", "/*"):
            return False  # a comment could swallow the final ``;``
    return not quote_char


def roles_script(globals_sql: str, existing: set[str]) -> tuple[str, list[str], bool]:
    """From ``pg_dumpall --globals-only`` output, the statements that create the roles not
    in ``existing`` (their attributes, settings, comments and memberships); also whether the
    file defines tablespaces (never created here: their paths belong to the old machine)."""
    lines = globals_sql.splitlines()
    missing: dict[str, str] = {}  # ident as written -> name
    for line in lines:
        match = _CREATE_ROLE_RE.match(line)
        if match:
            name = _unquote_ident(match[1])
            if name not in existing and not name.startswith("pg_"):
                missing[match[1]] = name
    statements: list[str] = []
    tablespaces = False
    for line in lines:
        if line.startswith("CREATE TABLESPACE"):
            tablespaces = True
            continue
        if not _one_statement(line):
            continue  # comments, psql commands, multi-line values: never run
        match = _CREATE_ROLE_RE.match(line) or _ROLE_LINE_RE.match(line)
        if match:
            if match[1] in missing:
                statements.append(line)
            continue
        grant = _GRANT_RE.match(line)
        if grant and (grant[1] in missing or grant[2] in missing):
            # Without GRANTED BY: the old grantor may not exist here.
            statements.append(f"GRANT {grant[1]} TO {grant[2]}{grant[3]};")
    return "\n".join(statements) + ("\n" if statements else ""), list(missing.values()), tablespaces


def _restore_error(what: str, conn: ConnInfo, stderr: str) -> SourceError:
    text = _scrub(_error_text(stderr.splitlines()), conn.secrets)
    return SourceError(f"restore: {what}: {text}", _hint_for(text))


def _create_missing_roles(
    psql: str, admin: ConnInfo, pgenv: PgEnv, globals_path: Path, log: Log
) -> list[str]:
    out = _psql(psql, admin, pgenv, "SELECT rolname FROM pg_roles;\n")
    if out.returncode != 0:
        raise _restore_error("cannot list the roles of the target server", admin, out.stderr)
    existing = {line for line in out.stdout.splitlines() if line}
    script, missing, tablespaces = roles_script(
        globals_path.read_text(encoding="utf-8", errors="replace"), existing
    )
    if tablespaces:
        log(
            "restore: globals.sql defines tablespaces; they are not created (create them by "
            "hand first if the dump uses them)"
        )
    if not missing:
        log("restore: every role of the backup already exists")
        return []
    out = _psql(psql, admin, pgenv, script, stop_on_error=False)
    errors = [line for line in out.stderr.splitlines() if "ERROR:" in line]
    for line in errors:
        log(f"restore: creating roles: {_scrub(line, admin.secrets)}")
    out2 = _psql(psql, admin, pgenv, "SELECT rolname FROM pg_roles;\n")
    now = {line for line in out2.stdout.splitlines() if line}
    created = [name for name in missing if name in now]
    failed = [name for name in missing if name not in now]
    if created:
        log(
            f"restore: created role(s) {', '.join(created)} without passwords "
            "(set them with ALTER ROLE ... PASSWORD)"
        )
    if failed:
        log(f"restore: could not create role(s) {', '.join(failed)}; objects they own will fail")
    return created


def _admin_conn(psql: str, conn: ConnInfo, pgenv: PgEnv) -> ConnInfo:
    """A connection to the maintenance database (``postgres``, else ``template1``)."""
    last = ""
    for dbname in ("postgres", "template1"):
        admin = conn.with_db(dbname)
        out = _psql(psql, admin, pgenv, "SELECT 1;\n")
        if out.returncode == 0:
            return admin
        last = out.stderr
        if "does not exist" not in last:
            break
    raise _restore_error(f"cannot connect to PostgreSQL at {conn.where}", conn, last)


def _dump_owner(tools: Tools, dump_path: Path, pgenv: PgEnv) -> str | None:
    """The owner of the dumped database, from the archive's table of contents."""
    try:
        out = subprocess.run(
            [tools.path("pg_restore"), "-C", "-l", str(dump_path)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            env=pgenv.env,
            pass_fds=pgenv.pass_fds,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        match = re.match(r"^\d+; \d+ \d+ DATABASE - .+ (\S+)$", line)
        if match:
            return match[1]
    return None


def _create_database(
    psql: str, admin: ConnInfo, pgenv: PgEnv, dbname: str, owner: str | None, log: Log
) -> None:
    variables = {"db": dbname}
    if owner:
        variables["owner"] = owner
        out = _psql(
            psql, admin, pgenv, 'CREATE DATABASE :"db" OWNER :"owner";\n', variables=variables
        )
        if out.returncode == 0:
            log(f"restore: created database {dbname} (owner {owner}) at {admin.where}")
            return
        log(
            f"restore: cannot give the new database its old owner {owner}: {_error_text(out.stderr.splitlines())}"
        )
    out = _psql(psql, admin, pgenv, 'CREATE DATABASE :"db";\n', variables={"db": dbname})
    if out.returncode != 0:
        raise _restore_error(f"cannot create database {dbname}", admin, out.stderr)
    log(f"restore: created database {dbname} at {admin.where}")


def _target_state(
    psql: str, admin: ConnInfo, conn: ConnInfo, pgenv: PgEnv, force: bool
) -> tuple[bool, bool]:
    """Whether the target database exists, and whether it holds objects; a non-empty one
    is refused without ``force`` (the same refusal as a non-empty directory: exit 2)."""
    exists = _psql(
        psql,
        admin,
        pgenv,
        "SELECT count(*) FROM pg_database WHERE datname = :'db';\n",
        variables={"db": conn.dbname},
    )
    if exists.returncode != 0:
        raise _restore_error("cannot query the target server", conn, exists.stderr)
    if exists.stdout.strip() != "1":
        return False, False
    out = _psql(psql, conn, pgenv, _NONEMPTY_SQL)
    if out.returncode != 0:
        raise _restore_error(f"cannot inspect database {conn.dbname}", conn, out.stderr)
    objects = int(out.stdout.strip() or 0)
    if objects and not force:
        raise UsageError(
            f"restore: target database {conn.dbname} at {conn.where} is not empty "
            f"({objects} object{'' if objects == 1 else 's'})",
            "restore into a new database, or use --force to replace the backup's "
            "objects in it (pg_restore --clean --if-exists)",
        )
    return True, objects > 0


def restore_dump(
    dump_path: Path,
    globals_path: Path | None,
    target_url: str,
    *,
    force: bool,
    log: Log,
    env: Mapping[str, str] = childenv.NO_ENV,
) -> None:
    """Restore a ``pg_dump -Fc`` file into the database ``target_url`` names.

    Every client program gets ``env`` (the CLI's scrubbed environment) plus the passfile.

    Missing roles are created first from ``globals.sql`` (without passwords); a missing
    database is created (through the ``postgres`` maintenance database); a database that
    already holds objects is refused unless ``force``, which restores with
    ``pg_restore --clean --if-exists`` (objects of the backup are dropped and recreated;
    others are left alone). pg_restore's errors are logged and raised as one SourceError.
    """
    conn = parse_url(target_url)
    dump_path = Path(dump_path)
    if not dump_path.is_file():
        raise SourceError(f"restore: {dump_path} does not exist")
    psql = _psql_or_fail("psql", env)
    workdir = dump_path.parent
    with pg_env(conn.password, workdir, f".restore-{os.getpid()}", base=env) as pgenv:
        admin = _admin_conn(psql, conn, pgenv)
        info = _probe(psql, admin, pgenv, "restore")
        try:
            tools = find_tools(("pg_restore", "psql"), env=env, min_major=info.major)
        except SourceError:
            # Older than the server: may still work.
            tools = find_tools(("pg_restore", "psql"), env=env)
            log(
                f"restore: pg_restore {tools.version} is older than the server "
                f"(PostgreSQL {info.version}); {install_hint(info.major)}"
            )
        psql = tools.path("psql")
        exists, nonempty = _target_state(psql, admin, conn, pgenv, force)
        # Roles first: the new database gets its old owner, and the dump's objects theirs.
        if globals_path is not None and globals_path.is_file():
            _create_missing_roles(psql, admin, pgenv, globals_path, log)
        if not exists:
            owner = _dump_owner(tools, dump_path, pgenv)
            _create_database(psql, admin, pgenv, conn.dbname, owner, log)
        argv = [tools.path("pg_restore"), "-w", "-d", conn.conninfo()]
        if nonempty:
            argv += ["--clean", "--if-exists"]
        jobs = min(4, os.cpu_count() or 1)
        if jobs > 1:
            argv += ["-j", str(jobs)]
        argv.append(str(dump_path))
        log(
            f"restore: pg_restore {tools.version} into {conn.dbname} at {conn.where}"
            + (" (--clean --if-exists)" if nonempty else "")
        )
        code, tail = run_logged(
            argv,
            stdout=subprocess.DEVNULL,
            label="restore",
            log=lambda line: log(_scrub(line, conn.secrets)),
            env=pgenv.env,
            pass_fds=pgenv.pass_fds,
            keep=500,
        )
    if code != 0:
        errors = [line for line in tail if "error:" in line]
        count = re.search(r"errors ignored on restore: (\d+)", "\n".join(tail))
        text = _scrub(_error_text(errors[:1] or tail), conn.secrets)
        how = f"reported {count[1]} error(s)" if count else describe_exit(code)
        raise SourceError(
            f"restore: pg_restore {how} restoring into {conn.dbname}: {text}",
            "see the log for every message; the database may be partly restored",
        )
