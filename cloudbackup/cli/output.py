"""Everything the user sees: logging (with secret redaction), progress, human and JSON output."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

LOG = logging.getLogger("cloudbackup")


class RedactingFilter(logging.Filter):
    """Replaces every known secret (raw and URL-encoded) in log records with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            record.msg = self.redact(message)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def setup_logging(
    *,
    level: str = "INFO",
    verbose: bool = False,
    quiet: bool = False,
    log_file: Path | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> RedactingFilter:
    root = LOG
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    redactor = RedactingFilter(secrets)
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(_StderrFormatter("%(message)s"))
    console.setLevel(
        logging.DEBUG if verbose else logging.ERROR if quiet else getattr(logging, level)
    )
    console.addFilter(redactor)
    root.addHandler(console)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                log_file,
                maxBytes=10 * 1024 * 1024,
                backupCount=5,
                encoding="utf-8",
                errors="backslashreplace",
            )
        except OSError as exc:
            LOG.warning(
                "cannot open log file %s (%s); logging to stderr only", log_file, exc.strerror
            )
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
            )
            handler.setLevel(logging.DEBUG if verbose else getattr(logging, level))
            handler.addFilter(redactor)
            root.addHandler(handler)
    return redactor


def human_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"


class Progress:
    """A progress bar on a terminal; an INFO line every few seconds otherwise (cron logs)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        tty: bool,
        stream: TextIO | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.tty = label, total, tty
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.interval = 0.2 if tty else interval
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        if self.total:
            pct = min(self.done / self.total, 1.0)
            eta = (self.total - self.done) / rate if rate else 0
            text = (
                f"{self.label}: {human_size(self.done)} / {human_size(self.total)} "
                f"({pct:4.0%}) {human_size(rate)}/s ETA {human_duration(eta)}"
            )
        else:
            text = f"{self.label}: {human_size(self.done)} {human_size(rate)}/s"
        if self.tty:
            width = 24
            filled = int(width * (self.done / self.total)) if self.total else 0
            bar = "#" * min(filled, width) + "-" * (width - min(filled, width))
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            self.stream.flush()
        else:
            LOG.info("%s", text)

    def close(self) -> None:
        if self.tty and self.done:
            self._show(self.clock())
            self.stream.write("\n")
            self.stream.flush()


def print_json(document: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(
        json.dumps(document, indent=2, sort_keys=False, ensure_ascii=True, default=str) + "\n"
    )


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [
        [("-" if c is None else str(c)) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
