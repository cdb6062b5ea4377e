"""Notifications end to end on 127.0.0.1: one e-mail through a local SMTP server (aiosmtpd,
plain `mailto://`), a JSON webhook (`json://`) to a local HTTP server, and targets that
refuse or never answer: a warning each, never an exception, within the send's time bound."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from cloudbackup.cli.output import RedactingFilter
from cloudbackup.ops.notify import LogTail, classify, compose, send, target_secrets, validate
from cloudbackup.sources.base import url_secrets
from tests.test_monitor import closed_port_url, hanging_server

pytestmark = pytest.mark.slow

DB_URL = "postgresql://app:s3cr%40tPW@db.example.org:5432/shop"
LOG_PASSWORD = "hunter2-log-secret"


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None
        content = body.get_content()
        assert isinstance(content, str)
        return content


class _SMTPHandler:
    def __init__(self) -> None:
        self.mails: list[Mail] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[str, _SMTPHandler]]:
    """A plain SMTP server (no TLS, no auth) on 127.0.0.1 and the `mailto://` URL for it."""
    handler = _SMTPHandler()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"mailto://127.0.0.1:{port}?from=backup@example.org&to=ops@example.org", handler
    finally:
        controller.stop()


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


@pytest.fixture
def webhook() -> Iterator[tuple[int, list[Request]]]:
    requests: list[Request] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            requests.append(Request(self.path, dict(self.headers.items()), self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()


def _failed_night(redactor: RedactingFilter) -> tuple[str, tuple[str, ...]]:
    """A failed night as the CLI will see it: a summary naming the database URL, and a log
    whose tail holds a password, taken by a LogTail with the run's redacting filter."""
    tail = LogTail(redact=redactor.redact)
    logger = logging.getLogger("cloudbackup.test-notify-delivery")
    logger.handlers[:] = [tail]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for n in range(1, 71):
        logger.info("event %03d", n)
    logger.error("pg_dump: connection to %s failed: password %s rejected", DB_URL, LOG_PASSWORD)
    summary = f"source  result  error\nwww     ok\nshop    FAILED  cannot dump {DB_URL}\n"
    return summary, tail.lines()


def test_failure_mail_through_local_smtp(smtp: tuple[str, _SMTPHandler]) -> None:
    url, server = smtp
    validate([url])
    redactor = RedactingFilter([*url_secrets(DB_URL), LOG_PASSWORD, *target_secrets([url])])
    summary, tail = _failed_night(redactor)
    message = compose("web1", classify(1, failed=True), 1, summary, tail, redact=redactor.redact)

    assert send([url], message) == []

    assert len(server.mails) == 1
    mail = server.mails[0]
    assert mail.sender == "backup@example.org" and mail.recipients == ["ops@example.org"]
    assert mail.message["Subject"] == "cloudbackup web1: failed (exit 1)"
    text = mail.text
    assert "shop    FAILED  cannot dump postgresql://app:***@db.example.org:5432/shop" in text
    lines = text.splitlines()
    start = lines.index("Last 50 log lines:")
    logged = lines[start + 1 : start + 51]
    assert len(logged) == 50
    assert logged[0].endswith("INFO event 022") and logged[-2].endswith("INFO event 070")
    assert "password *** rejected" in logged[-1]
    for secret in ("s3cr%40tPW", "s3cr@tPW", "s3cr", LOG_PASSWORD):
        assert secret not in text, secret
        assert secret.encode() not in mail.raw, secret


def test_json_webhook_receives_title_type_and_body(webhook: tuple[int, list[Request]]) -> None:
    port, requests = webhook
    url = f"json://hookuser:hook-token-123@127.0.0.1:{port}/cloudbackup/hook"
    validate([url])
    redactor = RedactingFilter([*url_secrets(DB_URL), LOG_PASSWORD])
    summary, tail = _failed_night(redactor)
    message = compose("web1", "warning", 1, summary, tail, redact=redactor.redact)

    assert send([url], message) == []

    assert len(requests) == 1
    request = requests[0]
    assert request.path == "/cloudbackup/hook"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.headers["Authorization"].startswith("Basic ")  # the URL's user:password
    payload = json.loads(request.body)
    assert payload["title"] == "cloudbackup web1: warning (exit 1)"
    assert payload["type"] == "warning"
    assert payload["message"] == message.body
    assert "Last 50 log lines:" in payload["message"]
    assert LOG_PASSWORD not in payload["message"] and "s3cr" not in payload["message"]


def test_unreachable_target_is_a_warning_and_the_others_still_get_it(
    smtp: tuple[str, _SMTPHandler], capfd: pytest.CaptureFixture[str]
) -> None:
    mail_url, server = smtp
    refused = closed_port_url().replace("http://", "json://user:refused-secret@")
    message = compose("web1", "failed", 2, "configuration error", [], redact=str)

    warnings = send([refused, mail_url], message)

    assert len(warnings) == 1
    assert warnings[0].startswith("notification entry 1, json://*** not sent: ")
    assert "refused-secret" not in warnings[0] and "127.0.0.1" not in warnings[0]
    assert len(server.mails) == 1  # the second target was not held up by the first
    captured = capfd.readouterr()  # Apprise's own log lines reach no stream
    assert captured.out == "" and captured.err == ""


def test_a_target_that_never_answers_is_given_up_within_the_bound() -> None:
    with hanging_server() as http_url:
        url = http_url.replace("http://", "json://") + "?rto=30"  # Apprise itself would wait 30 s
        message = compose("web1", "failed", 1, "summary", [], redact=str)
        warnings = send([url], message, timeout=1.5)
    assert warnings == ["notification entry 1, json://*** not sent: no answer within 1.5 s"]


def test_smtp_server_that_is_down_is_a_warning() -> None:
    port = _free_port()
    url = f"mailto://user:smtp-pass@127.0.0.1:{port}?from=backup@example.org&to=ops@example.org"
    warnings = send([url], compose("web1", "failed", 1, "s", [], redact=str))
    assert len(warnings) == 1 and warnings[0].startswith("notification entry 1, mailto://*** not sent")
    assert "smtp-pass" not in warnings[0]
