"""Hostile input from the environment, the clock and the command line (SPEC "Everything read is
untrusted"): children get a scrubbed environment, redaction follows how URLs are parsed, a
backup dated in the future neither turns monitoring green nor locks the host out, and bad
bytes in any input are one line and exit 2 (``status``: 3), never an unexpected error.

PostgreSQL children and the whole story over S3 are in tests/integration/test_hostile_env.py.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbackup import config
from cloudbackup.core import childenv
from cloudbackup.core.errors import ConfigError
from cloudbackup.sources import pgtools as postgres
from cloudbackup.sources.base import DbUrl, redact_url, url_secrets
from cloudbackup.sources.registry import parse_spec
from tests.conftest import CliResult, Clock, Env, make_tree
from tests.test_monitor import families, log_lines, status_json

__all__ = ["log_lines"]  # a fixture

CLI = Callable[..., CliResult]

# ---------------------------------------------------------------- children's environment

# Unique values: finding one anywhere in a child's output means it leaked.
AWS_KEY_ID = "AKIAHOSTILE0KEYID77"
AWS_SECRET = "aws-secret-Qx7-hostile-env"
AWS_TOKEN = "aws-session-token-Zr9-hostile"
PG_PASSWORD = "pgpassword-Vv3-hostile"
OTHER_DB_PASSWORD = "other-db-pw-Kk4-hostile"
SECRET_VARIABLES = {
    "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "AWS_SESSION_TOKEN": AWS_TOKEN,
    "AWS_SECURITY_TOKEN": AWS_TOKEN,
    "AWS_SECRET_ACCESS_KEY_FILE": "/run/secrets/aws-secret-file-hostile",
    "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws-credentials-file-hostile",
    "PGPASSWORD": PG_PASSWORD,
    "PGPASSFILE": "/etc/pgpass-file-hostile",
    "PGSERVICEFILE": "/etc/pg-service-file-hostile",
}


def read_members(path: Path) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def environ_of(dump: bytes) -> dict[str, str]:
    """``env`` output (newline-separated) or ``/proc/PID/environ`` (NUL-separated)."""
    sep = b"\0" if b"\0" in dump else b"\n"
    pairs = (item.decode().partition("=") for item in dump.split(sep) if b"=" in item)
    return {name: value for name, _, value in pairs}


def test_scrub_removes_every_secret_and_keeps_the_rest() -> None:
    harmless = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "AWS_REGION": "eu-west-1",
        "AWS_PROFILE": "backup",
        "AWS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "PGHOST": "/var/run/postgresql",
        "PGSSLMODE": "require",
    }
    environ = {
        **SECRET_VARIABLES,
        "CLOUDBACKUP_SOURCES": f"db=postgresql://u:{OTHER_DB_PASSWORD}@h/db",
        "CLOUDBACKUP_S3_BUCKET": "bkt",
        "CLOUDBACKUP_SOURCES_FILE": "/etc/cloudbackup/sources",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.2/creds",
        "AWS_CONFIG_FILE": "/root/.aws/config",
        **harmless,
    }
    assert childenv.scrub(environ) == harmless
    # What the tool hands a child itself goes on top, scrubbed names included (hooks).
    built = childenv.build(environ, {"PGPASSFILE": "/tmp/ours", "CLOUDBACKUP_RESULT": "ok"})
    assert built == {**harmless, "PGPASSFILE": "/tmp/ours", "CLOUDBACKUP_RESULT": "ok"}


def test_settings_carry_the_scrubbed_environment() -> None:
    environ = {**SECRET_VARIABLES, "PATH": "/bin", "CLOUDBACKUP_HOST": "h"}
    settings = config.load({}, environ, {}, hostname="m", home=Path("/home/x"))
    assert settings.child_env == {"PATH": "/bin"}
    assert "child_env" not in repr(settings)


def test_libpq_children_get_the_scrubbed_base_and_only_our_passfile(tmp_path: Path) -> None:
    base = {**SECRET_VARIABLES, "PATH": "/bin", "LC_ALL": "de_DE.UTF-8"}
    with postgres.pg_env("pw", tmp_path, "x", base=base) as pgenv:
        env = pgenv.env
        assert env["PGPASSFILE"] == str(tmp_path / "x.pgpass.partial")
        assert env["LC_MESSAGES"] == "C" and env["LC_CTYPE"] == "de_DE.UTF-8"
        assert "LC_ALL" not in env and env["PATH"] == "/bin"
        for name in SECRET_VARIABLES:
            assert name == "PGPASSFILE" or name not in env
    with postgres.pg_env(None, tmp_path, "y", base=base) as pgenv:
        assert "PGPASSFILE" not in pgenv.env and "PGPASSWORD" not in pgenv.env


def test_command_sources_archive_no_secret_of_the_environment(
    env: Env, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``envdump=cmd:env`` used to archive every secret of the environment (SPEC: children
    get a scrubbed environment); so did a command reading ``/proc/self/environ``."""
    for name, value in SECRET_VARIABLES.items():
        monkeypatch.setenv(name, value)
    # Another source's password in CLOUDBACKUP_SOURCES (the arguments replace it here, but
    # the variable is still in the environment the command would inherit).
    monkeypatch.setenv(
        "CLOUDBACKUP_SOURCES", f"db=postgresql://app:{OTHER_DB_PASSWORD}@db.example/app"
    )
    result = cli("backup", "--no-upload", "envdump=cmd:env", "procenv=cmd:cat /proc/self/environ")
    assert result.exit_code == 0, result.stderr
    secrets = [*SECRET_VARIABLES.values(), OTHER_DB_PASSWORD]
    for source, member in (("envdump", "envdump.out"), ("procenv", "procenv.out")):
        (archive,) = env.archives(source)
        dump = read_members(archive)[member]
        child = environ_of(dump)
        assert child["PATH"] == os.environ["PATH"], "the child gets the base environment"
        assert not [n for n in child if n.startswith("CLOUDBACKUP_")], child
        assert not set(SECRET_VARIABLES) & set(child), child
        for secret in secrets:
            assert secret.encode() not in dump, f"{secret} leaked into {source}"
            assert secret.encode() not in archive.read_bytes()


# ---------------------------------------------------------------- redaction follows parsing

# (URL as a person writes it, the password libpq gets, the redacted form, secret tails)
PASSWORD_CASES = [
    (
        "postgresql://u:hunter2@Tail@db.example/shop",
        "hunter2@Tail",
        "postgresql://u:***@db.example/shop",
        ["hunter2", "Tail"],
    ),
    (
        "postgresql://u:Co1on:Ta1lQ@db.example:6432/shop",
        "Co1on:Ta1lQ",
        "postgresql://u:***@db.example:6432/shop",
        ["Co1on", "Ta1lQ"],
    ),
    (
        "postgresql://u:Sl4sh%2FTa1lS@db.example/shop",
        "Sl4sh/Ta1lS",
        "postgresql://u:***@db.example/shop",
        ["Sl4sh", "Ta1lS"],
    ),
    (
        "postgresql://u:Pct%40Ta1lP%3Ax@db.example/shop",
        "Pct@Ta1lP:x",
        "postgresql://u:***@db.example/shop",
        ["Pct", "Ta1lP"],
    ),
    (
        "postgresql://u:M1x@d:%2F%3F%23%25@E4nd@h1:5432,h2:5433/shop?sslmode=require",
        "M1x@d:/?#%@E4nd",
        "postgresql://u:***@h1:5432,h2:5433/shop?sslmode=require",
        ["M1x", "E4nd"],
    ),
    (
        "postgresql://u@db.example/shop?sslmode=require&password=Qu3ry%40Ta1lR",
        "Qu3ry@Ta1lR",
        "postgresql://u@db.example/shop?sslmode=require&password=***",
        ["Qu3ry", "Ta1lR"],
    ),
    (
        "postgresql://u@db.example/shop?pass%77ord=Enc0dedK3y",
        "Enc0dedK3y",
        "postgresql://u@db.example/shop?pass%77ord=***",
        ["Enc0dedK3y"],
    ),
]


@pytest.mark.parametrize(("url", "password", "redacted", "tails"), PASSWORD_CASES)
def test_redaction_hides_exactly_what_the_connection_uses(
    url: str, password: str, redacted: str, tails: list[str]
) -> None:
    spec = parse_spec(f"shop={url}")
    conn = postgres.parse_url(url)
    assert conn.password == password, "the connection's password"
    assert spec.redacted == redacted == redact_url(url)
    assert redact_url(f"shop={url}") == f"shop={redacted}"
    assert password in spec.secrets and password in url_secrets(url)
    assert set(conn.secrets) <= set(spec.secrets)
    for tail in tails:
        assert tail not in spec.redacted and tail not in repr(spec)
        assert tail not in conn.conninfo()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Ra7w/Ta1lV@db.example/shop",  # unencoded "/"
        "postgresql://u:Ra7w?Ta1lV@db.example/shop",  # unencoded "?"
        "postgresql://u:Ra7w#Ta1lV@db.example/shop",  # unencoded "#"
        "postgresql://u:1234?Ta1lV@db.example/shop",  # ...even when a port-like part parses
        "postgresql://u:Ra7w Ta1lV@db.example/shop",  # a space
    ],
)
def test_an_unencoded_separator_is_refused_without_showing_the_password(
    url: str, env: Env, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError) as info:
        parse_spec(url)
    assert "Ta1lV" not in str(info.value) and "Ra7w" not in str(info.value)
    assert "Ta1lV" not in redact_url(url) and "Ra7w" not in redact_url(url)
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", f"shop={url}")
    result = cli("backup", "--no-upload")
    assert result.exit_code == 2
    result.assert_one_error("source", "CLOUDBACKUP_SOURCES", "invalid")
    assert "Ta1lV" not in result.stderr + result.stdout


def test_config_error_of_a_password_with_at_leaks_no_tail(env: Env, cli: CLI) -> None:
    """The old redactor stopped at the first ``@``: ``u:***@Tail@host`` in the message."""
    result = cli("backup", "--no-upload", "shop=postgresql://u:hunter2@Tail@db.example/")
    assert result.exit_code == 2
    result.assert_one_error("names no database")
    assert "Tail" not in result.stderr and "hunter2" not in result.stderr


_PASSWORD_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1
)


@settings(max_examples=300, deadline=None)
@given(password=_PASSWORD_TEXT, raw=st.sampled_from(["", "@", ":", "@:"]))
def test_any_password_connects_as_written_and_is_fully_redacted(password: str, raw: str) -> None:
    """A password written with ``@`` and ``:`` left unencoded (everything else encoded) is the
    password libpq gets, and the redacted URL is the URL without it, whatever it holds."""
    url = f"postgresql://app:{quote(password, safe=raw)}@db.example:5432/shop"
    assert postgres.parse_url(url).password == password
    spec = parse_spec(url)
    assert spec.redacted == "postgresql://app:***@db.example:5432/shop" == redact_url(url)
    assert password in spec.secrets


def test_dburl_keeps_fields_as_written() -> None:
    url = DbUrl.parse("postgresql://a%20b:p@q@[::1]:5433/d%2Fb?host=%2Ftmp")
    assert (url.user, url.password, url.hostport) == ("a%20b", "p@q", "[::1]:5433")
    assert url.hosts() == ("::1", "5433")
    assert (url.path, url.query) == ("/d%2Fb", "host=%2Ftmp")


# ---------------------------------------------------------------- the ping URL's password

PING_USER = "pinguser"
PING_PASSWORD = "pingSecret-Hx9@/"  # an "@" and a "/": URL-encoded in the URL


class AuthServer:
    """An HTTP server on 127.0.0.1 recording (method, path, Host, Authorization) of each
    request and answering ``status``."""

    def __init__(self, status: int = 200) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status = status
        self.requests: list[tuple[str, str, str, str]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                requests.append(
                    (
                        self.command,
                        self.path,
                        self.headers.get("Host", ""),
                        self.headers.get("Authorization", ""),
                    )
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=[200, 500], ids=["up", "failing"])
def auth_server(request: pytest.FixtureRequest) -> Any:
    server = AuthServer(request.param)
    yield server
    server.close()


def test_a_ping_url_password_goes_as_basic_auth_never_to_the_log_stderr_or_dns(
    env: Env, cli: CLI, auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import socket

    resolved: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        resolved.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    userinfo = f"{PING_USER}:{quote(PING_PASSWORD, safe='')}"
    url = f"http://{userinfo}@127.0.0.1:{auth_server.port}/0f6c2b9e"
    log_file = env.tmp / "log" / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", url)
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(make_tree(env.tmp / "www", {"a": "a"})))

    result = cli("-v", "run")
    assert result.exit_code == 0, result.stderr
    expected = "Basic " + base64.b64encode(f"{PING_USER}:{PING_PASSWORD}".encode()).decode()
    assert [(m, p) for m, p, _h, _a in auth_server.requests] == [
        ("GET", "/0f6c2b9e/start"),
        ("GET", "/0f6c2b9e"),
    ]
    for _method, _path, host, authorization in auth_server.requests:
        assert host == f"127.0.0.1:{auth_server.port}"
        assert authorization == expected
    assert resolved and all(PING_USER not in host and "@" not in host for host in resolved)
    shown = result.stdout + result.stderr + log_file.read_text()
    for secret in (PING_PASSWORD, quote(PING_PASSWORD, safe=""), "pingSecret"):
        assert secret not in shown
    if auth_server.status != 200:  # each failure is a warning naming the URL, redacted
        shown_url = f"ping http://***@127.0.0.1:{auth_server.port}/0f6c2b9e"
        assert f"{shown_url}/start failed" in result.stderr
        assert f"{shown_url}/start failed" in log_file.read_text()


def test_a_ping_url_that_does_not_parse_never_shows_its_password(
    env: Env, log_lines: list[str]
) -> None:
    from cloudbackup.ops import status as monitor

    assert monitor.ping("http://u:pingSecret-Hx9@[::1/0f6c2b9e", "/fail", body="x") is False
    text = "\n".join(log_lines)
    assert "ping" in text and "pingSecret" not in text


# ---------------------------------------------------------------- the clock


@pytest.fixture
def www(env: Env, monkeypatch: pytest.MonkeyPatch) -> Path:
    tree = make_tree(env.tmp / "srv" / "www", {"index.html": "<h1>hi</h1>", "a.css": "x{}"})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", str(tree))
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    return tree


def www_row(document: dict[str, Any]) -> dict[str, Any]:
    (host,) = document["hosts"]
    (row,) = [s for s in host["sources"] if s["source"] == "www"]
    return row


FUTURE = datetime(2036, 3, 1, 4, 0, tzinfo=UTC)


def test_a_future_dated_backup_is_reported_not_fresh_and_can_be_forgotten(
    env: Env, cli: CLI, clock: Clock, www: Path
) -> None:
    """One night with the clock in 2036: status used to say OK (a negative age), Prometheus
    showed 2036, and every later backup was refused with no way out."""
    now = clock.now
    clock.advance(days=-1)
    assert cli("backup").exit_code == 0  # yesterday, a good backup
    clock.now = FUTURE
    assert cli("backup").exit_code == 0  # the clock is wrong tonight
    future_id = "www-20360301T040000Z"
    clock.now = now  # the clock is right again

    code, doc = status_json(cli)
    row = www_row(doc)
    assert (code, doc["state"], row["state"]) == (1, "WARNING", "WARNING")
    assert row["newest"] == "www-20261120T021500Z" and row["age_seconds"] == 86400
    assert row["future_dated"] == [future_id]
    assert any("dated in the future" in r and future_id in r for r in row["reasons"])
    human = cli("status")
    assert "dated in the future" in human.stdout and f"forget {future_id}" in human.stdout
    prom = env.tmp / "m.prom"
    assert cli("status", "--prometheus", prom).exit_code == 1
    fams = families(prom)
    (last,) = fams["cloudbackup_last_success_timestamp_seconds"].samples
    assert last.value == now.timestamp() - 86400 <= now.timestamp()
    (future,) = fams["cloudbackup_future_dated_backups"].samples
    assert future.value == 1

    # The next backup is refused, naming the backup and the way out.
    blocked = cli("backup")
    assert blocked.exit_code == 1
    line = blocked.assert_one_error(future_id, "dated in the future")
    assert f"cloudbackup forget {future_id} --where all" in line

    # A day later without a backup: nothing at or before now is fresh enough.
    clock.advance(hours=27)
    code, doc = status_json(cli)
    assert code == 2 and www_row(doc)["state"] == "CRITICAL"
    clock.advance(hours=-27)

    dry = cli("forget", future_id, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "would delete" in dry.stdout and f"{future_id}.manifest.json" in dry.stdout
    assert len(env.manifests("www")) == 2
    gone = cli("forget", future_id, "--json")
    assert gone.exit_code == 0, gone.stderr
    (result,) = json.loads(gone.stdout)["results"]
    assert result["deleted"] == [future_id] and result["where"] == "local"
    assert not env.files("www", f"{future_id}.*")

    assert cli("backup").exit_code == 0  # unblocked
    code, doc = status_json(cli)
    assert code == 0 and www_row(doc)["future_dated"] == []


def test_only_future_dated_backups_is_critical(env: Env, cli: CLI, clock: Clock, www: Path) -> None:
    now = clock.now
    clock.now = FUTURE
    assert cli("backup").exit_code == 0
    clock.now = now
    code, doc = status_json(cli)
    row = www_row(doc)
    assert code == 2 and row["state"] == "CRITICAL" and row["newest"] is None
    assert "no backup at or before now" in row["reasons"]
    prom = env.tmp / "m.prom"
    cli("status", "--prometheus", prom)
    assert not families(prom)["cloudbackup_last_success_timestamp_seconds"].samples


def test_forget_refuses_an_unknown_id_and_deletes_nothing(
    env: Env, cli: CLI, clock: Clock, www: Path
) -> None:
    assert cli("backup").exit_code == 0
    known = env.manifests("www")[0].name.removesuffix(".manifest.json")
    assert cli("forget", known, "--dry-run").exit_code == 0
    for args in (
        [known, "www-20200101T000000Z"],
        ["not-an-id"],
        [known, "--where", "remote"],  # no bucket
    ):
        result = cli("forget", *args)
        assert result.exit_code == 2, (args, result.stderr)
        result.assert_one_error()
        assert len(env.manifests("www")) == 1 and len(env.archives("www")) == 1


# ---------------------------------------------------------------- bad bytes: one line, exit 2


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"CLOUDBACKUP_HOST=caf\xe9\n", ["not valid UTF-8", "line 1"]),
        (b"# ok\nCLOUDBACKUP_HOST=h\nCLOUDBACKUP_EXCLUDE=\xff\xfe\n", ["UTF-8", "line 3"]),
        (b"CLOUDBACKUP_HOST=a\0b\n", ["NUL", "line 1"]),
        (b"X=" + b"y" * (1024 * 1024), ["larger than 1 MiB"]),
    ],
)
def test_bad_env_file_is_one_line_exit_2(
    env: Env, cli: CLI, content: bytes, words: list[str]
) -> None:
    path = env.tmp / "bad.env"
    path.write_bytes(content)
    result = cli("--env-file", path, "list")
    assert result.exit_code == 2
    result.assert_one_error(f"--env-file {path}", *words)
    assert "unexpected" not in result.stderr


def test_bad_dot_env_in_the_current_directory_is_one_line_exit_2(env: Env, cli: CLI) -> None:
    (env.work / ".env").write_bytes(b"CLOUDBACKUP_HOST=\xc3\x28\n")
    result = cli("list")
    assert result.exit_code == 2
    result.assert_one_error(".env in the current directory", "UTF-8")


def test_unreadable_dot_env_is_one_line_exit_2(
    env: Env, cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = env.work / ".env"
    dotenv.write_text("CLOUDBACKUP_HOST=h\n")
    dotenv.chmod(0)
    if os.geteuid() == 0:  # root reads any file: fail the open as it fails for a user
        real_open = os.open

        def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if os.fspath(path) == str(dotenv):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr("cloudbackup.cli.commands.os.open", refusing_open)
    result = cli("list")
    assert result.exit_code == 2
    result.assert_one_error(".env in the current directory", "cannot be read", "Permission")


def test_a_virtualenv_named_dot_env_is_not_an_env_file(env: Env, cli: CLI) -> None:
    """A guard on the fix above: a directory named .env (a virtualenv) is left alone."""
    (env.work / ".env" / "bin").mkdir(parents=True)
    assert cli("list").exit_code == 0


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: tmp, ["is a directory"]),
        (lambda tmp: _fifo(tmp / "fifo"), ["is not a regular file"]),
        (lambda tmp: tmp / "missing.env", ["does not exist"]),
    ],
)
def test_env_file_that_is_not_a_file(
    env: Env, cli: CLI, make: Callable[[Path], Path], words: list[str]
) -> None:
    path = make(env.tmp)
    result = cli("--env-file", path, "list")
    assert result.exit_code == 2
    result.assert_one_error(str(path), *words)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_env_file_given_twice_is_refused(env: Env, cli: CLI) -> None:
    first, second = env.tmp / "a.env", env.tmp / "b.env"
    first.write_text("CLOUDBACKUP_HOST=one\n")
    second.write_text("CLOUDBACKUP_HOST=two\n")
    result = cli("--env-file", first, "--env-file", second, "list", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    result.assert_one_error("--env-file", "more than once")


@pytest.mark.parametrize(
    "value",
    [
        "9999-12-31T23:59:59-23:59",  # after the last UTC instant
        "0001-01-01T00:00:00+23:59",  # before the first
    ],
)
def test_restore_at_outside_the_calendar_is_exit_2(env: Env, cli: CLI, value: str) -> None:
    result = cli("restore", "www", "--at", value)
    assert result.exit_code == 2
    result.assert_one_error("--at", value, "outside the calendar")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CLOUDBACKUP_SOURCES", "www=/srv/caf\udce9"),  # b"/srv/caf\xe9" (Latin-1)
        ("CLOUDBACKUP_S3_KMS_KEY_ID", "key-\udcff"),
        ("CLOUDBACKUP_EXCLUDE", "*.\udcff"),
    ],
)
def test_non_utf8_environment_value_is_exit_2_naming_it(
    env: Env, cli: CLI, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)  # os.environ turns the surrogate back into the raw byte
    result = cli("backup", "--dry-run", str(env.tmp))
    assert result.exit_code == 2
    result.assert_one_error(var, "not valid UTF-8")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0s", ["out of range"]),
        ("59s", ["out of range"]),
        ("3651d", ["out of range"]),
        ("9" * 5000 + "d", ["far too long"]),
        ("-5h", ["negative"]),
        ("", ["empty"]),
    ],
)
def test_absurd_max_age_is_unknown_with_one_line(
    env: Env, cli: CLI, value: str, words: list[str]
) -> None:
    result = cli("status", "--max-age", value)
    assert result.exit_code == 3  # status: a configuration error is UNKNOWN (SPEC)
    line = result.assert_one_error("--max-age", *words)
    assert len(line) < 300
    assert result.stdout.startswith("UNKNOWN: --max-age")


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("CLOUDBACKUP_LOCAL_RETENTION", "within=" + "9" * 5000 + "d", ["far too long"]),
        ("CLOUDBACKUP_S3_ENDPOINT_URL", "http://[::1", ["not a URL"]),
        ("CLOUDBACKUP_S3_ENDPOINT_URL", "http://h:99999", ["not a URL"]),
        ("CLOUDBACKUP_PING_URL", "https://[fe80::1/ping", ["not a URL"]),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:99999999d", ["36500 days"]),
        ("CLOUDBACKUP_S3_OBJECT_LOCK", "governance:" + "9" * 5000 + "d", ["36500 days"]),
        ("CLOUDBACKUP_S3_PART_SIZE", "6GiB", ["at most 5GiB"]),
        ("CLOUDBACKUP_S3_PART_SIZE", "9" * 5000 + "MiB", ["not a size"]),
        ("CLOUDBACKUP_COMPRESSION_LEVEL", "9" * 5000, ["not a whole number"]),
    ],
)
def test_hostile_values_are_one_short_line_exit_2(
    env: Env,
    cli: CLI,
    monkeypatch: pytest.MonkeyPatch,
    var: str,
    value: str,
    words: list[str],
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", "bkt-hostile")
    monkeypatch.setenv(var, value)
    result = cli("list", "--where", "remote")
    assert result.exit_code == 2, result.stderr
    line = result.assert_one_error(var, *words)
    assert len(line) < 400, "a long value is cut short in the message"


def test_prune_policy_with_a_huge_number_is_exit_2(env: Env, cli: CLI) -> None:
    result = cli("prune", "--policy", "last=" + "9" * 5000)
    assert result.exit_code == 2
    assert len(result.assert_one_error("--policy", "far too long")) < 400


def test_relative_xdg_data_home_is_ignored() -> None:
    settings = config.load(
        {}, {"XDG_DATA_HOME": "relative/dir"}, {}, hostname="m", home=Path("/home/x")
    )
    assert settings.local_dir == Path("/home/x/.local/share/cloudbackup")


def test_no_home_directory_asks_for_a_local_dir() -> None:
    with pytest.raises(ConfigError) as info:
        config.load({}, {}, {}, hostname="m", home=None)
    assert "CLOUDBACKUP_LOCAL_DIR" in str(info.value)
    settings = config.load({}, {"CLOUDBACKUP_LOCAL_DIR": "/b"}, {}, hostname="m", home=None)
    assert settings.local_dir == Path("/b")


def test_an_invalid_ping_url_is_named_without_its_password(
    env: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config error for CLOUDBACKUP_PING_URL names the variable and its value with the
    password of ``user:password@`` redacted."""
    monkeypatch.setenv("CLOUDBACKUP_PING_URL", "https://u:pingSecret@hc.example:99999/x")
    result = cli("status")
    assert result.exit_code == 3
    assert "CLOUDBACKUP_PING_URL='https://u:***@hc.example:99999/x'" in result.stderr + result.stdout
    assert "pingSecret" not in result.stderr + result.stdout
