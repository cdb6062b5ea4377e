"""One exception family; every message says what is wrong and what to do. Each error says
what it makes of the work it stopped (its :class:`Outcome`); the exit code follows."""

from __future__ import annotations

import signal
from typing import ClassVar

from cloudbackup.core.outcome import Outcome
from cloudbackup.core.outcome import exit_code as code_of


class CloudBackupError(Exception):
    """Base error: ``message`` says what is wrong, ``hint`` what to do about it."""

    outcome: ClassVar[Outcome] = Outcome.FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message


class Refused(CloudBackupError):
    """The command was refused and nothing was done (exit 2): a database in use, a target
    that is not empty, a backup still needed. A *source* refused inside ``backup``/``run``
    fails that source instead (exit 1)."""

    outcome = Outcome.REFUSED


class ConfigError(Refused):
    """A value or spec that cannot be parsed; nothing was done."""


class UsageError(ConfigError):
    """A command used in a way it cannot be; nothing was done."""


class IntegrityError(CloudBackupError):
    """A checksum, size or content check failed."""

    outcome = Outcome.INTEGRITY


class LockHeld(CloudBackupError):
    """Another cloudbackup run holds the lock on the local dir."""

    outcome = Outcome.LOCKED


class SourceError(CloudBackupError):
    """One source could not be backed up or restored; the others go on."""


class ShrinkGuardError(SourceError):
    """The shrink guard stopped a source that looked empty, shrunk or unmounted."""


class StorageError(CloudBackupError):
    """A store operation failed."""


class TransientStorageError(StorageError):
    """Worth retrying: throttling, 5xx, connection resets, timeouts."""


class PermanentStorageError(StorageError):
    """Not worth retrying: access denied, no such bucket, bad credentials."""

    def __init__(self, message: str, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


class NotFound(PermanentStorageError):
    """The object or backup does not exist."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: the work stops where it is (a ``BaseException``, as
    ``KeyboardInterrupt`` is, so no ``except Exception`` takes it for one source's failure).
    ``outcome`` is INTERRUPTED (exit 130) or TERMINATED (exit 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcome = Outcome.TERMINATED if signum == signal.SIGTERM else Outcome.INTERRUPTED

    @property
    def exit_code(self) -> int:
        return code_of(self.outcome)

    @property
    def signal_name(self) -> str:
        return str(self.args[0])
