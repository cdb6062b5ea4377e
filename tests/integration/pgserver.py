"""One throwaway PostgreSQL server per test session.

It listens on a private unix socket directory and on a free loopback port, with password
(SCRAM) authentication everywhere, so the tests exercise the same auth path as production.
The binaries are found like the tool finds them (``pg_config --bindir``, then the newest
``/usr/lib/postgresql/*/bin``, then PATH), so CI's other major version works too. ``initdb``
refuses root: as root, every server command runs through ``runuser -u postgres``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from cloudbackup.sources import pgtools as postgres

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "super-Secret-4-tests"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_bindir() -> Path:
    for directory in postgres.candidate_dirs():
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install the `postgresql` package"
    )


@dataclass
class PgServer:
    bindir: Path
    base: Path
    port: int
    as_postgres: list[str]
    stopped: bool = field(default=False)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    def url(self, db: str, user: str = SUPERUSER, password: str | None = None) -> str:
        """A TCP URL; the password (if any) URL-encoded as a user would write it."""
        secret = SUPERUSER_PASSWORD if user == SUPERUSER and password is None else password
        auth = quote(user, safe="") + (f":{quote(secret, safe='')}" if secret else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(db, safe='')}"

    def psql(self, sql: str, db: str = "postgres", *, user: str = SUPERUSER) -> str:
        """Run SQL as the superuser over the unix socket; return unaligned, tuples-only output."""
        env = dict(os.environ, PGPASSWORD=SUPERUSER_PASSWORD, PGCONNECT_TIMEOUT="10")
        env.pop("PGPASSFILE", None)
        proc = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.sockdir),
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                db,
                "-f",
                "-",
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self._pg_ctl("stop", "-m", "immediate", "-w")
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def start_server() -> PgServer:
    """initdb + start; about 1-2 s. The caller stops it (``stop``); atexit is a safety net."""
    bindir = _server_bindir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="cloudbackup-pg-", dir="/tmp"))
    (base / "sock").mkdir()
    pwfile = base / "pwfile"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    pwfile.chmod(0o600)
    if as_postgres:
        for path in (base, base / "sock", pwfile):
            shutil.chown(path, "postgres", "postgres")
    server = PgServer(bindir=bindir, base=base, port=_free_port(), as_postgres=as_postgres)
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(server.datadir),
            "-U",
            SUPERUSER,
            "-A",
            "scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(server.port),
        "unix_socket_directories": f"'{server.sockdir}'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "40",
        "shared_buffers": "32MB",
        "password_encryption": "'scram-sha-256'",
    }
    with open(server.datadir / "postgresql.conf", "a") as conf:
        conf.write("\n# cloudbackup tests\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    atexit.register(server.stop)
    server._pg_ctl("start", "-w", "-t", "60", "-l", str(base / "server.log"))
    deadline = time.monotonic() + 30
    while True:
        try:
            server.psql("SELECT 1")
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.1)
    return server
