"""Shared fixtures: an isolated environment, an in-process CLI runner and a frozen clock."""

from __future__ import annotations

import logging
import os
import sys
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
    from cloudbackup.cli import main

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
    monkeypatch.setattr("cloudbackup.cli._now", frozen)
    return frozen


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create ``root`` with ``files`` (relative path -> content); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root
