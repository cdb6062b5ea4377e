"""PostgreSQL sources against a real server (one per session, see pgserver.py): backup through
the CLI, restore with ``restore_dump`` into new databases, roles from globals.sql, clear
failures (bad password, stopped server, old or missing pg_dump, permissions, disk space), and
the password nowhere: not in output, log, manifest, archive, argv, environment or S3."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cloudbackup.core.errors import SourceError, UsageError
from cloudbackup.core.model import Manifest
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.sources import pgtools as postgres
from cloudbackup.sources.base import SourceContext
from cloudbackup.sources.postgres import PostgresSource
from cloudbackup.sources.registry import make_source, parse_spec
from tests.conftest import CliResult, Env, S3Env, make_tree
from tests.integration.pgserver import PgServer, _free_port
from tests.manifests import load_manifest

pytestmark = pytest.mark.slow

PASSWORD = "p@ss:w/rd%1"  # URL-special characters on purpose
OWNER = "shop_owner"
READER = "shop_reporting"
TABLES = {
    "public.customers": "id",
    "sales.orders": "id",
    "public.settings": "key",
}
SHOP_SQL = f"""
CREATE SCHEMA sales;
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE,
    created timestamptz NOT NULL DEFAULT '2026-01-01T00:00:00Z', note text);
INSERT INTO customers (name, email, note)
    SELECT 'customer ' || g, 'c' || g || '@example.com',
           CASE WHEN g % 7 = 0 THEN 'ünïcødé ✓ ' || g END
    FROM generate_series(1, 3000) g;
CREATE TABLE sales.orders (
    id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id),
    amount numeric(10, 2), items jsonb, blob bytea);
INSERT INTO sales.orders (customer_id, amount, items, blob)
    SELECT 1 + g % 3000, (g * 1.37)::numeric(10, 2),
           jsonb_build_object('sku', g, 'qty', g % 5), decode(md5(g::text), 'hex')
    FROM generate_series(1, 8000) g;
CREATE TABLE settings (key text PRIMARY KEY, value text);
INSERT INTO settings VALUES ('quote''s', 'tab	and
newline'), ('empty', ''), ('null', NULL);
CREATE VIEW sales.big_orders AS SELECT * FROM sales.orders WHERE amount > 100;
CREATE FUNCTION sales.total(c int) RETURNS numeric LANGUAGE sql
    AS $$ SELECT sum(amount) FROM sales.orders WHERE customer_id = c $$;
GRANT USAGE ON SCHEMA sales TO {READER};
GRANT SELECT ON sales.orders TO {READER};
"""


def secret_forms(password: str = PASSWORD) -> list[str]:
    from urllib.parse import quote

    return sorted({password, quote(password, safe=""), quote(password)})


def assert_no_secret(text: str | bytes, where: str) -> None:
    haystack = text if isinstance(text, bytes) else text.encode()
    for form in secret_forms():
        assert form.encode() not in haystack, f"the password ({form!r}) leaked into {where}"


@pytest.fixture(scope="module")
def shop(pg_server: PgServer) -> Iterator[str]:
    """The database ``shop`` (owned by a password-protected role) with a few thousand rows."""
    pg_server.psql(
        f"""
        CREATE ROLE {OWNER} LOGIN CREATEDB PASSWORD '{PASSWORD}';
        CREATE ROLE {READER} NOLOGIN;
        CREATE DATABASE shop OWNER {OWNER};
        """
    )
    pg_server.psql(f"SET ROLE {OWNER};\n" + SHOP_SQL, db="shop")
    yield pg_server.url("shop", OWNER, PASSWORD)


def fingerprint(pg: PgServer, db: str) -> dict[str, Any]:
    """Row counts and an md5 of every row, per table; plus the view, function and sequence."""
    facts: dict[str, Any] = {}
    for table, key in TABLES.items():
        facts[table] = pg.psql(
            f"SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, '|' ORDER BY {key}), '')) "
            f"FROM {table} t",
            db=db,
        )
    facts["view"] = pg.psql("SELECT count(*) FROM sales.big_orders", db=db)
    facts["function"] = pg.psql("SELECT sales.total(42)", db=db)
    facts["sequence"] = pg.psql("SELECT last_value FROM customers_id_seq", db=db)
    facts["owner"] = pg.psql("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'", db=db)
    facts["grants"] = pg.psql(
        "SELECT grantee || ':' || privilege_type FROM information_schema.role_table_grants "
        f"WHERE table_name = 'orders' AND grantee = '{READER}'",
        db=db,
    )
    return facts


def read_archive(path: Path) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def extract(archive: Path, dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in read_archive(archive).items():
        (dest / name).write_bytes(data)
        out[name] = dest / name
    return out


def dump_now(source_url: str, dest: Path) -> tuple[Path, Path]:
    """Dump through ``dump_entries`` (no CLI) and keep copies of the two members."""
    dest.mkdir(parents=True, exist_ok=True)
    source = make_source(parse_spec(source_url))
    ctx = SourceContext(
        spool_dir=dest,
        backup_id=f"t-{uuid.uuid4().hex[:8]}",
        exclude=PathMatcher([]),
        skip_inodes=frozenset(),
        warn=lambda c, m: None,
    )
    kept = {}
    for entry in source.entries(ctx):
        kept[entry.arcname] = dest / ("copy-" + entry.arcname)
        shutil.copyfile(entry.path, kept[entry.arcname])
    assert not list(dest.glob("*.partial")), "spool files left behind"
    return kept["shop.dump"], kept["globals.sql"]


@pytest.fixture
def spy_subprocesses(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the argv and environment of every child process (and the passfile's mode)."""
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    class Spy(real):  # type: ignore[misc,valid-type]
        def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
            env = dict(kw.get("env") or os.environ)
            passfile = env.get("PGPASSFILE")
            mode = stat.S_IMODE(os.stat(passfile).st_mode) if passfile else None
            content = Path(passfile).read_text() if passfile else None
            calls.append({"argv": [str(a) for a in args], "env": env, "mode": mode})
            if content is not None:
                calls[-1]["passfile"] = passfile
                calls[-1]["passfile_ok"] = content.startswith("*:*:*:*:")
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Spy)
    return calls


# ---------------------------------------------------------------- round trip


def test_backup_through_cli_then_restore_into_a_new_database(
    env: Env,
    cli: Callable[..., CliResult],
    pg_server: PgServer,
    shop: str,
    spy_subprocesses: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    log_file = env.tmp / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    www = make_tree(env.tmp / "www", {"index.html": "hi"})
    result = cli("-v", "backup", "--no-upload", f"shop={shop}", www)
    assert result.exit_code == 0, result.stderr
    (archive,) = env.archives("shop")
    (manifest_path,) = env.manifests("shop")
    assert sorted(p.name for p in env.source_dir("shop").iterdir()) == sorted(
        [archive.name, manifest_path.name]
    ), "spool or passfile left behind"

    # Members and manifest (SPEC "Members").
    members = read_archive(archive)
    assert sorted(members) == ["globals.sql", "shop.dump"]
    assert members["shop.dump"].startswith(b"PGDMP")
    globals_sql = members["globals.sql"].decode()
    assert f"CREATE ROLE {OWNER};" in globals_sql and f"CREATE ROLE {READER};" in globals_sql
    assert "PASSWORD" not in globals_sql.upper().replace("NOBYPASSRLS", "")
    manifest = load_manifest(manifest_path)
    assert manifest.kind == "postgresql" and manifest.file_count == 2
    assert manifest.spec == f"postgresql://{OWNER}:***@127.0.0.1:{pg_server.port}/shop"
    facts = manifest.members
    assert facts["database"] == "shop" and facts["dump"] == "shop.dump"
    assert facts["globals"] == "globals.sql" and facts["dump_bytes"] == len(members["shop.dump"])
    assert facts["server_version"].split(".")[0] == facts["pg_dump_version"].split(".")[0]

    # The password: nowhere the user or an attacker with the files could read it.
    assert_no_secret(result.stdout, "stdout")
    assert_no_secret(result.stderr, "stderr")
    assert_no_secret(log_file.read_text(), "the log file")
    assert_no_secret(manifest_path.read_bytes(), "the manifest")
    assert_no_secret(archive.read_bytes(), "the compressed archive")
    for name, data in members.items():
        assert_no_secret(name, "member names")
        assert_no_secret(data, f"member {name}")
    # ...nor in any child's argv or environment; libpq got it from a 0600 passfile only.
    pg_calls = [c for c in spy_subprocesses if "postgresql" in c["argv"][0]]
    assert {os.path.basename(c["argv"][0]) for c in pg_calls} >= {"psql", "pg_dump", "pg_dumpall"}
    for call in pg_calls:
        assert_no_secret(" ".join(call["argv"]), f"argv {call['argv'][0]}")
        assert "PGPASSWORD" not in call["env"]
        assert_no_secret(json.dumps(call["env"]), "a child's environment")
        if "--version" not in call["argv"]:
            assert call["mode"] == 0o600 and call["passfile_ok"], call
    dumps = [
        c
        for c in pg_calls
        if os.path.basename(c["argv"][0]) in ("pg_dump", "pg_dumpall")
        and "--version" not in c["argv"]
    ]
    assert dumps and all(Path(c["passfile"]).parent == env.source_dir("shop") for c in dumps), (
        "the dumps' passfile lives in the source's local dir"
    )
    assert not any(env.local_dir.rglob("*pgpass*"))

    # Restore into a new database and compare everything.
    files = extract(archive, tmp_path / "restore")
    lines: list[str] = []
    postgres.restore_dump(
        files["shop.dump"],
        files["globals.sql"],
        pg_server.url("shop_restored"),
        force=False,
        log=lines.append,
    )
    assert fingerprint(pg_server, "shop_restored") == fingerprint(pg_server, "shop")
    assert (
        pg_server.psql(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'shop_restored'"
        )
        == OWNER
    ), "the new database gets the old owner"
    assert any("every role of the backup already exists" in line for line in lines), lines
    assert not list((tmp_path / "restore").glob("*pgpass*"))


def test_restore_refuses_a_non_empty_database_unless_forced(
    pg_server: PgServer, shop: str, tmp_path: Path
) -> None:
    dump, globals_sql = dump_now(shop, tmp_path / "spool")
    target = pg_server.url("shop_force")
    postgres.restore_dump(dump, globals_sql, target, force=False, log=lambda m: None)
    pg_server.psql(
        "DELETE FROM sales.orders WHERE id > 100; CREATE TABLE extra (x int);", db="shop_force"
    )

    with pytest.raises(UsageError) as refused:
        postgres.restore_dump(dump, globals_sql, target, force=False, log=lambda m: None)
    assert "not empty" in str(refused.value) and "--force" in str(refused.value)
    assert refused.value.exit_code == 2  # the same refusal as a non-empty directory
    assert pg_server.psql("SELECT count(*) FROM sales.orders", db="shop_force") == "100"

    lines: list[str] = []
    postgres.restore_dump(dump, globals_sql, target, force=True, log=lines.append)
    assert any("--clean --if-exists" in line for line in lines)
    assert fingerprint(pg_server, "shop_force") == fingerprint(pg_server, "shop")
    assert (
        pg_server.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'extra'", db="shop_force")
        == "1"
    )


def test_roles_missing_on_the_target_are_created_from_globals(
    pg_server: PgServer, shop: str, tmp_path: Path
) -> None:
    role = "auditor_" + uuid.uuid4().hex[:6]
    pg_server.psql(f"CREATE ROLE {role} NOLOGIN; COMMENT ON ROLE {role} IS 'audits';")
    pg_server.psql(f"GRANT SELECT ON customers TO {role}", db="shop")
    dump, globals_sql = dump_now(shop, tmp_path / "spool")
    assert f"CREATE ROLE {role};" in globals_sql.read_text()
    # The role disappears from the cluster: a fresh server would not have it either.
    pg_server.psql(f"REVOKE ALL ON customers FROM {role}", db="shop")
    pg_server.psql(f"DROP ROLE {role}")

    lines: list[str] = []
    postgres.restore_dump(
        dump, globals_sql, pg_server.url("shop_roles"), force=False, log=lines.append
    )
    assert pg_server.psql(f"SELECT rolcanlogin FROM pg_roles WHERE rolname = '{role}'") == "f"
    assert (
        pg_server.psql(
            f"SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = '{role}'"
        )
        == "audits"
    )
    assert (
        pg_server.psql(
            f"SELECT has_table_privilege('{role}', 'customers', 'SELECT')", db="shop_roles"
        )
        == "t"
    )
    assert any(f"created role(s) {role}" in line for line in lines), lines
    assert not any("pg_restore" in line and "error" in line for line in lines), lines


def test_roles_script_handles_quoting_memberships_and_tablespaces() -> None:
    globals_sql = "\n".join(
        [
            "CREATE ROLE alice;",
            "ALTER ROLE alice WITH NOSUPERUSER INHERIT LOGIN;",
            'CREATE ROLE "Mixed ""Case""";',
            'ALTER ROLE "Mixed ""Case""" WITH NOLOGIN;',
            "ALTER ROLE alice SET search_path TO app;",
            "ALTER ROLE alice SET search_path TO 'a;b', \"c;d\";",
            "CREATE ROLE postgres;",
            "ALTER ROLE postgres WITH SUPERUSER;",
            'GRANT "Mixed ""Case""" TO alice WITH INHERIT TRUE GRANTED BY postgres;',
            "GRANT pg_read_all_data TO alice GRANTED BY postgres;",
            "GRANT pg_monitor TO postgres GRANTED BY postgres;",
            "CREATE TABLESPACE fast OWNER postgres LOCATION '/ssd';",
            # Never run, whatever a tampered file says:
            "ALTER ROLE alice WITH LOGIN; DROP DATABASE shop;",
            "ALTER ROLE alice WITH LOGIN \\! touch /tmp/pwned;",
            "ALTER ROLE alice SET x TO 'unterminated;",
            "ALTER ROLE alice SET x TO y -- ;",
            "ALTER ROLE alice SET x TO y /* ; */;",
            "\\! touch /tmp/pwned",
        ]
    )
    script, missing, tablespaces = postgres.roles_script(globals_sql, {"postgres", "pg_monitor"})
    assert missing == ["alice", 'Mixed "Case"']
    assert tablespaces
    assert script.splitlines() == [
        "CREATE ROLE alice;",
        "ALTER ROLE alice WITH NOSUPERUSER INHERIT LOGIN;",
        'CREATE ROLE "Mixed ""Case""";',
        'ALTER ROLE "Mixed ""Case""" WITH NOLOGIN;',
        "ALTER ROLE alice SET search_path TO app;",
        "ALTER ROLE alice SET search_path TO 'a;b', \"c;d\";",
        'GRANT "Mixed ""Case""" TO alice WITH INHERIT TRUE;',
        "GRANT pg_read_all_data TO alice;",
    ]


# ---------------------------------------------------------------- failures


def test_bad_password_and_stopped_server_fail_alone(
    env: Env,
    cli: Callable[..., CliResult],
    pg_server: PgServer,
    shop: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log_file = env.tmp / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(log_file))
    www = make_tree(env.tmp / "www", {"index.html": "hi"})
    wrong = pg_server.url("shop", OWNER, PASSWORD + "x")
    stopped = pg_server.url("shop", OWNER, PASSWORD).replace(str(pg_server.port), str(_free_port()))
    result = cli("backup", "--no-upload", f"wrong={wrong}", f"stopped={stopped}", www)
    assert result.exit_code == 1, result.stderr
    assert len(env.archives("www")) == 1
    assert env.archives("wrong") == [] and env.archives("stopped") == []
    for name in ("wrong", "stopped"):
        assert not any(env.files(name, "*")), f"{name}: nothing (spool, passfile) left"
    assert "Traceback" not in result.stderr
    errors = result.error_lines
    assert len(errors) == 2, result.stderr
    (wrong_line,) = [e for e in errors if "source wrong" in e]
    (stopped_line,) = [e for e in errors if "source stopped" in e]
    assert f'password authentication failed for user "{OWNER}"' in wrong_line
    assert "check the user and password" in wrong_line
    assert "Connection refused" in stopped_line and "is the server running" in stopped_line
    summary = result.stdout.strip().splitlines()[-1]
    assert "2 of 3" not in summary and "1 of 3" in summary and "wrong" in summary
    for text, where in (
        (result.stdout, "stdout"),
        (result.stderr, "stderr"),
        (log_file.read_text(), "log"),
    ):
        assert_no_secret(text, where)  # the wrong password contains the right one


def test_failed_dump_is_a_failed_source(
    env: Env, cli: Callable[..., CliResult], pg_server: PgServer, shop: str
) -> None:
    """pg_dump itself fails (no privilege on a table): no archive, its error in one line."""
    pg_server.psql(
        "CREATE ROLE intruder LOGIN PASSWORD 'intruder-pw'; GRANT CONNECT ON DATABASE shop TO intruder;"
    )
    result = cli("backup", "--no-upload", pg_server.url("shop", "intruder", "intruder-pw"))
    assert result.exit_code == 1
    assert env.archives("shop") == [] and not any(env.files("shop", "*.partial"))
    line = result.assert_one_error("source shop", "pg_dump", "permission denied")
    assert "exited with status 1" in line
    assert "intruder-pw" not in result.stderr + result.stdout


def test_check_reports_versions(pg_server: PgServer, shop: str) -> None:
    source = make_source(parse_spec(shop))
    line = source.check()
    major = pg_server.psql("SHOW server_version_num")[:-4]
    assert f"server {major}." in line and f"pg_dump {major}." in line and "shop" in line
    assert_no_secret(line, "the check line")


def _fake_bindir(tmp: Path, version: str | None, *, dump_error: str | None = None) -> Path:
    """psql linked to the real one; pg_dump/pg_dumpall scripts claiming ``version``."""
    real = postgres.find_tools(("pg_dump", "psql"))
    bindir = tmp / "fakebin"
    bindir.mkdir()
    (bindir / "psql").symlink_to(real.bindir / "psql")
    if version is not None:
        for name in ("pg_dump", "pg_dumpall"):
            script = bindir / name
            error = f"echo '{dump_error}' >&2; exit 1" if dump_error else "exit 0"
            script.write_text(
                "#!/bin/sh\n"
                f'if [ "$1" = "--version" ]; then echo "{name} (PostgreSQL) {version}"; exit 0; fi\n'
                f"{error}\n"
            )
            script.chmod(0o755)
    return bindir


def test_old_pg_dump_names_the_client_package(
    env: Env,
    cli: Callable[..., CliResult],
    pg_server: PgServer,
    shop: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bindir = _fake_bindir(tmp_path, "12.3")
    monkeypatch.setattr(postgres, "candidate_dirs", lambda *_: [bindir])
    major = pg_server.psql("SHOW server_version_num")[:-4]
    result = cli("backup", "--no-upload", shop)
    assert result.exit_code == 1
    line = result.assert_one_error("source shop", "pg_dump 12.3", "older than the server")
    assert f"postgresql-client-{major}" in line
    assert env.archives("shop") == []


def test_missing_pg_dump_names_the_client_package(
    pg_server: PgServer, shop: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    major = pg_server.psql("SHOW server_version_num")[:-4]
    source = make_source(parse_spec(shop))
    # psql present (the server's version is known): the exact package.
    bindir = _fake_bindir(tmp_path, None)
    monkeypatch.setattr(postgres, "candidate_dirs", lambda *_: [bindir])
    with pytest.raises(SourceError) as exc:
        source.check()
    assert "pg_dump and pg_dumpall not found" in str(exc.value)
    assert f"postgresql-client-{major}" in str(exc.value)
    # Nothing at all: the generic advice.
    monkeypatch.setattr(postgres, "candidate_dirs", lambda *_: [])
    source = make_source(parse_spec(shop), env={"PATH": str(tmp_path / "empty")})
    with pytest.raises(SourceError) as exc:
        source.check()
    assert "not found" in str(exc.value) and "postgresql-client" in str(exc.value)


def test_pg_dump_version_mismatch_error_is_recognised(
    pg_server: PgServer, shop: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When only pg_dump itself notices (its own error), the message still names the package."""
    major = int(pg_server.psql("SHOW server_version_num")[:-4])
    bindir = _fake_bindir(
        tmp_path,
        f"{major}.0",
        dump_error=f"pg_dump: error: aborting because of server version mismatch\n"
        f"pg_dump: detail: server version: {major + 1}.2; pg_dump version: {major}.0",
    )
    monkeypatch.setattr(postgres, "candidate_dirs", lambda *_: [bindir])
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(SourceError) as exc:
        dump_now(shop, spool)
    assert f"postgresql-client-{major + 1}" in str(exc.value), str(exc.value)
    assert not any(spool.iterdir())


def test_not_enough_space_fails_before_dumping(
    pg_server: PgServer, shop: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(postgres.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(SourceError) as exc:
        dump_now(shop, tmp_path / "spool")
    assert "not enough free space" in str(exc.value) and "database's size on disk" in str(exc.value)
    assert not any((tmp_path / "spool").iterdir())


def test_required_space_prefers_the_previous_dump(tmp_path: Path) -> None:
    assert postgres.required_space(10_000, None) == (10_000, "the database's size on disk")
    needed, basis = postgres.required_space(10_000, 1_000)
    assert needed == 2_500 and "previous dump" in basis
    spool = tmp_path / "testhost" / "s"
    spool.mkdir(parents=True)
    for when, members in (("20260101T000000Z", {"dump_bytes": 1234}), ("20260102T000000Z", {})):
        manifest = Manifest(
            id=f"s-{when}",
            host="testhost",
            source="s",
            kind="postgresql",
            spec="postgresql://u@h/db",
            created_at=f"{when[:4]}-{when[4:6]}-{when[6:8]}T00:00:00Z",
            archive=f"s-{when}.tar.zst",
            size=1,
            sha256="0" * 64,
            compression="zstd",
            compression_level=None,
            file_count=2,
            uncompressed_bytes=1,
            machine_id="m",
            tool_version="t",
            members=members,
        )
        (spool / f"s-{when}.manifest.json").write_bytes(manifest.to_json())
    # The newest manifest does not parse (damaged, or not written by cloudbackup): skipped.
    (spool / "s-20260103T000000Z.manifest.json").write_text(
        json.dumps({"members": {"dump_bytes": 9}})
    )
    assert postgres._previous_dump_bytes(spool) == 1234


# ---------------------------------------------------------------- S3: no password in metadata or tags


def test_uploaded_objects_carry_no_password(
    env: Env, cli: Callable[..., CliResult], s3_env: S3Env, shop: str
) -> None:
    result = cli("backup", f"shop={shop}")
    assert result.exit_code == 0, result.stderr
    keys = s3_env.keys()
    assert any(k.endswith(".tar.zst") for k in keys) and any(
        k.endswith(".manifest.json") for k in keys
    )
    for key in keys:
        head = s3_env.client.head_object(Bucket=s3_env.bucket, Key=key)
        assert_no_secret(json.dumps(head.get("Metadata", {})), f"metadata of {key}")
        tags = s3_env.client.get_object_tagging(Bucket=s3_env.bucket, Key=key)["TagSet"]
        assert_no_secret(json.dumps(tags), f"tags of {key}")
        body = s3_env.client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
        assert_no_secret(body, key)
    assert_no_secret(result.stdout + result.stderr, "output")


# ---------------------------------------------------------------- URL parsing (no server)


def test_parse_url_keeps_the_password_out_of_the_conninfo() -> None:
    conn = postgres.parse_url(
        "postgresql://app%20user:p%40ss%3Aw%2Frd%251@db.example:6432/my%2Fdb?sslmode=verify-full&application_name=x"
    )
    assert conn.password == PASSWORD
    assert conn.dbname == "my/db"
    info = conn.conninfo()
    assert "p@ss" not in info and "password" not in info
    assert "host='db.example'" in info and "port='6432'" in info and "user='app user'" in info
    assert "sslmode='verify-full'" in info and "application_name='x'" in info
    assert "connect_timeout='10'" in info and "dbname='my/db'" in info
    assert "dbname" not in conn.conninfo(dbname=False)
    assert PASSWORD not in repr(conn)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("postgresql://u@/shop?host=/var/run/postgresql", "/var/run/postgresql", None),
        ("postgresql://u@%2Fvar%2Frun%2FPG/shop", "/var/run/PG", None),
        ("postgresql://u@[::1]:5433/shop", "::1", "5433"),
        ("postgres://localhost/shop", "localhost", None),
        ("postgresql:///shop", None, None),
        ("postgresql://u@h1:5432,h2:5433/shop", "h1,h2", "5432,5433"),
        ("postgresql://u@h1,h2:5433/shop", "h1,h2", ",5433"),
    ],
)
def test_parse_url_hosts(url: str, host: str | None, port: str | None) -> None:
    conn = postgres.parse_url(url)
    assert (conn.get("host"), conn.get("port"), conn.dbname) == (host, port, "shop")


def test_parse_url_password_in_query_and_refusals() -> None:
    conn = postgres.parse_url("postgresql://u@h/db?password=s%3Acret&sslmode=require")
    assert conn.password == "s:cret" and "s:cret" not in conn.conninfo()
    assert postgres.parse_url("postgresql://u:a+b@h/db?password=c+d").password == "c+d"
    assert postgres.parse_url("postgresql://u:a+b@h/db").password == "a+b"
    with pytest.raises(SourceError, match="sslpassword"):
        postgres.parse_url("postgresql://u@h/db?sslpassword=x")
    with pytest.raises(SourceError, match="no database"):
        postgres.parse_url("postgresql://u@h/")


def test_passfile_is_private_escaped_and_removed(tmp_path: Path) -> None:
    with postgres.pg_env("a:b\\c", tmp_path, "id") as pgenv:
        path = Path(pgenv.env["PGPASSFILE"])
        assert path.parent == tmp_path and path.name.endswith(".partial")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "*:*:*:*:a\\:b\\\\c\n"
        assert "PGPASSWORD" not in pgenv.env
    assert not path.exists()
    with postgres.pg_env("pw", None, "check") as pgenv:  # no directory: an in-memory file
        memfile = pgenv.env["PGPASSFILE"]
        assert memfile.startswith("/dev/fd/") and pgenv.pass_fds
        assert stat.S_IMODE(os.stat(memfile).st_mode) == 0o600
    with postgres.pg_env(None, tmp_path, "x") as pgenv:
        assert "PGPASSFILE" not in pgenv.env or pgenv.env["PGPASSFILE"] == os.environ.get(
            "PGPASSFILE"
        )
    assert not any(tmp_path.iterdir())


def test_source_repr_and_members_hide_the_password() -> None:
    from urllib.parse import quote

    source = make_source(parse_spec(f"postgresql://u:{quote(PASSWORD, safe='')}@h/db"))
    assert isinstance(source, PostgresSource)
    assert_no_secret(repr(source), "repr")
    assert_no_secret(source.spec.redacted, "the spec recorded in manifests")


def test_unix_socket_url_with_query_parameters(
    pg_server: PgServer, shop: str, tmp_path: Path
) -> None:
    from urllib.parse import quote

    url = (
        f"postgresql://{OWNER}:{quote(PASSWORD, safe='')}@/shop"
        f"?host={quote(str(pg_server.sockdir), safe='')}&port={pg_server.port}"
        "&sslmode=disable&application_name=nightly"
    )
    dump, globals_sql = dump_now(url, tmp_path / "spool")
    assert dump.read_bytes().startswith(b"PGDMP") and "CREATE ROLE" in globals_sql.read_text()
