"""Monitoring: `status` exit codes and JSON, Prometheus textfile metrics, the last-run state
and healthchecks-style pings. Local only (no bucket) except the "bucket cannot be listed"
case, which points the endpoint at a closed port; S3-backed status cases live in
tests/integration/test_run.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudbackup.ops import status as monitor
from cloudbackup.stream import tarwriter as archive
from tests.conftest import Clock, Env, fake_aws_credentials, make_tree

STATUS_KEYS = {
    "source",
    "newest",
    "age_seconds",
    "local_count",
    "remote_count",
    "bytes",
    "state",
    "future_dated",
}


# ---------------------------------------------------------------- a healthchecks-style server


@dataclass
class Ping:
    method: str
    path: str
    body: str


class PingServer:
    """A tiny HTTP server on 127.0.0.1 recording every request (method, path, body)."""

    def __init__(self) -> None:
        self.pings: list[Ping] = []
        pings = self.pings

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace") if length else ""
                pings.append(Ping(self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = do_HEAD = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}/ping/0f6c2b9e"

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(method, path relative to the ping URL) in order."""
        return [(p.method, p.path.removeprefix("/ping/0f6c2b9e") or "/") for p in self.pings]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> PingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    with PingServer() as server:
        yield server


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ping"


@contextmanager
def hanging_server() -> Iterator[str]:
    """A URL whose socket accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/ping"


@pytest.fixture
def hanging_url() -> Iterator[str]:
    with hanging_server() as url:
        yield url


# ---------------------------------------------------------------- pings


def test_ping_get_and_post(ping_server: PingServer) -> None:
    assert monitor.ping(ping_server.url, "/start") is True
    assert monitor.ping(ping_server.url) is True
    assert monitor.ping(ping_server.url + "/", "/fail", body="2 sources failed: db") is True
    assert ping_server.calls == [("GET", "/start"), ("GET", "/"), ("POST", "/fail")]
    assert ping_server.pings[2].body == "2 sources failed: db"


def test_ping_unset_does_nothing() -> None:
    assert monitor.ping(None, "/start") is False
    assert monitor.ping("", "/fail", body="x") is False


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Messages logged on the ``cloudbackup`` logger (which does not propagate to root)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("cloudbackup")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_ping_down_never_raises(log_lines: list[str]) -> None:
    started = time.monotonic()
    assert monitor.ping(closed_port_url() + "?token=s3cret", "/fail", body="x") is False
    assert time.monotonic() - started < 5
    text = "\n".join(log_lines)
    assert "ping" in text and "not affected" in text
    assert "s3cret" not in text  # the query (often a token) is not logged


def test_ping_keeps_a_query_string_after_the_suffix(ping_server: PingServer) -> None:
    assert monitor.ping(ping_server.url + "?rid=42", "/start") is True
    assert monitor.ping(ping_server.url + "/?rid=42") is True
    assert [p.path for p in ping_server.pings] == [
        "/ping/0f6c2b9e/start?rid=42",
        "/ping/0f6c2b9e?rid=42",
    ]


def test_ping_hanging_server_times_out(hanging_url: str) -> None:
    started = time.monotonic()
    assert monitor.ping(hanging_url, "/start", timeout=0.5) is False
    assert time.monotonic() - started < 5


def test_ping_malformed_url_never_raises() -> None:
    assert monitor.ping("not a url", "/start") is False
    assert monitor.ping("http://[::1", "/start") is False


# ---------------------------------------------------------------- last-run state


def test_last_run_state_round_trip(tmp_path: Path) -> None:
    assert monitor.read_last_run(tmp_path, "h") is None
    path = monitor.last_run_path(tmp_path, "h")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert monitor.read_last_run(tmp_path, "h") is None
    path.write_text("[1, 2]")
    assert monitor.read_last_run(tmp_path, "h") is None
    path.write_text(json.dumps({"exit_code": 1}))
    assert monitor.read_last_run(tmp_path, "h") == {"exit_code": 1}
    assert monitor.read_last_run(tmp_path, "other") is None


# ---------------------------------------------------------------- status via the CLI


@pytest.fixture
def sources(env: Env, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Two directory sources, configured, local-only."""
    trees = {
        "www": make_tree(
            env.tmp / "srv" / "www", {f"page{i}.html": f"<p>{i}</p>" for i in range(4)}
        ),
        "etc": make_tree(env.tmp / "srv" / "etc", {"app.conf": "a=1\n", "db.conf": "b=2\n"}),
    }
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", ",".join(str(p) for p in trees.values()))
    monkeypatch.setenv("CLOUDBACKUP_LOCAL_ONLY", "1")
    return trees


def status_json(cli: Any, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("status", "--json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, json.loads(result.stdout)


def by_source(document: dict[str, Any], host: str = "testhost") -> dict[str, dict[str, Any]]:
    (entry,) = [h for h in document["hosts"] if h["host"] == host]
    return {s["source"]: s for s in entry["sources"]}


def test_status_fresh_is_ok_with_the_spec_json_shape(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    assert cli("run").exit_code == 0
    clock.advance(hours=2)
    code, doc = status_json(cli)
    assert code == 0
    assert doc["state"] == "OK"
    assert [h["host"] for h in doc["hosts"]] == ["testhost"]
    rows = by_source(doc)
    assert set(rows) == {"www", "etc"}
    for name, row in rows.items():
        assert STATUS_KEYS <= set(row), row
        assert row["newest"] == f"{name}-20261121T021500Z"
        assert row["age_seconds"] == 7200
        assert (row["local_count"], row["remote_count"]) == (1, 0)
        assert row["bytes"] > 0
        assert row["state"] == "OK"
    human = cli("status")
    assert human.exit_code == 0
    assert "www-20261121T021500Z" in human.stdout and "status: OK" in human.stdout


def test_status_stale_beyond_max_age_is_critical(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    assert cli("run").exit_code == 0
    clock.advance(hours=27)
    code, doc = status_json(cli)
    assert code == 2 and doc["state"] == "CRITICAL"
    assert all(row["state"] == "CRITICAL" for row in by_source(doc).values())
    assert cli("status", "--max-age", "2d").exit_code == 0
    clock.advance(hours=20)  # 47 h old
    assert cli("status", "--max-age", "2d").exit_code == 0
    assert cli("status", "--max-age", "46h").exit_code == 2
    text = cli("status").stdout
    assert "CRITICAL" in text and "older than 26h" in text


def test_status_missing_backup_of_a_configured_source_is_critical(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("run").exit_code == 0
    new = make_tree(env.tmp / "srv" / "mail", {"inbox": "hello"})
    monkeypatch.setenv("CLOUDBACKUP_SOURCES", ",".join(str(p) for p in [*sources.values(), new]))
    code, doc = status_json(cli)
    assert code == 2 and doc["state"] == "CRITICAL"
    rows = by_source(doc)
    assert rows["mail"]["state"] == "CRITICAL" and rows["mail"]["newest"] is None
    assert rows["mail"]["age_seconds"] is None and rows["mail"]["local_count"] == 0
    assert rows["www"]["state"] == "OK"
    assert "no backup" in cli("status").stdout


def test_status_no_sources_and_no_backups(env: Env, cli: Any, clock: Clock) -> None:
    code, doc = status_json(cli)
    assert code == 2
    assert doc["hosts"] == [{"host": "testhost", "sources": []}]


def test_status_warns_when_the_last_run_had_unreadable_files(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    unreadable = str(sources["www"] / "page2.html")
    real_open = archive._open_nofollow

    def fake_open(path: str, **kwargs: Any) -> int:
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, **kwargs)

    monkeypatch.setattr(archive, "_open_nofollow", fake_open)
    result = cli("run")
    assert result.exit_code == 1, result.stderr
    assert "page2.html" in result.stderr
    assert "run completed with warnings" in result.stdout
    code, doc = status_json(cli)
    assert code == 1 and doc["state"] == "WARNING"
    rows = by_source(doc)
    assert rows["www"]["state"] == "WARNING" and rows["etc"]["state"] == "OK"
    assert "warnings" in cli("status").stdout
    # The next clean run clears the warning.
    monkeypatch.setattr(archive, "_open_nofollow", real_open)
    clock.advance(days=1)
    assert cli("run").exit_code == 0
    assert cli("status").exit_code == 0


def test_status_warns_after_a_shrink_guard_stop(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    assert cli("run").exit_code == 0
    for page in list(sources["www"].iterdir())[1:]:
        page.unlink()
    clock.advance(days=1)
    result = cli("run")
    assert result.exit_code == 1
    assert "shrank" in result.stdout + result.stderr
    code, doc = status_json(cli)
    assert code == 1
    rows = by_source(doc)
    assert rows["www"]["state"] == "WARNING" and rows["www"]["newest"] == "www-20261121T021500Z"
    assert rows["etc"]["state"] == "OK"
    assert "shrink guard" in cli("status").stdout


def test_status_unknown_on_invalid_configuration(
    env: Env, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBACKUP_COMPRESSION", "rar")
    result = cli("status")
    assert result.exit_code == 3
    assert "UNKNOWN" in result.stdout and "CLOUDBACKUP_COMPRESSION" in result.stdout
    assert "Traceback" not in result.stderr
    code, doc = status_json(cli)
    assert code == 3 and doc["state"] == "UNKNOWN"
    assert cli("status", "--max-age", "soon").exit_code == 3


def test_status_unknown_when_the_bucket_cannot_be_listed(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("run").exit_code == 0
    fake_aws_credentials(monkeypatch)
    monkeypatch.delenv("CLOUDBACKUP_LOCAL_ONLY")
    monkeypatch.setenv("CLOUDBACKUP_S3_BUCKET", "backups")
    monkeypatch.setenv("CLOUDBACKUP_S3_ENDPOINT_URL", closed_port_url().removesuffix("/ping"))
    monkeypatch.setenv("CLOUDBACKUP_RETRY_ATTEMPTS", "1")
    started = time.monotonic()
    code, doc = status_json(cli)
    assert time.monotonic() - started < 30
    assert code == 3 and doc["state"] == "UNKNOWN"
    assert any("cannot list the bucket" in line for line in doc["detail"])
    assert by_source(doc)["www"]["local_count"] == 1  # local facts are still reported


# ---------------------------------------------------------------- Prometheus


def families(path: Path) -> dict[str, Any]:
    text = path.read_text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_textfile(env: Env, cli: Any, clock: Clock, sources: dict[str, Path]) -> None:
    assert cli("run").exit_code == 0
    prom = env.tmp / "textfile" / "cloudbackup.prom"
    result = cli("status", "--prometheus", prom)
    assert result.exit_code == 0, result.stderr
    text = prom.read_text()
    for name in (
        "cloudbackup_last_success_timestamp_seconds",
        "cloudbackup_backup_size_bytes",
        "cloudbackup_backups",
        "cloudbackup_last_run_status",
    ):
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text
    fams = families(prom)
    last = {
        (s.labels["host"], s.labels["source"]): s.value
        for s in fams["cloudbackup_last_success_timestamp_seconds"].samples
    }
    expected = clock.now.timestamp()
    assert last == {("testhost", "www"): expected, ("testhost", "etc"): expected}
    sizes = {s.labels["source"]: s.value for s in fams["cloudbackup_backup_size_bytes"].samples}
    assert set(sizes) == {"www", "etc"} and all(v > 0 for v in sizes.values())
    counts = {
        (s.labels["source"], s.labels["where"]): s.value
        for s in fams["cloudbackup_backups"].samples
    }
    assert counts[("www", "local")] == 1 and counts[("www", "remote")] == 0
    (run_status,) = fams["cloudbackup_last_run_status"].samples
    assert run_status.value == 0


def test_prometheus_reports_a_failed_last_run(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("run").exit_code == 0
    missing = env.tmp / "srv" / "gone"
    monkeypatch.setenv(
        "CLOUDBACKUP_SOURCES", ",".join(str(p) for p in [*sources.values(), missing])
    )
    clock.advance(hours=1)
    assert cli("run").exit_code == 1
    prom = env.tmp / "metrics.prom"
    assert cli("status", "--prometheus", prom).exit_code == 2  # "gone" has no backup
    fams = families(prom)
    (run_status,) = fams["cloudbackup_last_run_status"].samples
    assert run_status.value == 1
    states = {s.labels["source"]: s.value for s in fams["cloudbackup_source_state"].samples}
    assert states == {"www": 0, "etc": 0, "gone": 2}
    # No timestamp for a source that never had a backup (absent, not 0).
    stamps = fams["cloudbackup_last_success_timestamp_seconds"].samples
    assert {s.labels["source"] for s in stamps} == {"www", "etc"}


def test_prometheus_file_is_replaced_atomically(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    assert cli("run").exit_code == 0
    directory = env.tmp / "textfile"
    prom = directory / "cloudbackup.prom"
    assert cli("status", "--prometheus", prom).exit_code == 0
    first = os.stat(prom)
    clock.advance(hours=1)
    assert cli("status", "--prometheus", prom, "--json").exit_code == 0
    second = os.stat(prom)
    assert second.st_ino != first.st_ino  # a new file renamed over the old one
    assert sorted(p.name for p in directory.iterdir()) == ["cloudbackup.prom"]
    assert second.st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert families(prom)  # still complete and parseable


def test_prometheus_text_escapes_labels() -> None:
    st = monitor.SourceStatus(host='we"ird\\host', source="www")
    report = monitor.StatusReport(hosts={st.host: [st]}, state=monitor.CRITICAL)
    fams = {f.name: f for f in text_string_to_metric_families(monitor.prometheus_text(report))}
    (sample,) = fams["cloudbackup_source_state"].samples
    assert sample.labels["host"] == 'we"ird\\host'
    assert fams["cloudbackup_last_run_status"].samples == []


def test_prometheus_file_that_cannot_be_written_is_unknown(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    assert cli("run").exit_code == 0
    blocker = env.tmp / "not-a-dir"
    blocker.write_text("")
    result = cli("status", "--prometheus", blocker / "cloudbackup.prom")
    assert result.exit_code == 3
    assert "cannot write" in result.stdout and "status: UNKNOWN" in result.stdout
    assert "Traceback" not in result.stderr


def test_prometheus_write_leaves_no_temp_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: object, dst: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError):
        monitor.write_prometheus(tmp_path / "m.prom", "x 1\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "seconds"), [("1m", 60), ("26h", 93600), ("3650d", 315360000)])
def test_max_age_bounds_are_inclusive(text: str, seconds: int) -> None:
    assert monitor.parse_max_age(text).total_seconds() == seconds


def test_future_dated_backups_never_reach_the_freshness_metrics(
    env: Env, cli: Any, clock: Clock, sources: dict[str, Path]
) -> None:
    now = clock.now
    assert cli("run").exit_code == 0
    clock.advance(days=3650)  # a clock ten years ahead for one run
    assert cli("run").exit_code == 0
    clock.now = now
    code, doc = status_json(cli)
    assert code == 1 and doc["state"] == "WARNING"
    for name, row in by_source(doc).items():
        assert row["newest"] == f"{name}-20261121T021500Z" and row["age_seconds"] == 0
        assert row["future_dated"] == [f"{name}-20361118T021500Z"]
    prom = env.tmp / "m.prom"
    cli("status", "--prometheus", prom)
    fams = families(prom)
    for sample in fams["cloudbackup_last_success_timestamp_seconds"].samples:
        assert sample.value == now.timestamp()
    assert {s.value for s in fams["cloudbackup_future_dated_backups"].samples} == {1.0}
