"""Time the retention planner on 100,000 backups.

Run from the repository root (``PYTHONPATH=.`` is not needed after ``pip install -e .``):
``PYTHONPATH=. python benchmarks/bench_retention.py [COUNT] [REPEATS]``; prints the best time.
Backups are spread 97 minutes apart (about 18 years of history), shuffled, with a few in the
same second and a few dated after ``now``; the policy is a typical remote one.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cloudbackup.core.retention import parse_policy, plan

POLICY = "daily=7,weekly=4,monthly=12,yearly=10,within=2d"


@dataclass(frozen=True)
class Ref:
    id: str
    created_at: datetime


def dataset(count: int) -> tuple[list[Ref], datetime]:
    start = datetime(2008, 1, 1, tzinfo=UTC)
    items: list[Ref] = []
    for index in range(count):
        moment = start + timedelta(minutes=97 * index)
        backup_id = f"www-{moment:%Y%m%dT%H%M%SZ}"
        items.append(Ref(backup_id, moment))
        if index % 1000 == 0:  # a second backup in the same second now and then
            items.append(Ref(f"{backup_id}-2", moment))
    now = items[-1].created_at - timedelta(days=1)  # the last day's backups are "in the future"
    random.Random(0).shuffle(items)
    return items[:count], now


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    items, now = dataset(count)
    policy = parse_policy(POLICY)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        result = plan(items, policy, now=now)
        best = min(best, time.perf_counter() - began)
    print(
        f"planned {len(items):,} backups with {POLICY!r}: {best:.3f} s "
        f"(best of {repeats}; kept {len(result.keep)}, removed {len(result.remove)})"
    )


if __name__ == "__main__":
    main()
