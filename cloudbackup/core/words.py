"""How numbers read in messages: counts with their noun (``1 file``, ``2 files``) and sizes
in binary units (``70.9 GiB``). One wording for every message, log line and report."""

from __future__ import annotations

__all__ = ["plural", "size"]

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
