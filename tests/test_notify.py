"""Notifications, the parts without a network: targets, policy, outcome words, the message
(title, type, redacted body with the log tail), validation of Apprise URLs, the log tail."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from cloudbackup.cli.output import RedactingFilter
from cloudbackup.core.errors import ConfigError
from cloudbackup.ops import notify
from cloudbackup.ops.notify import (
    LogTail,
    NotifyOn,
    classify,
    compose,
    parse_notify_on,
    parse_targets,
    should_notify,
    target_label,
    target_secrets,
    validate,
)
from cloudbackup.sources.base import url_secrets

DB_URL = "postgresql://app:s3cr%40t@db.example.org:5432/shop"


def _identity(text: str) -> str:
    return text


# --------------------------------------------------------------------------- settings


def test_targets_split_on_newlines_and_on_commas_before_a_url() -> None:
    text = """
        # the on-call mailbox and the team's webhook
        mailto://ops:pw@smtp.example.org?to=a@example.org,b@example.org
        json://hooks.example.org/backup, ntfys://ntfy.example.org/backups,
        json://hooks.example.org/backup
    """
    assert parse_targets(text) == (
        "mailto://ops:pw@smtp.example.org?to=a@example.org,b@example.org",
        "json://hooks.example.org/backup",
        "ntfys://ntfy.example.org/backups",
    )
    assert parse_targets("") == ()
    assert parse_targets(None) == ()
    assert parse_targets(" , \n") == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, NotifyOn.FAILURE), ("", NotifyOn.FAILURE), ("failure", NotifyOn.FAILURE),
     ("Warning", NotifyOn.WARNING), (" always ", NotifyOn.ALWAYS)],
)
def test_notify_on_parses(text: str | None, expected: NotifyOn) -> None:
    assert parse_notify_on(text) == expected


def test_bad_notify_on_is_exit_2_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_notify_on("errors")
    assert caught.value.exit_code == 2
    assert "CLOUDBACKUP_NOTIFY_ON='errors'" in str(caught.value)
    assert "failure" in str(caught.value) and "always" in str(caught.value)


# --------------------------------------------------------------------------- outcome


@pytest.mark.parametrize(
    ("exit_code", "failed", "outcome"),
    [
        (0, False, "ok"),
        (1, False, "warning"),  # completed with warnings (unreadable files)
        (1, True, "failed"),  # a source failed (or the before-hook)
        (2, False, "failed"),
        (3, False, "failed"),
        (4, False, "failed"),
        (130, False, "failed"),
        (143, False, "failed"),
        (70, False, "failed"),  # an unexpected error
    ],
)
def test_classify(exit_code: int, failed: bool, outcome: str) -> None:
    assert classify(exit_code, failed=failed) == outcome


@pytest.mark.parametrize(
    ("notify_on", "sent_for"),
    [
        (NotifyOn.FAILURE, {"failed"}),
        (NotifyOn.WARNING, {"failed", "warning"}),
        (NotifyOn.ALWAYS, {"failed", "warning", "ok"}),
    ],
)
def test_should_notify(notify_on: NotifyOn, sent_for: set[str]) -> None:
    for outcome in ("ok", "warning", "failed"):
        assert should_notify(outcome, notify_on) == (outcome in sent_for)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the message


def test_message_title_type_and_body() -> None:
    tail = [f"line {n}" for n in range(1, 61)]
    message = compose("web1", "failed", 1, "www  FAILED  disk full\n", tail, redact=_identity)
    assert message.title == "cloudbackup web1: failed (exit 1)"
    assert message.notify_type == "failure"
    summary, log = message.body.split("\n\n", 1)
    assert summary == "www  FAILED  disk full"
    assert log.splitlines() == ["Last 50 log lines:", *tail[10:]]
    assert compose("web1", "ok", 0, "fine", [], redact=_identity).notify_type == "success"
    warned = compose("web1", "warning", 1, "", [], redact=_identity)
    assert warned.notify_type == "warning" and warned.title == "cloudbackup web1: warning (exit 1)"
    assert warned.body == "(no summary)"
    with pytest.raises(ValueError):
        compose("web1", "interrupted", 130, "", [], redact=_identity)  # type: ignore[arg-type]


def test_message_is_redacted_with_the_runs_own_filter() -> None:
    """The password of a database URL (encoded and decoded, and the SPEC's last-`@` rule) and
    any other known secret are hidden in the summary and the log lines."""
    tricky = "postgresql://app:p@ss@db/shop"  # the password is `p@ss`
    redactor = RedactingFilter([*url_secrets(DB_URL), *url_secrets(tricky), "hunter2"])
    message = compose(
        "web1", "failed", 1,
        f"shop  FAILED  pg_dump: could not connect to {DB_URL}\nold  FAILED  {tricky}",
        ["ERROR login with password hunter2 refused", "INFO s3cr@t tried"],
        redact=redactor.redact,
    )
    for secret in ("s3cr%40t", "s3cr@t", "hunter2", "p@ss", "ss@db"):
        assert secret not in message.body, secret
    assert "postgresql://app:***@db.example.org:5432/shop" in message.body


def test_hostile_log_lines_cannot_forge_lines_or_escape_codes() -> None:
    message = compose(
        "web1", "failed", 1, "summary\r\x1b[2Jclean",
        ["WARNING file 'a\nINFO all good' vanished", "x\x1b]0;owned\x07"],
        redact=_identity,
    )
    body_lines = message.body.splitlines()
    assert "INFO all good' vanished" not in body_lines
    assert "WARNING file 'a\\nINFO all good' vanished" in body_lines
    assert "\x1b" not in message.body and "\r" not in message.body and "\x07" not in message.body
    assert "summary\\r\\x1b[2Jclean" in body_lines


# --------------------------------------------------------------------------- targets shown and hidden


def test_target_label_shows_the_scheme_only() -> None:
    assert target_label("mailto://ops:pw@smtp.example.org") == "mailto://***"
    assert target_label("tgram://123456:AAbottoken/-100chat", 3) == "entry 3, tgram://***"
    assert target_label("just-a-token", 1) == "entry 1, ***"


def test_target_secrets_hide_the_whole_url_and_its_password() -> None:
    url = "mailtos://ops:p%40ss@w@smtp.example.org?to=x@example.org"
    secrets = target_secrets([url])
    assert url in secrets
    assert "p%40ss@w" in secrets and "p@ss@w" in secrets  # last-@ rule, raw and decoded
    assert target_secrets(["json://hooks.example.org/x"]) == ["json://hooks.example.org/x"]


# --------------------------------------------------------------------------- validation (Apprise)


def test_valid_targets_pass() -> None:
    validate(
        [
            "mailto://127.0.0.1:2525?from=backup@example.org&to=ops@example.org",
            "json://user:pw@127.0.0.1:8080/hook",
            "ntfys://ntfy.example.org/backups",
        ]
    )
    validate([])


def test_unparsable_target_is_a_config_error_naming_it_without_its_secrets(
    capfd: pytest.CaptureFixture[str],
) -> None:
    urls = [
        "json://127.0.0.1:8080/hook",
        "slack://T1JJ3T3L2/onlyonetoken",  # Slack needs three tokens
        "foo://user:topsecretpw@example.org",  # no such service
        "tokenwithoutscheme",
    ]
    with pytest.raises(ConfigError) as caught:
        validate(urls)
    text = str(caught.value)
    assert caught.value.exit_code == 2
    assert text.startswith("CLOUDBACKUP_NOTIFY: ")
    assert "entry 2, slack://***" in text
    assert "entry 3, foo://***" in text
    assert "entry 4, ***" in text and "not a URL" in text
    assert "entry 1" not in text
    for secret in ("T1JJ3T3L2", "onlyonetoken", "topsecretpw", "tokenwithoutscheme"):
        assert secret not in text, secret
    assert "T...2" not in text and "t...w" not in text  # Apprise's "privacy" URLs are left out
    captured = capfd.readouterr()  # Apprise's own complaints reach no stream
    assert captured.out == "" and captured.err == ""


def test_importing_the_module_does_not_import_apprise() -> None:
    code = "import sys, cloudbackup.ops.notify, cloudbackup.cli; print('apprise' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_send_to_nothing_sends_nothing() -> None:
    assert notify.send([], compose("h", "ok", 0, "", [], redact=_identity)) == []


# --------------------------------------------------------------------------- the log tail


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("cloudbackup.test-notify-tail")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_log_tail_keeps_the_last_lines_redacted() -> None:
    redactor = RedactingFilter(url_secrets(DB_URL))
    tail = LogTail(5, redact=redactor.redact, fmt="%(levelname)s %(message)s")
    logger = _logger(tail)
    for n in range(1, 9):
        logger.info("line %d", n)
    logger.debug("debug lines are left out by default")
    logger.warning("cannot reach %s", DB_URL)
    assert tail.lines() == (
        "INFO line 5", "INFO line 6", "INFO line 7", "INFO line 8",
        "WARNING cannot reach postgresql://app:***@db.example.org:5432/shop",
    )


def test_log_tail_keeps_a_message_on_one_line_and_adds_tracebacks() -> None:
    tail = LogTail(10, redact=RedactingFilter(["hunter2"]).redact, fmt="%(message)s")
    logger = _logger(tail)
    logger.warning("file %r vanished", "a\nINFO forged")
    try:
        raise RuntimeError("password hunter2 rejected")
    except RuntimeError:
        logger.exception("upload failed")
    lines = tail.lines()
    assert lines[0] == "file 'a\\nINFO forged' vanished"
    assert lines[1] == "upload failed"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: password *** rejected"
    assert all("hunter2" not in line for line in lines)
    with pytest.raises(ValueError):
        LogTail(0, redact=_identity)
