"""Notifications after a run, through Apprise (e-mail over SMTP, ntfy, Slack, Matrix, webhooks...).

The parts, each usable alone (the CLI wires them):

* :func:`parse_targets` splits ``CLOUDBACKUP_NOTIFY`` into Apprise URLs, :func:`validate` checks
  each one at start-up (a URL Apprise cannot use is a :class:`ConfigError`, exit 2) and
  :func:`parse_notify_on` reads ``CLOUDBACKUP_NOTIFY_ON``;
* :func:`classify` turns a run's exit code into its outcome word (``ok``/``warning``/``failed``),
  :func:`should_notify` decides, :func:`compose` builds the :class:`Message` (title, Apprise type,
  body = summary + the last log lines, redacted) and :func:`send` delivers it: a target that
  cannot be reached is a warning returned to the caller, never an exception, and the whole
  send is bounded in time;
* :class:`LogTail` keeps the last formatted, redacted log lines in memory for the body.

Apprise URLs may hold passwords and tokens anywhere (``mailto://user:pass@host``,
``tgram://<bot token>/<chat>``, ``slack://<tokens>``), so a target is only ever shown as its
scheme and its position in the list (``entry 2, mailto://***``), and what Apprise itself logs
about a target passes through :func:`_Scrubber` before it reaches a warning. Apprise is
imported only by :func:`validate` and :func:`send` (the import alone takes 0.1-0.4 s).
"""

from __future__ import annotations

import enum
import importlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import unquote

from cloudbackup.config import parse_notify_targets as parse_targets
from cloudbackup.core.errors import ConfigError
from cloudbackup.core.outcome import Outcome, words
from cloudbackup.core.words import one_line
from cloudbackup.sources.base import secret_forms

__all__ = [
    "FAILED_EXIT_CODES",
    "LogTail",
    "Message",
    "NotifyOn",
    "Result",
    "classify",
    "compose",
    "parse_notify_on",
    "parse_targets",
    "send",
    "should_notify",
    "target_label",
    "target_secrets",
    "validate",
]

LOG = logging.getLogger("cloudbackup")

#: A run's outcome in words (``core.outcome.words``): the notification title and
#: ``CLOUDBACKUP_RESULT``.
Result = Literal["ok", "warning", "failed"]
#: Apprise's notification types (``apprise.NotifyType`` values) for each outcome.
NotifyType = Literal["success", "warning", "failure"]
_NOTIFY_TYPE: dict[str, NotifyType] = {"ok": "success", "warning": "warning", "failed": "failure"}

#: Exit codes that make a run ``failed`` whatever else happened: configuration (2), integrity
#: (3), lock held (4), interrupted by SIGINT (130) or SIGTERM (143).
FAILED_EXIT_CODES = frozenset({2, 3, 4, 130, 143})

#: How many log lines the body carries (SPEC "Operations").
TAIL_LINES = 50
#: The longest a :func:`send` call waits for every target, in seconds.
SEND_TIMEOUT = 60.0

#: A redaction function: text in, the same text with every known secret replaced.
Redact = Callable[[str], str]

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# C0 controls (but tab) and DEL: a file name holding a newline or an escape sequence must not
# forge a log line or repaint a terminal in the body of a notification.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The summary is several lines: the same, but newlines stay.
_SUMMARY_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# --------------------------------------------------------------------------- settings


class NotifyOn(enum.Enum):
    """``CLOUDBACKUP_NOTIFY_ON``: which outcomes are notified."""

    FAILURE = "failure"  # outcome failed only (the default)
    WARNING = "warning"  # failed or warning
    ALWAYS = "always"  # every run, ok included


def parse_notify_on(text: str | None, variable: str = "CLOUDBACKUP_NOTIFY_ON") -> NotifyOn:
    """``failure`` (default when unset or empty), ``warning`` or ``always``; ConfigError else."""
    clean = (text or "").strip().lower()
    if not clean:
        return NotifyOn.FAILURE
    try:
        return NotifyOn(clean)
    except ValueError:
        raise ConfigError(
            f"{variable}={text!r} is not a notification policy",
            "use failure (the default), warning or always",
        ) from None


def target_label(url: str, index: int | None = None) -> str:
    """How a target is named in messages: its scheme only (``mailto://***``), since anything
    after it may be a password or a token, and its position when given (``entry 2``)."""
    match = _SCHEME_RE.match(url.strip())
    shown = f"{match[1].lower()}://***" if match else "***"
    return f"entry {index}, {shown}" if index is not None else shown


def target_secrets(urls: Iterable[str]) -> list[str]:
    """What the log filter must hide for these targets: each whole URL, and the password of a
    ``scheme://user:password@host`` URL in every encoding (``sources.secret_forms``)."""
    found: list[str] = []
    for url in urls:
        candidates = [url]
        password = _userinfo_password(url)
        if password:
            candidates += secret_forms(password)
        found += [c for c in candidates if c and c not in found]
    return found


def _userinfo_password(url: str) -> str | None:
    """The password of ``scheme://user:password@host...``: from the first ``:`` of the user
    part to the authority's **last** ``@`` (the SPEC's redaction rule), or None."""
    match = _SCHEME_RE.match(url)
    if not match:
        return None
    rest = url[match.end() :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, _host = rest[:end].rpartition("@")
    if not at or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1] or None


class _Scrubber:
    """Hides every piece of the given URLs that could be secret in text Apprise produced about
    them (Apprise logs whole URLs in some messages: ``Unparseable URL slack://...``).

    Pieces are the URL, its password forms, and each component of three characters or more
    (user, password, host, path segments, query values; not query keys), raw and URL-decoded. Text gets
    coarser (hosts are hidden too), which is the price of not knowing each plugin's grammar.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        pieces: set[str] = set()
        for url in urls:
            pieces.update(target_secrets([url]))
            match = _SCHEME_RE.match(url)
            rest = url[match.end() :] if match else url
            main, _, query = rest.partition("?")
            parts = re.split(r"[/:@#,;\s]+", main)
            for pair in query.split("&"):  # values only: keys (to, from, smtp) are no secret
                parts += re.split(r"[,;\s]+", pair.partition("=")[2])
            for part in parts:
                for form in (part, unquote(part), *unquote(part).split("@")):
                    if len(form) >= 3:
                        pieces.add(form)
        self.pieces = sorted(pieces, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for piece in self.pieces:
            text = text.replace(piece, "***")
        return text


# --------------------------------------------------------------------------- Apprise


def _apprise() -> Any:
    """The ``apprise`` module, imported on first use only (it is slow to import)."""
    return importlib.import_module("apprise")


class _AppriseLog(logging.Handler):
    """Collects what Apprise logs (WARNING and up) while attached, and keeps it from reaching
    any other handler (the root logger's, stderr): a quiet run stays quiet, and Apprise's
    messages, which may hold a URL, are scrubbed before anyone sees them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a message that cannot be formatted is not worth a crash
            text = str(record.msg)
        with self.guard:
            self.messages.append(text)

    def take(self) -> list[str]:
        with self.guard:
            messages, self.messages = self.messages, []
        return messages

    def __enter__(self) -> _AppriseLog:
        self.logger = logging.getLogger("apprise")
        self.propagate = self.logger.propagate
        self.logger.addHandler(self)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate


def _reasons(messages: Iterable[str], scrub: _Scrubber) -> str:
    """Apprise's messages about a target, as one clause: those that quote a URL are left out
    (Apprise's "privacy" form still shows a token's first and last characters), the rest
    scrubbed of every piece of the targets' URLs."""
    unique: list[str] = []
    for message in messages:
        if "://" in message:
            continue
        text = _CONTROL_RE.sub(" ", scrub(message)).strip().rstrip(":").strip()
        if text and text not in unique:
            unique.append(text)
    return "; ".join(unique)


def _instance(apprise: Any, url: str) -> Any | None:
    """An Apprise object holding exactly this one target, or None when Apprise refuses it.

    The URL goes in as a one-element list: a plain string would be split again by Apprise."""
    instance = apprise.Apprise()
    try:
        accepted = instance.add([url])
    except Exception:  # a plugin that raises on odd input: refused all the same
        return None
    return instance if accepted and len(instance) == 1 else None


def validate(urls: Sequence[str], variable: str = "CLOUDBACKUP_NOTIFY") -> None:
    """Raise :class:`ConfigError` (exit 2) naming every target Apprise cannot use.

    Targets are named by position and scheme only (:func:`target_label`); Apprise's reason is
    added with every piece of the URL hidden. Imports Apprise: call it only when notifying.
    """
    if not urls:
        return
    apprise = _apprise()
    problems: list[str] = []
    scrub = _Scrubber(urls)
    with _AppriseLog() as log:
        for index, url in enumerate(urls, 1):
            if not _SCHEME_RE.match(url):
                problems.append(f"{target_label(url, index)} is not a URL (scheme://...)")
            elif _instance(apprise, url) is None:
                reason = _reasons(log.take(), scrub)
                problems.append(
                    f"{target_label(url, index)} is not a URL Apprise can use"
                    + (f" ({reason})" if reason else "")
                )
            log.take()  # what Apprise said about an accepted URL is not a problem
    if problems:
        raise ConfigError(
            f"{variable}: " + "; ".join(problems),
            "check the URL against Apprise's documentation of that service "
            "(URLs are not shown: they may hold passwords)",
        )


# --------------------------------------------------------------------------- the message


def classify(exit_code: int, *, failed: bool = False) -> Result:
    """The outcome of a run: ``failed`` when ``failed`` is set (a source, a step or a
    before-hook failed) or the exit code is anything but 0 and 1 (2, 3, 4, 130, 143...);
    ``warning`` for exit 1 otherwise (completed with warnings); ``ok`` for exit 0."""
    if failed or exit_code not in (0, 1):
        outcome = Outcome.FAILED
    else:
        outcome = Outcome.WARNING if exit_code == 1 else Outcome.OK
    return cast(Result, words(outcome))


def should_notify(outcome: Result, notify_on: NotifyOn) -> bool:
    """Whether ``CLOUDBACKUP_NOTIFY_ON`` asks for a message about this outcome."""
    if notify_on is NotifyOn.ALWAYS:
        return True
    if notify_on is NotifyOn.WARNING:
        return outcome in ("failed", "warning")
    return outcome == "failed"


@dataclass(frozen=True)
class Message:
    """One notification, ready to send: already redacted."""

    title: str
    body: str
    notify_type: NotifyType


def compose(
    host: str,
    outcome: Result,
    exit_code: int,
    summary: str,
    log_tail: Sequence[str],
    *,
    redact: Redact,
    tail_lines: int = TAIL_LINES,
) -> Message:
    """The message about one run: title ``cloudbackup <host>: <outcome> (exit N)``, Apprise
    type success/warning/failure, body = the summary, then the last ``tail_lines`` log lines.

    ``redact`` is the run's redaction (``output.RedactingFilter(...).redact``, holding every
    password of the configuration); title and body pass through it, and control characters
    in log lines are shown escaped, so a hostile file name cannot forge a line.
    """
    if outcome not in _NOTIFY_TYPE:
        raise ValueError(f"unknown outcome {outcome!r}")
    title = redact(f"cloudbackup {host}: {outcome} (exit {exit_code})")
    tail = [_escape_controls(line) for line in log_tail][-tail_lines:] if tail_lines > 0 else []
    parts = [_SUMMARY_CONTROL_RE.sub(_escaped, summary).rstrip("\n") or "(no summary)"]
    if tail:
        parts.append(f"Last {len(tail)} log lines:\n" + "\n".join(tail))
    return Message(title=title, body=redact("\n\n".join(parts)), notify_type=_NOTIFY_TYPE[outcome])


def _escaped(match: re.Match[str]) -> str:
    return match[0].encode("unicode_escape").decode("ascii")


def _escape_controls(text: str) -> str:
    return one_line(text)


# --------------------------------------------------------------------------- sending


def send(
    urls: Sequence[str],
    message: Message,
    *,
    timeout: float = SEND_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Send ``message`` to every target; return one warning per target that did not get it.

    Never raises. Targets are sent one after the other from a worker thread, each in its own
    Apprise object (so a failure is attributed to its target); the call returns after
    ``timeout`` seconds at the latest, naming the targets still pending (their sockets time
    out on their own: 4 s for HTTP, 15 s for SMTP by default, ``?cto=``/``?rto=`` change it).
    """
    if not urls:
        return []
    try:
        apprise = _apprise()
    except ImportError:
        return ["notifications are not sent: the apprise package is not installed"]
    scrub = _Scrubber(urls)
    warnings: list[str] = []
    done: list[int] = []
    lock = threading.Lock()

    def deliver(log: _AppriseLog) -> None:
        for index, url in enumerate(urls, 1):
            log.take()
            problem = _deliver_one(apprise, url, message)
            reason = _reasons(log.take(), scrub)
            if problem is not None:
                # Apprise's reason ("A Connection error occurred...") says more than ours.
                detail = f"{problem} ({reason})" if reason and problem == _REFUSED else reason or problem
                with lock:
                    warnings.append(f"notification {target_label(url, index)} not sent: {detail}")
            with lock:
                done.append(index)

    with _AppriseLog() as log:
        worker = threading.Thread(target=deliver, args=(log,), name="notify", daemon=True)
        worker.start()
        deadline = clock() + timeout
        worker.join(max(0.0, deadline - clock()))
        with lock:
            result = list(warnings)
            pending = [i for i in range(1, len(urls) + 1) if i not in done]
    for index in pending:
        result.append(
            f"notification {target_label(urls[index - 1], index)} not sent: "
            f"no answer within {timeout:g} s"
        )
    return result


_REFUSED = "Apprise cannot use this URL"


def _deliver_one(apprise: Any, url: str, message: Message) -> str | None:
    """None when Apprise reports success, else why not (without the URL)."""
    instance = _instance(apprise, url)
    if instance is None:
        return _REFUSED
    try:
        sent = instance.notify(
            body=message.body,
            title=message.title,
            notify_type=message.notify_type,
            body_format="text",
        )
    except Exception as exc:  # a plugin bug must not fail the run
        return f"Apprise failed ({type(exc).__name__})"
    return None if sent else "the service did not accept it"


# --------------------------------------------------------------------------- the log tail


class LogTail(logging.Handler):
    """The last ``capacity`` log lines, formatted and redacted, in memory (a ring buffer).

    Attach it to the ``cloudbackup`` logger at start-up; :meth:`lines` gives the notification
    body's tail. A record's message is one line (control characters escaped, so a file name
    with a newline stays on its line); a traceback adds its own lines.
    """

    def __init__(
        self,
        capacity: int = TAIL_LINES,
        *,
        redact: Redact,
        level: int = logging.INFO,
        fmt: str = "%(asctime)s %(levelname)s %(message)s",
        datefmt: str = "%Y-%m-%dT%H:%M:%S%z",
    ) -> None:
        super().__init__(level)
        if capacity < 1:
            raise ValueError("a log tail holds at least one line")
        self.redact = redact
        self.buffer: deque[str] = deque(maxlen=capacity)
        self.guard = threading.Lock()
        self.setFormatter(logging.Formatter(fmt, datefmt))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            one_line = logging.makeLogRecord(record.__dict__)
            one_line.msg = _escape_controls(record.getMessage())
            one_line.args = None
            one_line.exc_info = one_line.exc_text = one_line.stack_info = None
            lines = [self.format(one_line)]
            if record.exc_info or record.exc_text:
                formatter = self.formatter or logging.Formatter()
                text = record.exc_text or formatter.formatException(record.exc_info)  # type: ignore[arg-type]
                lines += text.splitlines()
            redacted = [self.redact(line) for line in lines]
        except Exception:
            self.handleError(record)
            return
        with self.guard:
            self.buffer.extend(redacted)

    def lines(self) -> tuple[str, ...]:
        with self.guard:
            return tuple(self.buffer)
