"""Outcomes: what a use case came to, as data. One map to exit codes, one to words.

Every result (a source backed up, an upload, a verify, a prune group, a restore...) carries
an :class:`Outcome`; the exit code of a command is :func:`exit_code` of its results' outcomes,
never set by hand. When several apply, the most severe wins (SPEC "Exit codes": 3 > 1 > 0;
a held lock and a refusal rank between them, an interruption above all). ``status`` has its
own monitoring codes (OK/WARNING/CRITICAL/UNKNOWN): they are not outcomes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["REPORTED", "Outcome", "exit_code", "worst", "words"]


class Outcome(enum.Enum):
    """What one piece of work came to. The value is its word (``CLOUDBACKUP_RESULT``)."""

    OK = "ok"
    #: Done, with something to look at: unreadable files, files that changed while read.
    WARNING = "warning"
    #: Not done (a source, an upload, a deletion...); the others went on.
    FAILED = "failed"
    #: A checksum, size or content check failed: the data cannot be trusted.
    INTEGRITY = "integrity"
    #: Refused before anything was done: a usage or configuration error, a target in use.
    REFUSED = "refused"
    #: Another cloudbackup run holds the lock on the local dir.
    LOCKED = "locked"
    #: Stopped by SIGINT (Ctrl-C).
    INTERRUPTED = "interrupted"
    #: Stopped by SIGTERM (systemd stopping the service, a shutdown, ``kill``).
    TERMINATED = "terminated"


_EXIT_CODES = {
    Outcome.OK: 0,
    Outcome.WARNING: 1,
    Outcome.FAILED: 1,
    Outcome.INTEGRITY: 3,
    Outcome.REFUSED: 2,
    Outcome.LOCKED: 4,
    Outcome.INTERRUPTED: 130,  # 128 + SIGINT, as shells report it
    Outcome.TERMINATED: 143,  # 128 + SIGTERM
}
# Most severe first: an interruption, then an integrity failure outranks everything a run
# can otherwise report; a failure outranks a warning only in words (both exit 1).
_SEVERITY = (
    Outcome.TERMINATED,
    Outcome.INTERRUPTED,
    Outcome.INTEGRITY,
    Outcome.LOCKED,
    Outcome.REFUSED,
    Outcome.FAILED,
    Outcome.WARNING,
    Outcome.OK,
)


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """The most severe of ``outcomes`` (OK for none)."""
    found = set(outcomes)
    for outcome in _SEVERITY:
        if outcome in found:
            return outcome
    return Outcome.OK


def exit_code(outcomes: Outcome | Iterable[Outcome]) -> int:
    """The one map from outcomes to the process exit code (SPEC "Exit codes")."""
    if isinstance(outcomes, Outcome):
        return _EXIT_CODES[outcomes]
    return _EXIT_CODES[worst(outcomes)]


def words(outcome: Outcome) -> str:
    """The one wording of an outcome for people and hooks: ``ok``, ``warning`` or ``failed``
    (SPEC "Operations": whatever is neither ok nor a warning counts as failed)."""
    if outcome in (Outcome.OK, Outcome.WARNING):
        return outcome.value
    return Outcome.FAILED.value


#: ``extra=`` of a log record whose event the command's result also carries (a source that
#: failed, an upload, a deletion...): the console leaves it out when that result is shown to
#: people, so each event is seen once; the log file, ``--log-json`` and ``--json`` runs keep
#: it (SPEC "Operations": each event once on a terminal).
REPORTED = {"cloudbackup_reported": True}
