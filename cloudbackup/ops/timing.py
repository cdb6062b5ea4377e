"""Timings per phase in the debug log (``-v``): how long each step of a use case took."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

__all__ = ["phase"]

LOG = logging.getLogger("cloudbackup")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Log ``phase <name>: <seconds>`` at debug level when the block ends (however it ends)."""
    started = time.monotonic()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        LOG.debug("phase %s: %s in %.3fs", name, outcome, time.monotonic() - started)
