#!/usr/bin/env python3
"""Apply one night's deterministic churn to a copy of a benchmark dataset.

    python benchmarks/churn.py TREE --night N [--seed 1] [--rate 0.01]

Night N changes ``--rate`` of the regular files of TREE (1 % by default, at least one):
60 % of them are modified, 20 % deleted, and as many new files as were deleted are added
(so the file count stays about the same). Which files, and every byte written, come
from ``random.Random`` seeded with ``(seed, N)`` and the sorted list of the files that
TREE holds at that moment, so applying nights 2, 3, ... N to a fresh copy of the same
dataset always gives the same tree.

* **modify**: a file of up to 1 MiB is rewritten whole with new content of the same
  kind (text of its kind, or random bytes for images and blobs), 0.8-1.25x its size;
  a bigger log, CSV or JSON-lines file gets 64 KiB - 1 MiB of new lines appended; any
  other bigger file gets a 64 KiB - 1 MiB region overwritten in place (a database page
  write, an edited video) — so a file-level incremental stores the whole file again,
  and a chunking tool (restic) only the chunks around the change.
* **delete**: the file is removed.
* **add**: a new small file (0.5-16 KiB, a random kind) next to an existing one.

Changed and added files get mtimes in the past (30 days after the dataset's newest,
plus the night), distinct from any earlier mtime, and the directories where files were
added or deleted get a deterministic mtime as well. The dataset's ``.dataset-info.json``
is never touched (it describes the generated tree, not the churned copy).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_dataset  # noqa: E402

MODIFY_SHARE = 0.6
DELETE_SHARE = 0.2  # as many files are added as deleted
WHOLE_REWRITE_MAX = 1 * gen_dataset.MiB
REGION_MIN, REGION_MAX = 64 * gen_dataset.KiB, 1 * gen_dataset.MiB
CHURN_MTIME_BASE = gen_dataset.BASE_MTIME + 40 * 86400  # after every generated mtime

BINARY_EXTS = {".png", ".jpg", ".gz", ".bin", ".mp4", ".img"}
APPEND_EXTS = {".log": "log", ".csv": "csv", ".jsonl": "jsonl"}
TEXT_BY_EXT = {ext: gen for ext, gen, _ in gen_dataset.SMALL_KINDS if gen is not None}
TEXT_BY_EXT.update({".jsonl": "jsonl", ".txt": "prose"})


@dataclass
class ChurnStats:
    night: int
    files_before: int
    modified: int = 0
    deleted: int = 0
    added: int = 0
    bytes_written: int = 0

    def line(self) -> str:
        return (
            f"night {self.night}: {self.modified} modified, {self.deleted} deleted, "
            f"{self.added} added of {self.files_before:,} files; "
            f"{gen_dataset.format_size(self.bytes_written)} written"
        )


def _regular_files(root: Path) -> list[str]:
    """Relative paths of the regular files under ``root`` (no symlinks), sorted, info file excluded."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != gen_dataset.INFO_NAME:
                found.append(rel)
    found.sort()
    return found


def _gen_for(path: str) -> str | None:
    """The content kind of a file, from its name: a text generator, or None for random bytes."""
    ext = os.path.splitext(path)[1]
    if ext in BINARY_EXTS:
        return None
    return TEXT_BY_EXT.get(ext, "prose")


def _content(rng: random.Random, gen: str | None, size: int) -> bytes:
    spec = gen_dataset.FileSpec("", gen if size else "empty", size)
    return gen_dataset._small_content(rng, spec)


def _modify(rng: random.Random, path: Path, rel: str) -> int:
    size = path.stat().st_size
    gen = _gen_for(rel)
    if size <= WHOLE_REWRITE_MAX:
        new_size = max(64, int(size * rng.uniform(0.8, 1.25)))
        data = _content(rng, gen, new_size)
        path.write_bytes(data)
        return len(data)
    region = int(math.exp(rng.uniform(math.log(REGION_MIN), math.log(REGION_MAX))))
    ext = os.path.splitext(rel)[1]
    if ext in APPEND_EXTS:
        data = _content(rng, APPEND_EXTS[ext], region)
        with open(path, "ab") as fh:
            fh.write(b"\n" + data)
        return len(data) + 1
    offset = rng.randrange(0, max(1, size - region))
    data = _content(rng, gen, region)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    return len(data)


def apply_churn(
    root: str | os.PathLike[str], night: int, seed: int = 1, rate: float = 0.01
) -> ChurnStats:
    """Apply night ``night``'s churn to the tree at ``root`` (in place); return what changed."""
    root = Path(root)
    rng = random.Random(f"cloudbackup-bench-churn:{seed}:{night}:{rate}")
    files = _regular_files(root)
    stats = ChurnStats(night, len(files))
    if not files:
        raise ValueError(f"{root} holds no regular files to churn")
    count = min(len(files), max(1, round(rate * len(files))))
    n_delete = round(count * DELETE_SHARE)
    n_modify = max(1, round(count * MODIFY_SHARE)) if count - n_delete > 0 else 0
    n_add = n_delete if n_delete else count - n_modify
    chosen = rng.sample(files, n_modify + n_delete)
    night_base = CHURN_MTIME_BASE + night * 86400
    touched_dirs: set[Path] = set()

    def stamp(path: Path) -> None:
        t = night_base + rng.randrange(80_000)
        os.utime(path, (t, t), follow_symlinks=False)

    for rel in chosen[:n_modify]:
        path = root / rel
        stats.bytes_written += _modify(rng, path, rel)
        stamp(path)
        stats.modified += 1
    for rel in chosen[n_modify:]:
        path = root / rel
        path.unlink()
        touched_dirs.add(path.parent)
        stats.deleted += 1
    homes = rng.sample(files, min(len(files), n_add))
    lo, hi = math.log(gen_dataset.SMALL_MIN), math.log(gen_dataset.SMALL_MAX)
    kinds = list(gen_dataset.SMALL_KINDS)
    weights = [k[2] for k in kinds]
    for j, home in enumerate(homes):
        parent = (root / home).parent
        if not parent.is_dir():  # its directory went with a deletion above: use the root
            parent = root
        ext, gen, _ = rng.choices(kinds, weights)[0]
        name = f"new-n{night:02d}-{j:05d}-{rng.choice(gen_dataset.IDENTS)}{ext}"
        data = _content(rng, gen, int(math.exp(rng.uniform(lo, hi))))
        path = parent / name
        path.write_bytes(data)
        os.chmod(path, 0o644)
        stamp(path)
        touched_dirs.add(parent)
        stats.added += 1
        stats.bytes_written += len(data)
    for directory in sorted(touched_dirs):
        os.utime(directory, (night_base, night_base), follow_symlinks=False)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="a copy of a dataset (changed in place)")
    parser.add_argument("--night", type=int, required=True, help="which night's churn (2, 3, ...)")
    parser.add_argument("--seed", type=int, default=1, help="churn seed (default 1)")
    parser.add_argument(
        "--rate", type=float, default=0.01, help="share of the files changed (default 0.01)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 1:
        parser.error("--rate must be in (0, 1]")
    try:
        stats = apply_churn(args.tree, args.night, args.seed, args.rate)
    except (OSError, ValueError) as exc:
        print(f"churn: {exc}", file=sys.stderr)
        return 2
    print(stats.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
