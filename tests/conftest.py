"""Shared fixtures: an isolated environment, an in-process CLI runner and a frozen clock."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

HOST = "testhost"


@dataclass
class Env:
    """An isolated run: ``local_dir`` is CLOUDBACKUP_LOCAL_DIR, ``work`` the current directory."""

    tmp: Path
    local_dir: Path
    work: Path
    host: str = HOST

    def source_dir(self, source: str) -> Path:
        return self.local_dir / self.host / source

    def files(self, source: str, pattern: str = "*") -> list[Path]:
        directory = self.source_dir(source)
        return sorted(directory.glob(pattern)) if directory.is_dir() else []

    def archives(self, source: str) -> list[Path]:
        return [p for p in self.files(source, "*.tar*") if not p.name.endswith(".partial")]

    def manifests(self, source: str) -> list[Path]:
        return self.files(source, "*.manifest.json")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """CLOUDBACKUP_LOCAL_DIR in a tmp dir, CLOUDBACKUP_HOST=testhost, every other
    CLOUDBACKUP_* variable cleared, and a fresh working directory (no stray .env)."""
    for name in list(os.environ):
        if name.startswith("CLOUDBACKUP_"):
            monkeypatch.delenv(name)
    local_dir = tmp_path / "local"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_DIR", str(local_dir))
    monkeypatch.setenv("CLOUDBACKUP_HOST", HOST)
    monkeypatch.chdir(work)
    return Env(tmp=tmp_path, local_dir=local_dir, work=work)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """Lines of stderr that report an error (ours say ``error:``, Click's ``Error:``)."""
        return [line for line in self.stderr.splitlines() if "error:" in line.lower()]

    def assert_one_error(self, *culprits: str) -> str:
        """Exactly one error line on stderr, naming every culprit, and no traceback."""
        assert "Traceback" not in self.stderr, self.stderr
        assert len(self.error_lines) == 1, self.stderr
        line = self.error_lines[0]
        for culprit in culprits:
            assert culprit in line, (culprit, line)
        return line


@pytest.fixture
def cli(env: Env) -> Callable[..., CliResult]:
    """Run ``cloudbackup.cli.main([...])`` in-process; stdout and stderr kept apart."""
    from cloudbackup.cli.commands import main

    def run(*args: str | os.PathLike[str]) -> CliResult:
        runner = CliRunner()
        code: int | str | None = 0
        with runner.isolation() as (out, err, _mixed):
            try:
                main([os.fspath(a) for a in args])
            except SystemExit as exc:
                code = exc.code
            finally:  # the interpreter would flush at exit; here we must
                sys.stdout.flush()
                sys.stderr.flush()
        # main() binds the logger to the (now discarded) captured stderr: unbind it.
        logger = logging.getLogger("cloudbackup")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        assert isinstance(code, int), f"main() exited with {code!r}"
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())

    return run


class Clock:
    """A settable clock behind ``cloudbackup.cli._now``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Freeze the CLI's clock at 2026-11-21T02:15:00Z (move it with ``clock.advance``)."""
    frozen = Clock(datetime(2026, 11, 21, 2, 15, 0, tzinfo=UTC))
    monkeypatch.setattr("cloudbackup.cli.commands._now", frozen)
    return frozen


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``root`` with ``files`` (relative path -> content); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


# ---------------------------------------------------------------- S3 (moto server)

from collections.abc import Iterator  # noqa: E402 - appended section, kept self-contained
from typing import Any  # noqa: E402


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """One moto ``ThreadedMotoServer`` on 127.0.0.1 (a free port) per session; yields its URL.

    It shares moto's in-process state: a test using ``mock_aws`` resets it, which is harmless
    because every ``s3_env`` test creates a fresh bucket.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class S3Env:
    """A fresh bucket on the session's moto server; ``client`` talks to moto directly."""

    endpoint: str
    bucket: str
    client: Any
    prefix: str = "cloudbackup"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def key(self, host: str, source: str, name: str) -> str:
        return f"{self.prefix}/{host}/{source}/{name}"


def s3_test_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only fake credentials: no real AWS variable, profile or config file can leak in."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def s3_env(env: Env, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    """Fake AWS credentials, a fresh bucket per test, CLOUDBACKUP_S3_BUCKET and
    CLOUDBACKUP_S3_ENDPOINT_URL set (point the endpoint at a fault proxy to inject faults)."""
    import uuid

    fake_aws_credentials(monkeypatch)
    bucket = f"cb-test-{uuid.uuid4().hex[:16]}"
    client = s3_test_client(moto_server)
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", bucket)
    monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", moto_server)
    return S3Env(endpoint=moto_server, bucket=bucket, client=client)


# ---------------------------------------------------------------- the two destinations


@dataclass
class RemoteEnv:
    """The offsite destination of an end-to-end test: a fresh bucket on the session's moto
    server (``kind == "s3"``) or a directory destination (``kind == "dir"``,
    ``CLOUDBACKUP_DEST=file://<root>``), seen from outside the tool."""

    kind: str
    s3: S3Env | None = None
    root: Path | None = None
    prefix: str = "cloudbackup"

    def key(self, host: str, source: str, name: str) -> str:
        return f"{self.prefix}/{host}/{source}/{name}"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key (a directory destination: regular files, the store's own temp
        files and uploads left out)."""
        if self.s3 is not None:
            return self.s3.keys(prefix)
        assert self.root is not None
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".~")]
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith(".~") or path.is_symlink():
                    continue
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def get(self, key: str) -> bytes:
        if self.s3 is not None:
            body = self.s3.client.get_object(Bucket=self.s3.bucket, Key=key)["Body"]
            return body.read()  # type: ignore[no-any-return]
        assert self.root is not None
        return (self.root / key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object behind the tool's back."""
        if self.s3 is not None:
            self.s3.client.put_object(Bucket=self.s3.bucket, Key=key, Body=data)
            return
        assert self.root is not None
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, key: str) -> None:
        if self.s3 is not None:
            self.s3.client.delete_object(Bucket=self.s3.bucket, Key=key)
            return
        assert self.root is not None
        (self.root / key).unlink()

    def uploads(self) -> list[str]:
        """The keys of the multipart uploads in progress."""
        if self.s3 is not None:
            page = self.s3.client.list_multipart_uploads(Bucket=self.s3.bucket)
            return sorted(u["Key"] for u in page.get("Uploads", []))
        assert self.root is not None
        found = []
        for name_file in self.root.rglob(".~upload-*/name"):
            found.append(
                (name_file.parent.parent / name_file.read_text().strip())
                .relative_to(self.root)
                .as_posix()
            )
        return sorted(found)


@pytest.fixture(params=["s3", "dir"])
def remote(request: pytest.FixtureRequest, env: Env, monkeypatch: pytest.MonkeyPatch) -> RemoteEnv:
    """The test runs twice: against a bucket (moto) and against a directory destination."""
    if request.param == "s3":
        return RemoteEnv("s3", s3=request.getfixturevalue("s3_env"))
    root = env.tmp / "dest"
    root.mkdir()
    monkeypatch.setenv("CLOUDBACKUP_DEST", root.as_uri())
    return RemoteEnv("dir", root=root)


# ---------------------------------------------------------------- PostgreSQL (one server)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server for the whole session (unix socket + loopback port, SCRAM
    passwords): a ``tests.integration.pgserver.PgServer``, started on first use and stopped
    at the end (imported lazily: tests that never ask for it never touch PostgreSQL)."""
    from tests.integration.pgserver import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


def kill_when(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], Any],
    timeout: float = 60,
    settle: float = 0.0,
) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (``settle`` seconds later), asserting it
    was still running then; always reaps it."""
    try:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert ready(), "the process never reached the point where it should be killed"
        time.sleep(settle)
        assert proc.poll() is None, "the process finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
