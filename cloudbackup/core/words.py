"""How numbers and outside text read in messages: counts with their noun (``1 file``,
``2 files``), sizes in binary units (``70.9 GiB``), and text from outside (a file name) as
one line. One wording for every message, log line and report."""

from __future__ import annotations

import re

__all__ = ["one_line", "plural", "size"]

# C0 controls but tab, and DEL: a newline would start a line of its own (a forged log entry,
# a journald ``<0>`` priority), an escape sequence would move a terminal's cursor.
_CONTROLS_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with its control characters shown escaped (``\\n``, ``\\x1b``): one line,
    whatever a file name held."""
    return _CONTROLS_RE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    return match[0].encode("unicode_escape").decode("ascii")

_IRREGULAR = {"copy": "copies", "entry": "entries"}


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` with ``noun``, plural unless it is 1: ``1 file``, ``0 files``, ``3 copies``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {many or _IRREGULAR.get(noun) or noun + 's'}"


def size(n: float | None) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``70.9 GiB``; ``-`` for unknown."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
