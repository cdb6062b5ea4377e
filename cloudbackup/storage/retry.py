"""Retries as a policy every store is given at construction: exponential backoff with full
jitter (tenacity), capped, ``CLOUDBACKUP_RETRY_ATTEMPTS`` attempts, an injectable sleep.

Only transient errors (throttling, 5xx, resets, timeouts, a flaky disk or NAS) are retried;
permanent ones and integrity failures stop at once. botocore's own retries are switched off
in the S3 client, so the policy is the one place that retries, logs each retry (one line,
never a URL's query string) and counts attempts. :class:`ResumingReader` applies it to a
streaming body: a transient error mid-body asks again from the current offset.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from cloudbackup.core.errors import TransientStorageError

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")

_QUERY = re.compile(r"(\w+://[^\s?#\"'<>]*)\?[^\s\"'<>]*")


def without_query(text: str) -> str:
    """``text`` with every URL's query string replaced by ``?…`` (it may hold a signature,
    an upload id or a token: a log line never shows it)."""
    return _QUERY.sub(r"\1?…", text)


def seconds_text(wait: float) -> str:
    """``1.3s``, ``40ms``; ``at once`` for a wait too short to mention."""
    if wait >= 1.0:
        return f"in {wait:.1f}s"
    if wait >= 0.001:
        return f"in {wait * 1000:.0f}ms"
    return "at once"


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries of each operation; before try *n* + 1 a random wait in
    ``[0, min(cap, base × 2^(n-1))]`` (AWS's "full jitter")."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, again after each transient error, up to ``attempts`` times."""

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            LOG.warning(
                "%s failed (attempt %d of %d): %s; retrying %s",
                without_query(what),
                state.attempt_number,
                self.attempts,
                without_query(str(exc)),
                seconds_text(wait),
            )

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_random_exponential(multiplier=self.base, max=self.cap),
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
                f"{without_query(exc.message)} (gave up after {self.attempts} attempts)", exc.hint
            ) from exc


#: No retries: for tools and tests that want every error at once.
NO_RETRY = RetryPolicy(attempts=1)


class Body(Protocol):
    """A raw response body: ``read`` raises our error types (a store classifies them)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ResumingReader:
    """A stream over ``opener(offset)`` bodies: when a read fails transiently, the body is
    dropped and ``opener`` asked again from the offset reached, under ``policy`` (its
    attempts count consecutive failures: a read that makes progress starts afresh). Never
    "retries into success": the bytes are whatever the store serves; the reader's caller
    hashes them."""

    def __init__(self, opener: Callable[[int], Body], policy: RetryPolicy, what: str) -> None:
        self.opener, self.policy, self.what = opener, policy, what
        self.offset = 0
        self.body: Body | None = policy.call(what, lambda: opener(0))

    def read(self, size: int = -1, /) -> bytes:
        def attempt() -> bytes:
            if self.body is None:
                self.body = self.opener(self.offset)
            try:
                return self.body.read(size)
            except TransientStorageError:
                self._drop()
                raise

        start = self.offset
        data = self.policy.call(f"{self.what} (from byte {start})" if start else self.what, attempt)
        self.offset += len(data)
        return data

    def _drop(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                LOG.debug("closing a broken body failed", exc_info=True)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ResumingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
