"""Retries as a wrapper over any store: exponential backoff with full jitter (tenacity).

Only transient errors (throttling, 5xx, resets, timeouts) are retried; permanent ones and
integrity failures stop at once. botocore's own retries are switched off in the S3 client,
so this is the one place that retries, logs each retry and counts attempts.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from cloudbackup.core.errors import TransientStorageError

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")


# A URL's query string (``?uploadId=...&partNumber=3``, a presigned signature): noise in a
# message at best, a credential at worst.
_QUERY_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"]*")


def without_queries(text: str) -> str:
    """``text`` with the query string of every URL in it cut (``http://h/k?a=1`` → ``http://h/k``)."""
    return _QUERY_RE.sub(r"\1", text)


def _seconds(wait: float) -> str:
    """A wait for people: ``120 ms``, ``2.5 s``."""
    return f"{wait * 1000:.0f} ms" if wait < 1 else f"{wait:.1f} s"


class RetryingStore:
    """Delegates to ``inner``; each remote call is retried on transient errors."""

    def __init__(
        self,
        inner: Any,
        *,
        attempts: int = 5,
        base: float = 0.5,
        cap: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.attempts = attempts
        self.base = base
        self.cap = cap
        self.sleep = sleep
        self.where = getattr(inner, "where", "remote")
        if hasattr(inner, "retrying"):
            inner.retrying = self.call

    def call(self, what: str, fn: Callable[[], T]) -> T:
        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            LOG.warning(
                "%s failed (attempt %d of %d): %s; retrying in %s",
                what,
                state.attempt_number,
                self.attempts,
                without_queries(str(exc)),
                _seconds(wait),
            )

        jitter = wait_random_exponential(multiplier=self.base, max=self.cap)

        def wait(state: RetryCallState) -> float:
            # Full jitter, but never (next to) no wait at all: a tenth of the base at least.
            return max(self.base / 10, jitter(state))

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_if_exception_type(TransientStorageError),
            before_sleep=log_retry,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except TransientStorageError as exc:
            if self.attempts <= 1:
                raise
            # Every attempt failed: say so, so the one-line error is not mistaken for a blip.
            raise TransientStorageError(
                f"{without_queries(exc.message)} (gave up after {self.attempts} attempts)",
                exc.hint,
            ) from exc

    def __getattr__(self, name: str) -> Any:
        # The inner store routes each API call through ``call``; everything else passes through.
        return getattr(self.inner, name)
