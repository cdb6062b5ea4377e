"""Command sources: run without a shell; stdout archived as ``<name>.out``; stderr to the log;
a non-zero exit or a signal fails the source and leaves no archive and no spool file."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.core.patterns import PathMatcher
from cloudbackup.sources.base import SourceContext
from cloudbackup.sources.command import CommandSource
from cloudbackup.sources.process import run_to_file
from cloudbackup.sources.registry import parse_spec
from tests.conftest import CliResult, Env, make_tree
from tests.manifests import load_manifest

CHILD_ENV = childenv.scrub(os.environ)


def read_archive(path: Path) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


@pytest.fixture
def log_file(env: Env, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = env.tmp / "cloudbackup.log"
    monkeypatch.setenv("CLOUDBACKUP_LOG_FILE", str(path))
    return path


def test_good_command_archives_its_stdout(
    env: Env, cli: Callable[..., CliResult], log_file: Path
) -> None:
    result = cli(
        "backup", "--no-upload", "dump=cmd:sh -c 'echo data; echo line2; echo progress >&2'"
    )
    assert result.exit_code == 0, result.stderr
    (archive,) = env.archives("dump")
    assert read_archive(archive) == {"dump.out": b"data\nline2\n"}
    manifest = load_manifest(env.manifests("dump")[0])
    assert manifest.kind == "command" and manifest.members["output"] == "dump.out"
    assert "source dump: command 'sh': progress" in log_file.read_text()
    assert not list(env.source_dir("dump").glob("*.partial"))


def test_non_zero_exit_fails_the_source(
    env: Env, cli: Callable[..., CliResult], log_file: Path
) -> None:
    www = make_tree(env.tmp / "www", {"index.html": "hi"})
    result = cli("backup", "--no-upload", "bad=cmd:sh -c 'echo data; echo boom >&2; exit 3'", www)
    assert result.exit_code == 1
    line = result.assert_one_error("source bad", "exited with status 3", "boom")
    assert "see the log" in line
    assert env.archives("bad") == [] and not any(env.files("bad", "*.partial"))
    assert len(env.archives("www")) == 1
    assert "source bad: command 'sh': boom" in log_file.read_text()


def test_killed_command_fails_the_source(env: Env, cli: Callable[..., CliResult]) -> None:
    result = cli("backup", "--no-upload", "k=cmd:sh -c 'echo partial; kill -9 $$'")
    assert result.exit_code == 1
    result.assert_one_error("source k", "killed by signal 9", "SIGKILL")
    assert env.archives("k") == [] and not any(env.files("k", "*"))


def test_no_shell_is_involved(env: Env, cli: Callable[..., CliResult]) -> None:
    result = cli("backup", "--no-upload", "lit=cmd:echo $HOME ; * `id` 'a  b'")
    assert result.exit_code == 0, result.stderr
    (archive,) = env.archives("lit")
    assert read_archive(archive) == {"lit.out": b"$HOME ; * `id` a  b\n"}


def test_missing_program_fails(env: Env, cli: Callable[..., CliResult]) -> None:
    result = cli("backup", "--no-upload", "m=cmd:/nonexistent/dumper --all")
    assert result.exit_code == 1
    result.assert_one_error("source m", "/nonexistent/dumper", "not found")
    assert not any(env.files("m", "*"))


def test_empty_output_is_stopped_by_the_shrink_guard(
    env: Env, cli: Callable[..., CliResult]
) -> None:
    result = cli("backup", "--no-upload", "empty=cmd:true")
    assert result.exit_code == 1
    result.assert_one_error("empty", "0 bytes")
    assert env.archives("empty") == []


def _ctx(spool: Path, lines: list[str]) -> SourceContext:
    return SourceContext(
        spool, "x-1", PathMatcher([]), frozenset(), lambda c, m: None, lines.append
    )


def test_run_to_file_streams_stdout_and_logs_stderr(tmp_path: Path) -> None:
    lines: list[str] = []
    dest = tmp_path / "out.partial"
    script = "import sys; sys.stdout.write('x' * 3_000_000); print('warn 1', file=sys.stderr)"
    run_to_file(
        ["python3", "-c", script], dest, _ctx(tmp_path, lines), label="cmd", env=CHILD_ENV
    )
    assert dest.stat().st_size == 3_000_000 and oct(dest.stat().st_mode & 0o777) == oct(0o600)
    assert lines == ["cmd: warn 1"]


def test_run_to_file_removes_output_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out.partial"
    with pytest.raises(SourceError, match="exited with status 2: last words"):
        run_to_file(
            ["sh", "-c", "echo half; echo first >&2; echo last words >&2; exit 2"],
            dest,
            _ctx(tmp_path, []),
            label="cmd",
            env=CHILD_ENV,
        )
    assert not dest.exists()


def test_check_finds_the_program() -> None:
    assert CommandSource(parse_spec("x=cmd:sh -c true")).check() == "command sh"
    with pytest.raises(SourceError, match="not found"):
        CommandSource(parse_spec("x=cmd:no-such-program-here")).check()
