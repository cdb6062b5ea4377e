#!/usr/bin/env python3
"""Generate a deterministic benchmark dataset: the mixed tree, or the small-file tree.

    python benchmarks/gen_dataset.py [DEST] [--size 1GiB] [--seed 1] [--jobs N] [--force]
    python benchmarks/gen_dataset.py [DEST] --kind small [--files 200000] [--size 790MB]

DEST defaults to ``/tmp/cb-bench/ds-<size>`` (``ds-1g``) for the mixed tree and
``/tmp/cb-bench/ds-small`` for the default small-file tree (``ds-small-20k`` for
``--files 20000``, and so on).

The same ``--kind``, ``--seed``, ``--size`` (and ``--files``) always give a
byte-identical tree: the same paths, contents, modes, symlink targets and
mtimes (the only things that differ between two runs are inode numbers,
ctimes/atimes and the owner, which is whoever ran the script).

What is in the mixed tree (``--kind mixed``, the default; shares of ``--size``,
by file bytes):

* ~40 % compressible text in ``logs/``, ``data/`` and ``docs/``: application
  and access logs, CSV exports, JSON / JSON-lines, and prose.  The content is
  built from vocabularies, templates and varying numbers, ids and timestamps,
  so it compresses like real text (zstd -3 reaches about 4x on it), not like
  runs of zeros.
* ~45 % incompressible data in ``media/``: a few large files of random bytes
  (50-200 MiB each at 1 GiB, scaled with ``--size``).
* ~15 % small files (0.5-16 KiB, at least 20,000 of them whatever the size)
  spread over a nested tree ``src/`` up to 5 levels deep: source code,
  configuration, JSON, Markdown, CSV and about a fifth binary (random) blobs.
  At small sizes the 20,000-file floor makes this share bigger; the other two
  shares shrink so that the total stays close to ``--size``.
* a few empty directories, empty files, executable scripts and relative
  symlinks to files and to directories (all of them resolve inside the tree).

What is in the small-file tree (``--kind small``): ``--files`` files (default
200,000) holding ``--size`` bytes in total (default 3,950 bytes per file:
790 MB for 200,000), with log-normal sizes (median ~1.7 KB, a long tail up to
about 1 MiB, a few empty files) rescaled to hit the total exactly; the same
mix of kinds as the mixed tree's ``src/`` (code, configuration, JSON, Markdown,
CSV, logs: compressible; about a fifth by count random "images" and blobs);
spread over a random directory tree about 20 files per directory on average,
up to 7 levels deep, where a few directories hold hundreds or thousands of
files (a Pareto-weighted share, like mail or cache directories); plus empty
directories, executable scripts, private (0600) configuration files and
relative symlinks to files and directories.

Content is generated from ``random.Random`` streams seeded from strings (which
Python hashes with SHA-512, so seeding is stable across runs and versions), in
``--jobs`` worker processes; each file's or batch's content depends only on
its own seed, so the number of workers does not change the result.  The tree
is built in ``DEST.partial`` and renamed to DEST at the end, so a DEST that
exists is complete.  A small ``.dataset-info.json`` (deterministic: seed, size,
counts) is written at the top of the tree and is part of it.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GENERATOR_VERSION = 1
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TEXT_SHARE = 0.40
LARGE_SHARE = 0.45
SMALL_SHARE = 0.15
MIN_SMALL_FILES = 20_000
SMALL_MIN, SMALL_MAX = 512, 16 * KiB
MAX_DEPTH = 4  # below src/, so files sit at most 5 directories deep
# All mtimes fall in the 30 days after this moment (2024-03-01T00:00:00Z).
BASE_MTIME = 1_709_251_200
INFO_NAME = ".dataset-info.json"

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": 1024 * GiB,
    "tib": 1024 * GiB,
    "tb": 1000**4,
}


def parse_size(text: str) -> int:
    """``1GiB``, ``256MiB``, ``0.25GiB``, ``1G`` (binary), ``500MB`` (decimal), ``4096``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 1GiB, 256MiB, 0.25GiB)")
    return int(round(float(match[1]) * _UNITS[match[2].lower()]))


def format_size(n: float) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------
# Vocabularies (constant: they do not depend on the seed)

_COMMON = """
the of and to in is that for it as with was on be by this are or from at an have not which but all they
their has one were can more will been other its also when there some these into only time two after new
use most where first over such like system data file user server request response value table index
query backup archive storage bucket object region cluster node service worker process thread memory disk
network latency error warning retry timeout session token account customer order invoice payment price
product report month year week daily nightly schedule policy retention version release build deploy test
config setting option default path directory record field column row batch stream buffer cache queue
event message handler client upload download checksum manifest snapshot restore compress encrypt key
cloud host instance volume database schema migration transaction commit rollback lock replica primary
we our you your should would could must may might need make made take given found shows show used using
between without within through before during under again further then once here why how what each few
both very just than too same so because while until against about above below up down out off into
""".split()

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "vo",
    "zi",
    "pe",
    "sha",
    "tor",
    "ven",
    "dal",
    "rix",
    "mon",
    "qua",
    "bel",
    "cor",
    "fin",
    "gal",
    "hes",
    "jor",
    "lum",
    "nor",
    "pra",
    "sil",
    "tem",
    "ul",
    "var",
    "wen",
    "xen",
    "yor",
    "zel",
    "ar",
    "en",
    "is",
    "on",
    "um",
    "ex",
    "al",
]


def _build_vocab() -> tuple[list[str], list[float]]:
    rng = random.Random("cloudbackup-bench-vocab")
    words = list(dict.fromkeys(_COMMON))
    seen = set(words)
    while len(words) < 3000:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    # Zipf-like frequencies: the common English words first, then the rest.
    weights = [1.0 / (rank + 8) ** 1.15 for rank in range(len(words))]
    cum: list[float] = []
    total = 0.0
    for weight in weights:
        total += weight
        cum.append(total)
    return words, cum


VOCAB, VOCAB_CUM = _build_vocab()
IDENTS = [w for w in VOCAB[:1200] if w.isidentifier()]

FIRST_NAMES = """James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard
Susan Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Margaret
Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda
Brian Dorothy George Melissa Timothy Deborah Ronald Stephanie Edward Rebecca Jason Sharon Jeffrey Laura Ryan
Cynthia Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley Jonathan Anna Stephen Brenda Larry Pamela Justin
Emma Scott Nicole Brandon Helen Benjamin Samantha Samuel Katherine Gregory Christine Alexander Debra Frank
Rachel Patrick Carolyn Raymond Janet Jack Catherine Dennis Maria Jerry Heather Tyler Diane Aaron Ruth""".split()
LAST_NAMES = """Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez
Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark
Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker
Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins
Reyes Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly
Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes""".split()
CITIES = [
    ("Berlin", "DE"),
    ("Hamburg", "DE"),
    ("Munich", "DE"),
    ("Paris", "FR"),
    ("Lyon", "FR"),
    ("Madrid", "ES"),
    ("Barcelona", "ES"),
    ("Rome", "IT"),
    ("Milan", "IT"),
    ("Amsterdam", "NL"),
    ("Rotterdam", "NL"),
    ("Vienna", "AT"),
    ("Zurich", "CH"),
    ("Geneva", "CH"),
    ("London", "GB"),
    ("Manchester", "GB"),
    ("Dublin", "IE"),
    ("Lisbon", "PT"),
    ("Porto", "PT"),
    ("Warsaw", "PL"),
    ("Prague", "CZ"),
    ("Stockholm", "SE"),
    ("Oslo", "NO"),
    ("Copenhagen", "DK"),
    ("Helsinki", "FI"),
    ("New York", "US"),
    ("Chicago", "US"),
    ("Seattle", "US"),
    ("Austin", "US"),
    ("Boston", "US"),
    ("Toronto", "CA"),
    ("Montreal", "CA"),
    ("Sydney", "AU"),
    ("Melbourne", "AU"),
    ("Tokyo", "JP"),
    ("Osaka", "JP"),
    ("Seoul", "KR"),
    ("Singapore", "SG"),
    ("Mumbai", "IN"),
    ("Bangalore", "IN"),
    ("Sao Paulo", "BR"),
]
STATUSES = ["paid", "paid", "paid", "shipped", "shipped", "pending", "refunded", "cancelled"]
LEVELS = ["INFO", "INFO", "INFO", "INFO", "INFO", "DEBUG", "DEBUG", "WARN", "ERROR"]
COMPONENTS = [
    "api",
    "scheduler",
    "uploader",
    "db",
    "auth",
    "cache",
    "worker",
    "gc",
    "http",
    "storage",
]
HTTP_PATHS = [
    "/api/v1/users/{a}",
    "/api/v1/orders/{a}",
    "/api/v1/orders",
    "/api/v2/products/{a}/reviews",
    "/static/app.{h8}.js",
    "/static/style.{h8}.css",
    "/healthz",
    "/metrics",
    "/login",
    "/logout",
    "/api/v1/search?q={w}&page={b}",
    "/api/v1/backups/{w}-{a}/download",
    "/images/{a}.jpg",
]
LOG_TEMPLATES = [
    "request completed method={m} path={p} status={s} duration_ms={b} bytes={c}",
    "request completed method={m} path={p} status={s} duration_ms={b} bytes={c}",
    "cache miss key=session:{h8} ttl={b}s",
    "cache hit key=user:{a} age={b}s",
    "accepted connection from 10.{o1}.{o2}.{o3}:{port}",
    "job {w}-{a} finished in {b}.{o1}s rows={c}",
    "query executed table={w} rows={b} elapsed_ms={o1}.{o2}",
    "uploading part {o1} of backups/{w}-{a}.tar.zst size={c} attempt={r}",
    "user {a} logged in from 192.168.{o1}.{o2} agent=Mozilla/5.0",
    "scheduled task {w} next run in {b}s",
    "slow request path={p} duration_ms={c} threshold_ms=1000 trace_id={h16}",
    "connection pool stats active={o1} idle={o2} waiting={r} max=64",
    "gc pause {o1}.{o2}ms heap_before={c}K heap_after={b}K",
    "retrying {w} after error: timeout after {b}ms (attempt {r} of 5)",
    "checksum verified object={w}/{a} sha256={h16}{h8}",
]
ACCESS_UAS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:123.0) Gecko/20100101 Firefox/123.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_3) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.3",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Prometheus/2.50.1",
    "kube-probe/1.29",
]
METHODS = ["GET", "GET", "GET", "GET", "POST", "POST", "PUT", "DELETE"]
HTTP_STATUS = ["200", "200", "200", "200", "200", "200", "201", "204", "301", "304", "404", "500"]


# --------------------------------------------------------------------------
# Text generators.  Each ``*_text(rng, n)`` returns about ``n`` characters
# (ASCII) of one kind of content; callers trim to the exact size.


def _ts(sec: int, cache: dict[int, str]) -> str:
    text = cache.get(sec)
    if text is None:
        if len(cache) > 4096:
            cache.clear()
        text = cache[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return text


class LogState:
    def __init__(self, rng: random.Random) -> None:
        self.ms = (BASE_MTIME - 86400 * rng.randint(1, 60)) * 1000 + rng.randrange(86_400_000)
        self.cache: dict[int, str] = {}


def log_text(rng: random.Random, n: int, state: LogState | None = None) -> str:
    state = state or LogState(rng)
    lines = max(1, n // 105)
    rb = rng.getrandbits
    levels = rng.choices(LEVELS, k=lines)
    comps = rng.choices(COMPONENTS, k=lines)
    tmpls = rng.choices(LOG_TEMPLATES, k=lines)
    words = rng.choices(IDENTS[:200], k=lines)
    paths = rng.choices(HTTP_PATHS, k=lines)
    out = []
    ms = state.ms
    cache = state.cache
    for i in range(lines):
        ms += rb(8) + rb(6)
        sec, frac = divmod(ms, 1000)
        a = rb(17)
        w = words[i]
        path = paths[i]
        if "{" in path:
            path = path.format(a=a, b=rb(4), w=w, h8=f"{rb(32):08x}")
        msg = tmpls[i].format(
            m=METHODS[rb(3)],
            p=path,
            s=HTTP_STATUS[rb(3)],
            a=a,
            b=rb(9),
            c=rb(16),
            w=w,
            o1=rb(8),
            o2=rb(8),
            o3=rb(8),
            port=1024 + rb(15),
            r=1 + rb(2),
            h8=f"{rb(32):08x}",
            h16=f"{rb(64):016x}",
        )
        out.append(f"{_ts(sec, cache)}.{frac:03d}Z {levels[i]:<5} [{comps[i]}-{rb(3)}] {msg}\n")
    state.ms = ms
    return "".join(out)


def access_log_text(rng: random.Random, n: int, state: LogState | None = None) -> str:
    state = state or LogState(rng)
    lines = max(1, n // 170)
    rb = rng.getrandbits
    uas = rng.choices(ACCESS_UAS, k=lines)
    paths = rng.choices(HTTP_PATHS, k=lines)
    words = rng.choices(IDENTS[:200], k=lines)
    out = []
    ms = state.ms
    cache = state.cache
    for i in range(lines):
        ms += rb(9)
        path = paths[i]
        if "{" in path:
            path = path.format(a=rb(17), b=rb(4), w=words[i], h8=f"{rb(32):08x}")
        out.append(
            f'203.0.{rb(4)}.{rb(8)} - - [{_ts(ms // 1000, cache)}+0000] "{METHODS[rb(3)]} {path} HTTP/1.1" '
            f'{HTTP_STATUS[rb(3)]} {rb(15)} "-" "{uas[i]}"\n'
        )
    state.ms = ms
    return "".join(out)


def csv_text(rng: random.Random, n: int, header: bool = True, start: int = 0) -> str:
    rows = max(1, n // 120)
    rb = rng.getrandbits
    firsts = rng.choices(FIRST_NAMES, k=rows)
    lasts = rng.choices(LAST_NAMES, k=rows)
    cities = rng.choices(CITIES, k=rows)
    statuses = rng.choices(STATUSES, k=rows)
    out = (
        ["order_id,created_at,customer,email,city,country,sku,quantity,unit_price,total,status\n"]
        if header
        else []
    )
    sec = BASE_MTIME - 86400 * 90 + start * 37
    order = 100_000 + start
    cache: dict[int, str] = {}
    for i in range(rows):
        order += 1
        sec += rb(6)
        first, last = firsts[i], lasts[i]
        city, country = cities[i]
        qty = 1 + rb(3)
        cents = 199 + rb(14)
        out.append(
            f"{order},{_ts(sec, cache)}Z,{first} {last},{first.lower()}.{last.lower()}{rb(7)}@example.com,"
            f"{city},{country},SKU-{rb(12):04d},{qty},{cents // 100}.{cents % 100:02d},"
            f"{qty * cents // 100}.{qty * cents % 100:02d},{statuses[i]}\n"
        )
    return "".join(out)


def _json_record(
    rng: random.Random, i: int, sec: int, cache: dict[int, str], indent: str | None
) -> str:
    rb = rng.getrandbits
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    city, country = rng.choice(CITIES)
    tags = ", ".join(f'"{t}"' for t in rng.sample(IDENTS[:150], 1 + rb(2)))
    fields = [
        f'"id": {i}',
        f'"uuid": "{rb(32):08x}-{rb(16):04x}-4{rb(12):03x}-{rb(16):04x}-{rb(48):012x}"',
        f'"created_at": "{_ts(sec, cache)}Z"',
        f'"name": "{first} {last}"',
        f'"email": "{first.lower()}.{last.lower()}@example.org"',
        f'"address": {{"city": "{city}", "country": "{country}", "zip": "{rb(16):05d}"}}',
        f'"active": {"true" if rb(1) else "false"}',
        f'"score": {rb(10)}.{rb(7)}',
        f'"tags": [{tags}]',
        f'"plan": "{rng.choice(("free", "pro", "team", "enterprise"))}"',
    ]
    if indent is None:
        return "{" + ", ".join(fields) + "}"
    inner = ",\n".join(indent * 2 + f for f in fields)
    return f"{indent}{{\n{inner}\n{indent}}}"


def jsonl_text(rng: random.Random, n: int) -> str:
    records = max(1, n // 400)
    sec = BASE_MTIME - 86400 * 200
    cache: dict[int, str] = {}
    out = []
    for i in range(records):
        sec += rng.getrandbits(10)
        out.append(_json_record(rng, i, sec, cache, None) + "\n")
    return "".join(out)


def json_pretty_text(rng: random.Random, n: int) -> str:
    records = max(1, n // 480)
    sec = BASE_MTIME - 86400 * 200
    cache: dict[int, str] = {}
    body = []
    for i in range(records):
        sec += rng.getrandbits(10)
        body.append(_json_record(rng, i, sec, cache, "  "))
    return '{\n  "version": 3,\n  "items": [\n' + ",\n".join(body) + "\n  ]\n}\n"


def prose_text(rng: random.Random, n: int, markdown: bool = False) -> str:
    nwords = max(8, n // 6)
    words = rng.choices(VOCAB, cum_weights=VOCAB_CUM, k=nwords)
    lengths = rng.choices(range(5, 24), k=nwords // 5 + 2)
    out = []
    pos = 0
    sentence = 0
    for length in lengths:
        if pos >= nwords:
            break
        chunk = words[pos : pos + length]
        pos += length
        text = " ".join(chunk)
        out.append(text[:1].upper() + text[1:] + (". " if sentence % 7 else ", "))
        sentence += 1
        if sentence % 6 == 0:
            out.append("\n\n")
            if markdown and sentence % 30 == 0:
                heading = " ".join(rng.choices(VOCAB[:300], k=3)).title()
                out.append(f"## {heading}\n\n")
    return "".join(out)


def code_text(rng: random.Random, n: int) -> str:
    out = [
        '"""'
        + prose_text(rng, 80).strip()
        + '"""\n\nfrom __future__ import annotations\n\nimport os\nimport sys\n\n'
    ]
    size = len(out[0])
    idents = IDENTS
    rb = rng.getrandbits
    while size < n:
        name = f"{rng.choice(idents)}_{rng.choice(idents)}"
        args = ", ".join(rng.sample(idents[:300], 1 + rb(2)))
        lines = [f"\n\ndef {name}({args}):\n", f'    """{prose_text(rng, 60).strip()}"""\n']
        for _ in range(2 + rb(3)):
            var = rng.choice(idents)
            op = rng.choice(("+", "-", "*", "//"))
            lines.append(f"    {var} = {rng.choice(idents)}({rng.choice(idents)}) {op} {rb(10)}\n")
            if rb(1):
                lines.append(f"    if {var} > {rb(8)}:\n        return {var}\n")
        lines.append(f"    return {rng.choice(idents)}\n")
        block = "".join(lines)
        out.append(block)
        size += len(block)
    return "".join(out)


def config_text(rng: random.Random, n: int) -> str:
    out = [f"# {prose_text(rng, 60).strip()}\n"]
    size = len(out[0])
    rb = rng.getrandbits
    while size < n:
        section = rng.choice(IDENTS[:300])
        lines = [f"\n{section}:\n"]
        for _ in range(2 + rb(3)):
            key = rng.choice(IDENTS[:400])
            kind = rb(2)
            if kind == 0:
                value = str(rb(12))
            elif kind == 1:
                value = rng.choice(("true", "false", "null"))
            elif kind == 2:
                value = f'"{rng.choice(IDENTS)}-{rb(8)}"'
            else:
                value = f"/var/lib/{rng.choice(IDENTS)}/{rng.choice(IDENTS)}"
            lines.append(f"  {key}: {value}\n")
        block = "".join(lines)
        out.append(block)
        size += len(block)
    return "".join(out)


# --------------------------------------------------------------------------
# Plan

SMALL_KINDS = [  # (extension, generator or None for random bytes, weight)
    (".py", "code", 22),
    (".yaml", "config", 12),
    (".json", "json", 12),
    (".md", "md", 12),
    (".txt", "prose", 8),
    (".csv", "csv", 6),
    (".log", "log", 8),
    (".png", None, 8),
    (".jpg", None, 6),
    (".gz", None, 4),
    (".bin", None, 2),
]
TEXT_KINDS = [  # (directory, extension, generator, weight)
    ("logs/app", ".log", "log", 28),
    ("logs/nginx", ".log", "access", 12),
    ("data/exports", ".csv", "csv", 20),
    ("data/events", ".jsonl", "jsonl", 12),
    ("data/api", ".json", "json", 8),
    ("docs", ".txt", "prose", 10),
    ("docs/notes", ".md", "md", 10),
]
LARGE_NAMES = [
    ("media/video", "recording-{i:02d}.mp4"),
    ("media/images", "disk-{i:02d}.img"),
    ("media/archives", "photos-{i:02d}.tar.gz"),
    ("media/db", "blob-store-{i:02d}.bin"),
]


@dataclass
class FileSpec:
    path: str
    gen: str | None  # text generator name, or None for random bytes
    size: int
    mode: int = 0o644


@dataclass
class Plan:
    seed: int
    size: int
    large: list[FileSpec] = field(default_factory=list)
    text: list[FileSpec] = field(default_factory=list)
    small: list[FileSpec] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    # (link path, target relative to the link's directory)
    symlinks: list[tuple[str, str]] = field(default_factory=list)


def _spread(rng: random.Random, budget: int, lo: float, hi: float, log: bool = False) -> list[int]:
    """Split ``budget`` bytes into files whose sizes are drawn from [lo, hi] (then rescaled)."""
    if budget <= 0:
        return []
    mean = (hi - lo) / math.log(hi / lo) if log else (lo + hi) / 2
    count = max(1, round(budget / mean))
    draws = [
        math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi)
        for _ in range(count)
    ]
    scale = budget / sum(draws)
    sizes = [int(d * scale) for d in draws]
    sizes[-1] += budget - sum(sizes)
    return sizes


def make_plan(size: int, seed: int) -> Plan:
    rng = random.Random(f"cloudbackup-bench-plan:{GENERATOR_VERSION}:{seed}:{size}")
    plan = Plan(seed, size)
    scale = size / GiB

    # Small files in a nested tree.
    log_lo, log_hi = math.log(SMALL_MIN), math.log(SMALL_MAX)
    mean_small = (SMALL_MAX - SMALL_MIN) / (log_hi - log_lo)
    n_small = max(MIN_SMALL_FILES, round(size * SMALL_SHARE / mean_small))
    n_dirs = max(60, n_small // 24)
    dirs = [("src", 0)]
    names_used: set[str] = set()
    shallow = [0]  # indices of dirs that may get children
    while len(dirs) < n_dirs + 1:
        parent, depth = dirs[rng.choice(shallow)]
        name = f"{rng.choice(IDENTS[:600])}"
        if rng.random() < 0.3:
            name += f"-{rng.randint(1, 99)}"
        path = f"{parent}/{name}"
        if path in names_used:
            continue
        names_used.add(path)
        dirs.append((path, depth + 1))
        if depth + 1 < MAX_DEPTH:
            shallow.append(len(dirs) - 1)
    plan.dirs = [d for d, _ in dirs]
    not_deepest = [d for d, depth in dirs[1:] if depth < MAX_DEPTH]
    kinds = [k for k in SMALL_KINDS]
    weights = [k[2] for k in SMALL_KINDS]
    file_dirs = rng.choices(range(len(dirs)), k=n_small)
    for i in range(n_small):
        ext, gen, _ = rng.choices(kinds, weights)[0]
        fsize = int(math.exp(rng.uniform(log_lo, log_hi)))
        name = f"{rng.choice(IDENTS)}_{i:05d}{ext}"
        plan.small.append(FileSpec(f"{dirs[file_dirs[i]][0]}/{name}", gen, fsize))
    for i in range(0, n_small, 997):  # a few executable scripts
        spec = plan.small[i]
        if spec.path.endswith(".py"):
            spec.mode = 0o755
    small_bytes = sum(f.size for f in plan.small)

    # Text and large files share what is left, 40:45.
    rest = max(0, size - small_bytes)
    text_budget = int(rest * TEXT_SHARE / (TEXT_SHARE + LARGE_SHARE))
    large_budget = rest - text_budget
    for i, fsize in enumerate(
        _spread(
            rng, text_budget, 256 * KiB * max(scale, 0.05), 48 * MiB * max(scale, 0.05), log=True
        )
    ):
        directory, ext, gen, _ = rng.choices(TEXT_KINDS, [k[3] for k in TEXT_KINDS])[0]
        if gen in ("log", "access"):
            directory += f"/2024/{1 + i % 3:02d}"
        plan.text.append(FileSpec(f"{directory}/{gen}-{i:03d}{ext}", gen, fsize))
    for i, fsize in enumerate(_spread(rng, large_budget, 50 * MiB * scale, 200 * MiB * scale)):
        directory, pattern = LARGE_NAMES[i % len(LARGE_NAMES)]
        plan.large.append(FileSpec(f"{directory}/{pattern.format(i=i)}", None, fsize))

    # Empty things and symlinks (relative, all resolving inside the tree).
    plan.empty_dirs = ["empty", "empty/a/b/c", "logs/archive", "media/incoming", "src/.cache"]
    for i in range(1, 4):
        plan.empty_dirs.append(f"{rng.choice(not_deepest)}/tmp-{i}")
    for i in range(3):
        plan.small.append(FileSpec(f"{rng.choice(plan.dirs)}/.keep-{i}", "empty", 0))
    first_log = next(
        (f.path for f in plan.text if f.path.startswith("logs/app")),
        plan.text[0].path if plan.text else "src",
    )
    plan.symlinks.append(("latest.log", first_log))
    if plan.large:
        plan.symlinks.append(("media/current", os.path.relpath(plan.large[0].path, "media")))
    plan.symlinks.append(("src-current", plan.dirs[1]))  # symlink to a directory
    for i in range(5):
        link_dir = rng.choice(plan.dirs)
        target = rng.choice(plan.small[:n_small]).path
        plan.symlinks.append((f"{link_dir}/link-{i}", os.path.relpath(target, link_dir)))
    return plan


# --------------------------------------------------------------------------
# The small-file tree (``--kind small``)

KINDS = ("mixed", "small")
SMALL_TREE_FILES = 200_000
SMALL_TREE_MEAN = 3_950  # bytes per file by default: 200,000 files = 790 MB
SMALL_TREE_MEDIAN = 1_700  # log-normal file sizes, before rescaling to the total
SMALL_TREE_SIGMA = 1.3
SMALL_TREE_MAX_FILE = 1 * MiB  # before rescaling
SMALL_TREE_EMPTY = 0.005  # share of empty files
SMALL_TREE_FILES_PER_DIR = 20  # on average
SMALL_TREE_DEPTH = 7  # directory levels at most below the root
SMALL_TREE_MTIME_KEY = "cloudbackup-bench-small-mtimes"


def default_small_size(files: int) -> int:
    """The default ``--size`` of a small-file tree of ``files`` files (790 MB for 200,000)."""
    return files * SMALL_TREE_MEAN


def make_small_plan(files: int, size: int, seed: int) -> Plan:
    """``files`` small files, ``size`` bytes in all, in a random tree with a realistic fan-out."""
    if files < 100:
        raise ValueError(f"a small-file tree needs at least 100 files, not {files}")
    rng = random.Random(f"cloudbackup-bench-small-plan:{GENERATOR_VERSION}:{seed}:{files}:{size}")
    plan = Plan(seed, size)

    # A random recursive tree: each new directory hangs under a directory picked uniformly
    # among those above the depth limit, so the early ones fan out (~ln n children at the
    # top) and most end up with none or one: a shape file systems really have.
    n_dirs = max(10, files // SMALL_TREE_FILES_PER_DIR)
    dirs: list[tuple[str, int]] = [("", 0)]
    seen: set[str] = set()
    eligible = [0]
    while len(dirs) < n_dirs + 1:
        parent, depth = dirs[rng.choice(eligible)]
        name = rng.choice(IDENTS[:800])
        if rng.random() < 0.25:
            name += f"-{rng.randint(1, 999)}"
        elif rng.random() < 0.1:
            name = "." + name  # dot-directories exist too (.git, .cache, .config)
        path = f"{parent}/{name}" if parent else name
        if path in seen:
            continue
        seen.add(path)
        dirs.append((path, depth + 1))
        if depth + 1 < SMALL_TREE_DEPTH:
            eligible.append(len(dirs) - 1)
    plan.dirs = [d for d, _ in dirs[1:]]

    # Files go to directories with Pareto weights: most hold a handful, a few hundreds.
    weights = [min(rng.paretovariate(1.2), 150.0) for _ in dirs]
    homes = rng.choices(range(len(dirs)), weights, k=files)
    kinds = list(SMALL_KINDS)
    kind_weights = [k[2] for k in SMALL_KINDS]
    mu = math.log(SMALL_TREE_MEDIAN)
    raw: list[int] = []
    for i in range(files):
        ext, gen, _ = rng.choices(kinds, kind_weights)[0]
        if rng.random() < SMALL_TREE_EMPTY:
            fsize = 0
        else:
            fsize = max(1, min(SMALL_TREE_MAX_FILE, int(rng.lognormvariate(mu, SMALL_TREE_SIGMA))))
        raw.append(fsize)
        parent = dirs[homes[i]][0]
        name = f"{rng.choice(IDENTS)}_{i:06d}{ext}"
        mode = 0o644
        if ext == ".py" and rng.random() < 0.05:
            mode = 0o755
        elif ext == ".yaml" and rng.random() < 0.05:
            mode = 0o600
        plan.small.append(
            FileSpec(f"{parent}/{name}" if parent else name, gen if fsize else "empty", fsize, mode)
        )
    # Rescale the non-empty files so that the total is exactly ``size``.
    total = sum(raw)
    scale = size / total if total else 0.0
    sizes = [max(1, int(r * scale)) if r else 0 for r in raw]
    last = max(i for i, r in enumerate(raw) if r) if total else None
    if last is not None:
        sizes[last] = max(1, sizes[last] + size - sum(sizes))
    for spec, fsize in zip(plan.small, sizes, strict=True):
        spec.size = fsize

    # Empty directories (besides those the draw left without files) and symlinks.
    deep_enough = [d for d, depth in dirs[1:] if depth < SMALL_TREE_DEPTH]
    plan.empty_dirs = ["empty", ".cache/tmp"] + [
        f"{rng.choice(deep_enough)}/tmp-{i}" for i in range(1, 6)
    ]
    for i in range(20):
        link_dir = rng.choice(plan.dirs)
        target = rng.choice(plan.small).path
        plan.symlinks.append((f"{link_dir}/link-{i}", os.path.relpath(target, link_dir)))
    for i in range(3):
        link_dir = rng.choice(plan.dirs)
        target = rng.choice(plan.dirs)
        related = (target + "/").startswith(link_dir + "/") or link_dir.startswith(target + "/")
        if not related:  # never a link to its own ancestor or descendant: no cycles
            plan.symlinks.append((f"{link_dir}/dirlink-{i}", os.path.relpath(target, link_dir)))
    return plan


def default_path(
    kind: str = "mixed", size: int | None = None, seed: int = 1, files: int | None = None
) -> Path:
    """Where a dataset lives by default: ``/tmp/cb-bench/ds-1g``, ``ds-small``, ``ds-small-20k``..."""
    if kind == "small":
        files = files or SMALL_TREE_FILES
        name = "ds-small"
        if files != SMALL_TREE_FILES:
            name += f"-{files // 1000}k" if files % 1000 == 0 else f"-{files}"
        if size is not None and size != default_small_size(files):
            name += f"-{size_label(size)}"
    else:
        name = f"ds-{size_label(size if size is not None else GiB)}"
    return BENCH_ROOT / (name + ("" if seed == 1 else f"-s{seed}"))


def size_label(size: int) -> str:
    """1 GiB -> ``1g``, 256 MiB -> ``256m``, 790 MB -> ``790mb`` (dataset directory names)."""
    if size % GiB == 0:
        return f"{size // GiB}g"
    if size % MiB == 0:
        return f"{size // MiB}m"
    if size % 1000**2 == 0:
        return f"{size // 1000**2}mb"
    return f"{size}b"


BENCH_ROOT = Path("/tmp/cb-bench")


# --------------------------------------------------------------------------
# Writing

TEXT_GENERATORS: dict[str, Callable[[random.Random, int], str]] = {
    "code": code_text,
    "config": config_text,
    "json": json_pretty_text,
    "jsonl": jsonl_text,
    "md": lambda rng, n: prose_text(rng, n, markdown=True),
    "prose": prose_text,
    "csv": csv_text,
}
CHUNK = 4 * MiB


def _chunk_maker(rng: random.Random, gen: str) -> Callable[[int], str]:
    """A function giving successive ~n-character chunks of one file of kind ``gen``."""
    if gen in ("log", "access"):
        state = LogState(rng)  # shared, so timestamps keep increasing across chunks
        if gen == "log":
            return lambda n: log_text(rng, n, state)
        return lambda n: access_log_text(rng, n, state)
    if gen == "csv":
        rows = [0]

        def csv_chunk(n: int) -> str:
            text = csv_text(rng, n, header=rows[0] == 0, start=rows[0])
            rows[0] += n // 120
            return text

        return csv_chunk
    func = TEXT_GENERATORS[gen]
    return lambda n: func(rng, n)


def _write_text(rng: random.Random, fh: BinaryIO, gen: str, size: int) -> None:
    if gen == "json":  # one document, written whole
        data = json_pretty_text(rng, size + 4 * KiB).encode()
        while len(data) < size:
            data += json_pretty_text(rng, size - len(data) + 4 * KiB).encode()
        fh.write(data[:size])
        return
    make = _chunk_maker(rng, gen)
    written = 0
    while written < size:
        want = min(CHUNK, size - written)
        data = make(want + 512).encode()[: size - written]
        fh.write(data)
        written += len(data)


def _write_file(root: Path, rng: random.Random, spec: FileSpec) -> None:
    path = root / spec.path
    with open(path, "wb") as fh:
        if spec.gen == "empty" or spec.size == 0:
            pass
        elif spec.gen is None:
            left = spec.size
            while left:
                n = min(CHUNK, left)
                fh.write(rng.randbytes(n))
                left -= n
        else:
            _write_text(rng, fh, spec.gen, spec.size)
    os.chmod(path, spec.mode)


def _small_content(rng: random.Random, spec: FileSpec) -> bytes:
    if spec.size == 0:
        return b""
    if spec.gen is None:
        return rng.randbytes(spec.size)
    if spec.gen == "log":
        text = log_text(rng, spec.size + 256)
    else:
        text = TEXT_GENERATORS[spec.gen](rng, spec.size + 256)
    data = text.encode()
    while len(data) < spec.size:  # generators undershoot on tiny sizes now and then
        data += b"\n" + data
    return data[: spec.size]


def _task(args: tuple[str, int, str, bool, list[FileSpec]]) -> int:
    root, seed, key, whole, specs = args
    rng = random.Random(f"cloudbackup-bench:{GENERATOR_VERSION}:{seed}:{key}")
    base = Path(root)
    if whole:
        for spec in specs:
            _write_file(base, rng, spec)
        return sum(s.size for s in specs)
    for spec in specs:
        path = base / spec.path
        with open(path, "wb") as fh:
            fh.write(_small_content(rng, spec))
        os.chmod(path, spec.mode)
    return sum(s.size for s in specs)


def _set_times(root: Path, plan: Plan, key: str = "cloudbackup-bench-mtimes") -> None:
    rng = random.Random(f"{key}:{plan.seed}:{plan.size}")
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [
            d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        ]:
            entries.append(os.path.join(dirpath, name))
    for path in entries:
        t = BASE_MTIME + rng.randrange(30 * 86400)
        os.utime(path, (t, t), follow_symlinks=False)
    # Directories last, deepest first, so setting a child's time does not touch the parent's again.
    all_dirs = [dp for dp, _, _ in os.walk(root)]
    for path in sorted(all_dirs, key=lambda p: (-p.count(os.sep), p)):
        t = BASE_MTIME + 30 * 86400 + (hash_str(os.path.relpath(path, root)) % 86400)
        os.utime(path, (t, t), follow_symlinks=False)


def hash_str(text: str) -> int:
    """A stable string hash (``hash()`` is salted per process)."""
    return random.Random(text).getrandbits(32)


def generate(
    dest: str | os.PathLike[str],
    size: int | None = None,
    seed: int = 1,
    jobs: int | None = None,
    force: bool = False,
    quiet: bool = False,
    *,
    kind: str = "mixed",
    files: int | None = None,
) -> dict[str, Any]:
    """Build the dataset at ``dest``; return its summary (also stored in ``dest/.dataset-info.json``).

    ``kind`` is ``mixed`` (``size`` defaults to 1 GiB; ``files`` does not apply) or ``small``
    (``files`` defaults to 200,000 and ``size`` to 3,950 bytes per file).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "mixed" and files is not None:
        raise ValueError("--files applies to --kind small only")
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not force:
            raise FileExistsError(f"{dest} exists (use --force to replace it)")
        shutil.rmtree(dest)
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    started = time.perf_counter()
    if kind == "small":
        files = files or SMALL_TREE_FILES
        size = default_small_size(files) if size is None else size
        plan = make_small_plan(files, size, seed)
        batch_key = "small-tree-batch"
    else:
        size = GiB if size is None else size
        plan = make_plan(size, seed)
        batch_key = "small-batch"
    partial.mkdir(parents=True)
    all_files = plan.large + plan.text + plan.small
    dir_set = (
        {str(Path(f.path).parent) for f in all_files}
        | set(plan.dirs)
        | set(plan.empty_dirs)
        | {str(Path(s).parent) for s, _ in plan.symlinks}
    )
    for d in sorted(dir_set):
        (partial / d).mkdir(parents=True, exist_ok=True)
        os.chmod(partial / d, 0o755)
    os.chmod(partial, 0o755)

    tasks: list[tuple[str, int, str, bool, list[FileSpec]]] = []
    for spec in plan.large + plan.text:
        tasks.append((str(partial), seed, spec.path, True, [spec]))
    batch = 1000
    for i in range(0, len(plan.small), batch):
        tasks.append((str(partial), seed, f"{batch_key}-{i}", False, plan.small[i : i + batch]))
    tasks.sort(key=lambda t: -sum(s.size for s in t[4]))  # biggest first, for load balance
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        for task in tasks:
            _task(task)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for _ in pool.map(_task, tasks, chunksize=1):
                pass
    for link, target in plan.symlinks:
        os.symlink(target, partial / link)

    def _bytes(specs: list[FileSpec]) -> int:
        return sum(s.size for s in specs)

    info: dict[str, Any] = {
        "generator": "benchmarks/gen_dataset.py",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "files": len(all_files) + 1,
        "bytes": _bytes(all_files),
        "dirs": len(
            {str(Path(f.path).parent) for f in all_files} | set(plan.dirs) | set(plan.empty_dirs)
        )
        + 1,
        "empty_dirs": len(plan.empty_dirs),
        "symlinks": len(plan.symlinks),
        "text": {"files": len(plan.text), "bytes": _bytes(plan.text)},
        "large_incompressible": {"files": len(plan.large), "bytes": _bytes(plan.large)},
        "small": {
            "files": len(plan.small),
            "bytes": _bytes(plan.small),
            "incompressible_bytes": sum(s.size for s in plan.small if s.gen is None),
        },
    }
    if kind == "small":  # the mixed tree's info stays as it always was (it is part of the tree)
        info["kind"] = "small"
        all_dirs = (dir_set | {"."}) - {""}
        info["dirs"] = len(all_dirs)
        info["empty_dirs"] = _count_empty_dirs(partial)
        info["max_files_in_a_dir"] = max(
            collections.Counter(str(Path(f.path).parent) for f in all_files).values()
        )
        info["max_depth"] = max(d.count("/") + 1 for d in all_dirs if d != ".")
    info_text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    info["bytes"] += len(info_text.encode())  # the info file counts too (it says so about itself)
    info_text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    (partial / INFO_NAME).write_text(info_text)
    os.chmod(partial / INFO_NAME, 0o644)
    _set_times(
        partial, plan, SMALL_TREE_MTIME_KEY if kind == "small" else "cloudbackup-bench-mtimes"
    )
    os.rename(partial, dest)
    info["seconds"] = round(time.perf_counter() - started, 2)
    if not quiet:
        print(summary_line(dest, info))
    return info


def _count_empty_dirs(root: Path) -> int:
    return sum(1 for _, dirnames, filenames in os.walk(root) if not dirnames and not filenames)


def kind_of(info: dict[str, Any] | None) -> str:
    """The kind recorded in a dataset's info (the mixed tree's info has no ``kind`` key)."""
    return str((info or {}).get("kind", "mixed"))


def read_info(dest: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(dest) / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def summary_line(dest: str | os.PathLike[str], info: dict[str, Any]) -> str:
    parts = [
        f"{dest}: {info['files']:,} files, {info['bytes']:,} bytes ({format_size(info['bytes'])}), "
        f"{info['dirs']:,} dirs ({info['empty_dirs']} empty), {info['symlinks']} symlinks",
    ]
    if kind_of(info) == "small":
        parts.append(
            f"  small-file tree: {info['small']['files']:,} files, "
            f"{format_size(info['small']['bytes'])} (of which "
            f"{format_size(info['small']['incompressible_bytes'])} random), up to "
            f"{info['max_depth']} levels deep, at most {info['max_files_in_a_dir']:,} files in a directory"
        )
    else:
        parts += [
            f"  text: {info['text']['files']} files, {format_size(info['text']['bytes'])}",
            f"  large incompressible: {info['large_incompressible']['files']} files, "
            f"{format_size(info['large_incompressible']['bytes'])}",
            f"  small (0.5-16 KiB): {info['small']['files']:,} files, {format_size(info['small']['bytes'])} "
            f"(of which {format_size(info['small']['incompressible_bytes'])} random)",
        ]
    if "seconds" in info:
        parts.append(f"  generated in {info['seconds']:.1f} s")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dest",
        nargs="?",
        help="directory to create (default /tmp/cb-bench/ds-<size>, or ds-small for --kind small)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="mixed",
        help="mixed: text, large incompressible and small files (default); "
        "small: the small-file tree",
    )
    parser.add_argument(
        "--size",
        default=None,
        type=parse_size,
        help="total file bytes, e.g. 1GiB, 256MiB, 0.25GiB, 790MB "
        "(default 1GiB; for --kind small 3,950 bytes per file)",
    )
    parser.add_argument(
        "--files",
        type=int,
        default=None,
        help=f"number of files of --kind small (default {SMALL_TREE_FILES:,})",
    )
    parser.add_argument("--seed", default=1, type=int)
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: CPU count)"
    )
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    args = parser.parse_args(argv)
    if args.files is not None and args.kind != "small":
        parser.error("--files applies to --kind small only")
    dest = args.dest or default_path(args.kind, args.size, args.seed, args.files)
    try:
        generate(
            dest,
            args.size,
            args.seed,
            jobs=args.jobs,
            force=args.force,
            kind=args.kind,
            files=args.files,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"gen_dataset: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
