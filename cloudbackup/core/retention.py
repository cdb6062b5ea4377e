"""Retention: which backups a policy keeps, and why. Pure: no clock, no I/O.

A policy is ``key=value,...`` (see :func:`parse_policy`); :func:`plan` applies it to any items
that have an ``id`` and a timezone-aware ``created_at``, and returns what to keep (each with its
reasons) and what to remove. The semantics are those of restic's ``forget`` with calendar periods
in UTC and ISO weeks:

* Backups are ordered newest first. Backups with the same ``created_at`` are ordered by id: the
  id that sorts *later* counts as *newer*, comparing runs of digits as numbers, so
  ``www-20261120T021500Z-2`` is newer than ``www-20261120T021500Z`` and ``...Z-10`` newer than
  ``...Z-9`` (the order in which the model numbers backups made in the same second). The
  result never depends on the order of the input.
* ``last=N`` keeps the N newest backups (reason ``last 2/3``: the 2nd of the last 3).
* ``hourly/daily/weekly/monthly/yearly=N`` walk the backups newest to oldest and keep the newest
  backup of each of the N most recent periods that have a backup (reasons ``hourly
  2026-11-20T14``, ``daily 2026-11-20``, ``weekly 2026-W47``, ``monthly 2026-11``, ``yearly 2026``).
* ``within=D`` keeps every backup whose time is after (reference - D), reason ``within 14d``. The
  reference is the newest backup not dated after ``now``: measured from the newest backup, not
  from now, so a backup job that silently stopped does not expire everything.
* Backups dated after ``now`` (clock skew) are kept (``dated in the future``), take no part in
  the rules and the floor, and do not move the ``within`` reference.
* ``min=N`` (default 1) is a floor, not a rule: the N newest backups (not in the future) are kept
  whatever the rules say, and the newest one always is, even with ``min=0``. Floor reasons
  (``newest``, ``min 3``) are added only to backups that nothing else keeps, so they show
  exactly what the floor saved.
* A policy with no rules (empty, or only ``min``) keeps everything (``no rules``). A count of 0
  given explicitly *is* a rule that keeps nothing by itself: ``last=0`` keeps only the floor.
* Pinned backups (not yet offsite, under Object Lock, ...) are always kept and carry their pin
  reasons first; they still take part in the rules like any other backup.
* A backup kept for several reasons carries all of them, in this order: pins, future, ``last``,
  ``hourly`` ... ``yearly``, ``within``, ``no rules``, floor.

Deliberate difference from restic >= 0.16: restic keeps the *oldest* backup when a count rule
still has unused slots after the walk (``daily=7`` with only 3 days of backups keeps the oldest
one too). We do not: that oldest backup would be kept forever as long as the history is shorter
than the policy, whatever its age, and it makes a plan depend on data far outside the window the
operator asked for. Here a count rule keeps only the newest backup of each of its N periods.

Applying a plan and then planning again over the kept backups (same policy, ``now`` and pins)
keeps all of them with the same reasons: a second prune removes nothing.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

from cloudbackup.core.errors import ConfigError

__all__ = [
    "COUNT_KEYS",
    "Dated",
    "Duration",
    "Plan",
    "Policy",
    "format_duration",
    "parse_duration",
    "parse_policy",
    "plan",
]

#: The count rules, in the order they are walked and their reasons listed.
COUNT_KEYS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_KEYS = (*COUNT_KEYS, "within", "min")

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_MAX_SECONDS = int(timedelta.max.total_seconds())
_DIGITS_RE = re.compile(r"\d+")
_DURATION_HINT = "a duration is a whole number followed by s, m, h, d or w, e.g. 36h, 14d or 8w"
_SYNTAX_HINT = "write key=value pairs separated by commas, e.g. daily=7,weekly=4,monthly=12"
_KEYS_HINT = "valid keys: " + ", ".join(_KEYS)
_COUNT_HINT = "last, hourly, daily, weekly, monthly, yearly and min are whole numbers 0 or more"

REASON_FUTURE = "dated in the future"
REASON_NO_RULES = "no rules"
REASON_NEWEST = "newest"
REASON_PINNED = "pinned"  # only for a pin given without a reason of its own


# --------------------------------------------------------------------------- durations


@dataclass(frozen=True)
class Duration:
    """A whole number of one unit (``14d``), kept as written so reasons echo the policy."""

    amount: int
    unit: str  # one of s, m, h, d, w

    def __post_init__(self) -> None:
        if self.unit not in _UNIT_SECONDS:
            raise ValueError(f"unknown duration unit {self.unit!r}")
        if not 0 <= self.amount * _UNIT_SECONDS[self.unit] <= _MAX_SECONDS:
            raise ValueError(f"duration out of range: {self.amount}{self.unit}")

    @property
    def delta(self) -> timedelta:
        return timedelta(seconds=self.amount * _UNIT_SECONDS[self.unit])

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``36h`` / ``14d`` / ``8w``; raise :class:`ConfigError` naming the bad text."""
        problem = _duration_problem(text)
        if problem:
            raise ConfigError(f"invalid duration {text!r}: {problem}", _DURATION_HINT)
        match = _DURATION_RE.fullmatch(text.strip())
        assert match is not None
        return cls(int(match[1]), match[2])


def _duration_problem(text: str) -> str | None:
    """What is wrong with a duration, or ``None`` when it parses."""
    clean = text.strip()
    match = _DURATION_RE.fullmatch(clean)
    if match:
        if int(match[1]) * _UNIT_SECONDS[match[2]] > _MAX_SECONDS:
            return f"{clean!r} is too long"
        return None
    if not clean:
        return "it is empty"
    if clean.startswith("-"):
        return f"{clean!r} is negative"
    if clean.isdigit():
        return f"{clean!r} has no unit"
    if clean[-1:] in _UNIT_SECONDS:
        return f"{clean[:-1]!r} is not a whole number"
    return f"{clean!r} does not end in a unit (s, m, h, d or w)"


def parse_duration(text: str) -> timedelta:
    """``36h`` -> ``timedelta(hours=36)``; units ``s m h d w``; :class:`ConfigError` otherwise."""
    return Duration.parse(text).delta


def format_duration(delta: timedelta) -> str:
    """The inverse of :func:`parse_duration` for whole seconds, in the largest exact unit."""
    seconds = int(delta.total_seconds())
    if seconds < 0 or timedelta(seconds=seconds) != delta:
        raise ValueError(f"not a non-negative whole number of seconds: {delta!r}")
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    """A parsed retention policy. ``None`` means "rule not given"; an explicit 0 is a rule."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None
    within: Duration | None = None
    min: int = 1

    def __post_init__(self) -> None:
        for key in (*COUNT_KEYS, "min"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{key} must be a whole number 0 or more, not {value!r}")

    @property
    def is_empty(self) -> bool:
        """True when the policy has no rules (``min`` is not a rule): it keeps everything."""
        return self.within is None and all(getattr(self, key) is None for key in COUNT_KEYS)

    def __str__(self) -> str:
        """Canonical ``key=value`` form, keys in a fixed order, ``min`` only when not 1."""
        parts = [
            f"{key}={getattr(self, key)}" for key in COUNT_KEYS if getattr(self, key) is not None
        ]
        if self.within is not None:
            parts.append(f"within={self.within}")
        if self.min != 1:
            parts.append(f"min={self.min}")
        return ",".join(parts)


def parse_policy(text: str) -> Policy:
    """Parse ``daily=7,weekly=4,within=14d,min=2``; blank text is the empty policy.

    Raises :class:`ConfigError` naming the bad entry, key or value: unknown or duplicate keys,
    entries without ``=``, empty entries, values that are not whole numbers 0 or more (or, for
    ``within``, not a duration).
    """
    if not text.strip():
        return Policy()

    def fail(problem: str, hint: str) -> ConfigError:
        return ConfigError(f"invalid retention policy {text!r}: {problem}", hint)

    counts: dict[str, int] = {}
    within: Duration | None = None
    seen: set[str] = set()
    for raw_entry in text.split(","):
        entry = raw_entry.strip()
        if not entry:
            raise fail("empty entry (a stray comma?)", _SYNTAX_HINT)
        key, sep, value = (part.strip() for part in entry.partition("="))
        if not sep:
            raise fail(f"{entry!r} is not key=value", _SYNTAX_HINT)
        if key not in _KEYS:
            close = difflib.get_close_matches(key.lower(), _KEYS, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(f"unknown key {key!r}{guess}", _KEYS_HINT)
        if key in seen:
            raise fail(f"{key!r} is given more than once", "give each key once")
        seen.add(key)
        if key == "within":
            problem = _duration_problem(value)
            if problem:
                raise fail(f"within: {problem}", _DURATION_HINT)
            within = Duration.parse(value)
        elif value.isdigit() and value.isascii():
            counts[key] = int(value)
        elif value.startswith("-") and value[1:].isdigit():
            raise fail(f"{key}: {value!r} is negative", _COUNT_HINT)
        else:
            raise fail(f"{key}: {value!r} is not a whole number", _COUNT_HINT)
    return Policy(within=within, **counts)


# --------------------------------------------------------------------------- planning


class Dated(Protocol):
    """What the planner needs of a backup: ``BackupRef`` and test doubles alike."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


T = TypeVar("T", bound=Dated)


@dataclass(frozen=True)
class Plan(Generic[T]):
    """``keep``: (item, reasons) newest first; ``remove``: items newest first."""

    keep: list[tuple[T, list[str]]] = field(default_factory=list)
    remove: list[T] = field(default_factory=list)

    @property
    def kept_ids(self) -> list[str]:
        return [item.id for item, _ in self.keep]

    @property
    def removed_ids(self) -> list[str]:
        return [item.id for item in self.remove]

    def reasons(self) -> dict[str, list[str]]:
        """Kept id -> its reasons."""
        return {item.id: reasons for item, reasons in self.keep}


# Periods: an int key to compare (cheap, for every backup walked) and a label, built only
# for the backups a rule keeps.
def _hour(moment: datetime) -> int:
    return ((moment.year * 100 + moment.month) * 100 + moment.day) * 100 + moment.hour


def _day(moment: datetime) -> int:
    return (moment.year * 100 + moment.month) * 100 + moment.day


def _week(moment: datetime) -> int:
    year, week, _ = moment.isocalendar()
    return year * 100 + week


def _month(moment: datetime) -> int:
    return moment.year * 100 + moment.month


def _year(moment: datetime) -> int:
    return moment.year


def _hour_label(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H}"


def _day_label(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d}"


def _week_label(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def _month_label(moment: datetime) -> str:
    return f"{moment:%Y-%m}"


def _year_label(moment: datetime) -> str:
    return f"{moment:%Y}"


_PERIODS: tuple[tuple[str, Callable[[datetime], int], Callable[[datetime], str]], ...] = (
    ("hourly", _hour, _hour_label),
    ("daily", _day, _day_label),
    ("weekly", _week, _week_label),
    ("monthly", _month, _month_label),
    ("yearly", _year, _year_label),
)


def _id_key(item_id: str) -> tuple[tuple[str, int], ...]:
    """Natural order: runs of digits compare as numbers (``-9`` < ``-10``), text as text."""
    key: list[tuple[str, int]] = []
    position = 0
    for match in _DIGITS_RE.finditer(item_id):
        key.append((item_id[position : match.start()], int(match[0])))
        position = match.end()
    key.append((item_id[position:], -1))
    return tuple(key)


@dataclass
class _PeriodRule:
    """One calendar rule during a walk: slots left and the period of the last backup seen."""

    name: str
    left: int
    key_fn: Callable[[datetime], int]
    label_fn: Callable[[datetime], str]
    previous: int | None = None


def _newest_first(items: Iterable[T]) -> list[T]:
    """Sort newest first; equal times: the id later in natural order is newer (see module doc)."""
    ordered = sorted(items, key=attrgetter("created_at"), reverse=True)
    # Equal times are rare: find those runs and re-order them by the natural id order.
    times = [item.created_at for item in ordered]
    start = 0
    for index in range(1, len(ordered) + 1):
        if index < len(ordered) and times[index] == times[start]:
            continue
        if index - start > 1:
            ordered[start:index] = sorted(
                ordered[start:index], key=lambda item: (_id_key(item.id), item.id), reverse=True
            )
        start = index
    return ordered


def _pin_reasons(pins: Mapping[str, Sequence[str]], item_id: str) -> list[str]:
    if item_id not in pins:
        return []
    return list(pins[item_id]) or [REASON_PINNED]


# Long: the planner's one walk, rule by rule, in the order the module docstring states them.
def plan(
    items: Iterable[T],
    policy: Policy,
    *,
    now: datetime,
    pinned: Mapping[str, Sequence[str]] | None = None,
) -> Plan[T]:
    """Apply ``policy`` to ``items`` as of ``now``; see the module docstring for the semantics.

    ``pinned`` maps an item id to the reasons it must be kept whatever the policy says. Raises
    ``ValueError`` for naive datetimes or duplicate ids (programming errors, not user input).
    """
    if now.tzinfo is None:
        raise ValueError("plan() needs a timezone-aware 'now'")
    pins = pinned or {}
    listed = list(items)
    naive = next((item for item in listed if item.created_at.tzinfo is None), None)
    if naive is not None:
        raise ValueError(f"backup {naive.id!r} has a naive created_at")
    if len({item.id for item in listed}) != len(listed):
        counts = Counter(item.id for item in listed)
        raise ValueError(f"backup id {counts.most_common(1)[0][0]!r} appears more than once")
    ordered = _newest_first(listed)

    keep: list[tuple[T, list[str]]] = []
    remove: list[T] = []

    # Future-dated backups come first in newest-first order; they are kept and set aside.
    first_real = 0
    while first_real < len(ordered) and ordered[first_real].created_at > now:
        item = ordered[first_real]
        keep.append((item, [*_pin_reasons(pins, item.id), REASON_FUTURE]))
        first_real += 1
    real = ordered[first_real:]
    if not real:
        return Plan(keep, remove)

    floor = max(policy.min, 1)
    last_left = policy.last or 0
    last_total = last_left
    periods = [
        _PeriodRule(name, count, key_fn, label_fn)
        for name, key_fn, label_fn in _PERIODS
        if (count := getattr(policy, name))
    ]
    cutoff: datetime | None = None
    within_all = False  # a window reaching back before year 1 covers every backup
    if policy.within is not None:
        try:
            cutoff = real[0].created_at - policy.within.delta
        except OverflowError:
            within_all = True
    within_reason = f"within {policy.within}"
    no_rules = policy.is_empty

    tail = len(real)
    for index, item in enumerate(real):
        if (
            index >= floor
            and not (last_left or periods or no_rules or within_all)
            and (cutoff is None or item.created_at <= cutoff)
        ):
            tail = index  # no rule can keep this backup or any older one: only pins can
            break
        reasons = _pin_reasons(pins, item.id)
        if last_left:
            reasons.append(f"last {index + 1}/{last_total}")
            last_left -= 1
        if periods:
            moment = item.created_at.astimezone(UTC)
            exhausted = False
            for rule in periods:
                key = rule.key_fn(moment)
                if key != rule.previous:
                    # Newest first, so the first backup seen in a period is its newest.
                    rule.previous = key
                    rule.left -= 1
                    exhausted = exhausted or not rule.left
                    reasons.append(f"{rule.name} {rule.label_fn(moment)}")
            if exhausted:
                periods = [rule for rule in periods if rule.left]
        if within_all or (cutoff is not None and item.created_at > cutoff):
            reasons.append(within_reason)
        if no_rules:
            reasons.append(REASON_NO_RULES)
        if not reasons and index < floor:
            reasons.append(REASON_NEWEST if index == 0 else f"min {policy.min}")
        if reasons:
            keep.append((item, reasons))
        else:
            remove.append(item)
    if not pins:
        remove.extend(real[tail:])
        return _keep_ancestors(ordered, keep, remove)
    for item in real[tail:]:
        if item.id in pins:
            keep.append((item, _pin_reasons(pins, item.id)))
        else:
            remove.append(item)
    return _keep_ancestors(ordered, keep, remove)


def _keep_ancestors(ordered: list[T], keep: list[tuple[T, list[str]]], remove: list[T]) -> Plan[T]:
    """Retention never breaks a chain: every ancestor of a kept backup is kept, with the
    reason ``parent of <id>`` (its child), or ``base of <id>`` for the full a kept chain
    starts from. An item is incremental when its ``incremental`` attribute is true; its
    parent is the item just before it (the names carry the chain: SPEC "Incremental
    archives")."""
    if not remove or not any(getattr(item, "incremental", False) for item in ordered):
        return Plan(keep, remove)
    reasons = {item.id: item_reasons for item, item_reasons in keep}
    removed = {item.id for item in remove}
    added: dict[str, list[str]] = {}
    head: str | None = None  # the newest kept backup of the chain being walked down
    child: str | None = None  # the incremental just after the item being looked at
    for item in ordered:  # newest first: each item's parent comes right after it
        if child is not None:
            reason = f"base of {head}" if not getattr(item, "incremental", False) else (
                f"parent of {child}"
            )
            if item.id in removed:
                added.setdefault(item.id, []).append(reason)
        kept = item.id in reasons or item.id in added
        if kept and getattr(item, "incremental", False):
            head = head if child is not None else item.id
            child = item.id
        else:
            head = child = None
    if not added:
        return Plan(keep, remove)
    merged = [*keep, *((item, added[item.id]) for item in remove if item.id in added)]
    order = {item.id: position for position, item in enumerate(ordered)}
    merged.sort(key=lambda pair: order[pair[0].id])
    return Plan(merged, [item for item in remove if item.id not in added])
