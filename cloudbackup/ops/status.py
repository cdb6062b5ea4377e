"""``status``: freshness per host/source with monitoring-plugin codes (not outcomes: OK,
WARNING, CRITICAL, UNKNOWN), Prometheus textfile metrics, the last-run state file, and
healthchecks-style pings."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cloudbackup.config import shown
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, ConfigError
from cloudbackup.core.model import format_time, parse_time
from cloudbackup.fs.dirs import Dir

LOG = logging.getLogger("cloudbackup")

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
PINNED_WARN_THRESHOLD = 3
STATE_DIR = ".state"
LAST_RUN = "last-run.json"


# ---------------------------------------------------------------- last-run state


def last_run_path(local_dir: Path, host: str) -> Path:
    return local_dir / STATE_DIR / f"{host}.{LAST_RUN}"


def write_last_run(ctx: Context, document: dict[str, Any]) -> None:
    """Replace the state file atomically, never through a link planted in the local dir
    (one that is in the way is reported, and the run's outcome stands)."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    try:
        ctx.local.put_bytes(f"{STATE_DIR}/{ctx.host}.{LAST_RUN}", data, replace=True)
    except OSError as exc:
        LOG.warning(
            "cannot write the state file %s: %s (`status` will not see this run)",
            last_run_path(ctx.settings.local_dir, ctx.host),
            exc.strerror or exc,
        )


def read_last_run(local_dir: Path, host: str) -> dict[str, Any] | None:
    try:
        data = json.loads(last_run_path(local_dir, host).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- status


@dataclass
class SourceStatus:
    host: str
    source: str
    newest: str | None = None
    newest_at: datetime | None = None
    age_seconds: float | None = None
    local_count: int = 0
    remote_count: int = 0
    local_bytes: int = 0
    remote_bytes: int = 0
    newest_offsite: bool = False
    pinned_local: int = 0
    state: int = OK
    reasons: list[str] = field(default_factory=list)
    newest_size: int | None = None
    #: "full" or "incr": what the newest backup is (its name says).
    newest_level: str | None = None
    #: Backups dated after ``now``: they take no part in freshness (SPEC "Clock").
    future_dated: list[str] = field(default_factory=list)

    def worsen(self, state: int, reason: str) -> None:
        self.state = max(self.state, state)
        self.reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "newest": self.newest,
            "newest_at": format_time(self.newest_at) if self.newest_at else None,
            "age_seconds": None if self.age_seconds is None else int(self.age_seconds),
            "local_count": self.local_count,
            "remote_count": self.remote_count,
            "bytes": self.local_bytes + self.remote_bytes,
            "local_bytes": self.local_bytes,
            "remote_bytes": self.remote_bytes,
            "offsite": self.newest_offsite,
            "newest_level": self.newest_level,
            "state": STATE_NAMES[self.state],
            "reasons": self.reasons,
            "future_dated": sorted(self.future_dated),
        }


@dataclass
class StatusReport:
    hosts: dict[str, list[SourceStatus]]
    state: int
    detail: list[str] = field(default_factory=list)
    last_run: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hosts": [
                {"host": host, "sources": [s.to_dict() for s in sources]}
                for host, sources in sorted(self.hosts.items())
            ],
            "state": STATE_NAMES[self.state],
            "detail": self.detail,
        }


# Long: every source's state, rule by rule, in the order SPEC "status" gives them.
def status(ctx: Context, *, max_age: timedelta, all_hosts: bool = False) -> StatusReport:
    """Freshness of every source configured or found, for this host (or every host)."""
    settings = ctx.settings
    now = ctx.now()
    detail: list[str] = []
    remote_listing = None
    overall = OK
    if ctx.remote is not None:
        try:
            remote_listing = ctx.remote_catalog.listing(all_hosts=all_hosts)
        except CloudBackupError as exc:
            detail.append(f"cannot list the bucket: {exc}")
            overall = UNKNOWN
    local_listing = ctx.local_catalog.listing()
    statuses: dict[tuple[str, str], SourceStatus] = {}

    def entry(host: str, source: str) -> SourceStatus:
        key = (host, source)
        if key not in statuses:
            statuses[key] = SourceStatus(host=host, source=source)
        return statuses[key]

    for spec in settings.sources:
        entry(ctx.host, spec.name)
    wanted = None if all_hosts else ctx.host
    for ref in local_listing.refs:
        if wanted and ref.host != wanted:
            continue
        st = entry(ref.host, ref.source)
        st.local_count += 1
        st.local_bytes += ref.archive_size or 0
        verified = ctx.local_catalog.verified_offsite(ref)
        if settings.remote_configured and not verified:
            st.pinned_local += 1
        _consider(st, ref.id, ref.created_at, ref.archive_size, offsite=verified, now=now)
        if st.newest == ref.id:
            st.newest_level = ref.level_name
    if remote_listing is not None:
        for ref in remote_listing.refs:
            if wanted and ref.host != wanted:
                continue
            st = entry(ref.host, ref.source)
            st.remote_count += 1
            st.remote_bytes += ref.archive_size or 0
            _consider(st, ref.id, ref.created_at, ref.archive_size, offsite=True, now=now)
            if st.newest == ref.id:
                st.newest_level = ref.level_name

    last_run = read_last_run(settings.local_dir, ctx.host)
    run_sources = {r.get("source"): r for r in (last_run or {}).get("results", [])}
    stopped = (last_run or {}).get("interrupted")
    if stopped:
        detail.append(
            f"interrupted: the last run was stopped by {stopped} at "
            f"{(last_run or {}).get('finished_at')}"
        )
    for (host, _source), st in sorted(statuses.items()):
        if st.newest_at is None:
            st.worsen(CRITICAL, "no backup at or before now" if st.future_dated else "no backup")
        else:
            st.age_seconds = (now - st.newest_at).total_seconds()
            if st.age_seconds > max_age.total_seconds():
                st.worsen(CRITICAL, f"newest backup is older than {_fmt(max_age)}")
        if st.future_dated:
            st.future_dated.sort()
            st.worsen(WARNING, _future_reason(st.future_dated, now))
        if settings.remote_configured and st.newest_at is not None and not st.newest_offsite:
            st.worsen(WARNING, "newest backup is not offsite yet")
        if st.pinned_local > PINNED_WARN_THRESHOLD:
            st.worsen(WARNING, f"{st.pinned_local} local copies are not offsite")
        if host == ctx.host:
            _judge_last_run(st, run_sources.get(st.source), stopped)
        overall = max(overall, st.state)
    hosts: dict[str, list[SourceStatus]] = {}
    for (host, _source), st in sorted(statuses.items()):
        hosts.setdefault(host, []).append(st)
    if not hosts:
        hosts[ctx.host] = []
        detail.append("no sources configured and no backups found")
        overall = max(overall, CRITICAL)
    return StatusReport(hosts=hosts, state=overall, detail=detail, last_run=last_run)


def _judge_last_run(st: SourceStatus, result: dict[str, Any] | None, stopped: str | None) -> None:
    """WARNING for what the last run of this host said about the source, or for a last run
    stopped by a signal (``stopped``: its name)."""
    if stopped:
        st.worsen(WARNING, f"interrupted: the last run was stopped by {stopped}")
    if result is None:
        return
    if result.get("shrink_stopped"):
        st.worsen(WARNING, "stopped by the shrink guard in the last run")
    elif result.get("ok") and result.get("exit_code", 0) == 1:
        st.worsen(WARNING, "last run completed with warnings")
    elif not result.get("ok"):
        st.worsen(WARNING, f"failed in the last run: {result.get('error') or 'see the log'}")


def _future_reason(ids: list[str], now: datetime) -> str:
    """Names the backups dated after ``now`` and the way out (they block the next backup)."""
    shown_ids = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return (
        f"{len(ids)} backup(s) dated in the future (after {format_time(now)}): {shown_ids}; "
        f"if the clock was wrong when they were made: cloudbackup forget {ids[0]} --where all"
    )


def _consider(
    st: SourceStatus,
    backup_id: str,
    created: datetime,
    size: int | None,
    *,
    offsite: bool,
    now: datetime,
) -> None:
    """Count one copy of a backup towards freshness, unless it is dated after ``now``."""
    if created > now:
        if backup_id not in st.future_dated:
            st.future_dated.append(backup_id)
        return
    if (
        st.newest_at is None
        or created > st.newest_at
        or (created == st.newest_at and backup_id > (st.newest or ""))
    ):
        st.newest, st.newest_at, st.newest_size = backup_id, created, size
        st.newest_offsite = offsite
    elif backup_id == st.newest and offsite:
        st.newest_offsite = True


def _fmt(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ---------------------------------------------------------------- Prometheus


def prometheus_text(report: StatusReport) -> str:
    """node_exporter textfile metrics with # HELP / # TYPE lines."""
    lines: list[str] = []

    def family(
        name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            text = _number(value)
            lines.append(f"{name}{{{rendered}}} {text}" if rendered else f"{name} {text}")

    rows = [(h, s) for h, sources in sorted(report.hosts.items()) for s in sources]
    family(
        "cloudbackup_last_success_timestamp_seconds",
        "gauge",
        "Creation time of the newest complete backup at or before now (Unix seconds).",
        [
            ({"host": h, "source": s.source}, s.newest_at.timestamp())
            for h, s in rows
            if s.newest_at
        ],
    )
    family(
        "cloudbackup_backup_size_bytes",
        "gauge",
        "Archive size of the newest backup in bytes.",
        [
            ({"host": h, "source": s.source}, float(s.newest_size or 0))
            for h, s in rows
            if s.newest_at
        ],
    )
    samples: list[tuple[dict[str, str], float]] = []
    for h, s in rows:
        samples.append(({"host": h, "source": s.source, "where": "local"}, float(s.local_count)))
        samples.append(({"host": h, "source": s.source, "where": "remote"}, float(s.remote_count)))
    family("cloudbackup_backups", "gauge", "Number of complete backups kept.", samples)
    family(
        "cloudbackup_future_dated_backups",
        "gauge",
        "Backups dated after now (a clock that was ahead); they do not count as fresh.",
        [({"host": h, "source": s.source}, float(len(s.future_dated))) for h, s in rows],
    )
    family(
        "cloudbackup_source_state",
        "gauge",
        "Monitoring state per source: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        [({"host": h, "source": s.source}, float(s.state)) for h, s in rows],
    )
    last = report.last_run or {}
    run_samples: list[tuple[dict[str, str], float]] = []
    if "exit_code" in last:
        run_samples.append(({}, float(last["exit_code"])))
    family(
        "cloudbackup_last_run_status",
        "gauge",
        "Exit code of the last `cloudbackup run` (0 success, 1 partial, 2 config, 3 integrity, 4 locked).",
        run_samples,
    )
    if last.get("finished_at"):
        family(
            "cloudbackup_last_run_timestamp_seconds",
            "gauge",
            "When the last `cloudbackup run` finished (Unix seconds).",
            [({}, parse_time(last["finished_at"]).timestamp())],
        )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Exact: ``{:g}`` keeps 6 digits, turning a Unix time or a byte count into 1.79523e+09."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_prometheus(path: Path, text: str) -> None:
    """Replace the file atomically so node_exporter never reads half of it (a temp file
    with a random name, never opened through a link, then renamed over the old one)."""
    with Dir.root(path.parent, create=True) as directory:
        directory.write_atomic(path.name, text.encode(), mode=0o644, replace=True)


# ---------------------------------------------------------------- pings


def ping(
    url: str | None, suffix: str = "", *, body: str | None = None, timeout: float = 5.0
) -> bool:
    """healthchecks.io convention: ``/start``, success, ``/fail``. Never raises.

    Credentials in the URL (``https://user:password@host/...``) are sent as HTTP basic
    auth (not on a redirect), never as part of the host name (urllib would hand
    ``user:password@host`` to the resolver); messages show the URL as :func:`ping_shown`.
    """
    if not url:
        return False
    base, mark, query = url.partition("?")  # the suffix goes into the path, not the query
    target = base.rstrip("/") + suffix + mark + query
    plain, userinfo = _split_userinfo(target)
    data = body.encode("utf-8", errors="replace")[:100_000] if body is not None else None
    try:
        # Built inside the try: a malformed URL (``http://[::1``) raises ValueError here.
        request = urllib.request.Request(
            plain, data=data, method="POST" if data is not None else "GET"
        )
        request.add_header("User-Agent", "cloudbackup")
        if userinfo is not None:
            user, _, password = userinfo.partition(":")
            token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
            request.add_unredirected_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
        return True
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        LOG.warning(
            "ping %s failed: %s (the backup itself is not affected)", ping_shown(target), exc
        )
        return False


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """``(url without its userinfo, the userinfo or None)``. The authority ends where
    urlsplit ends it (the first ``/``, ``?`` or ``#`` after ``//``) and the userinfo at its
    last ``@``, so a URL that does not parse is split the same way (nothing leaks)."""
    head, slashes, rest = url.partition("//")
    if not slashes:
        return url, None
    ends = [i for i in (rest.find(char) for char in "/?#") if i >= 0]
    end = min(ends) if ends else len(rest)
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at:
        return url, None
    return head + slashes + hostport + rest[end:], userinfo


def ping_shown(url: str) -> str:
    """The ping URL as messages show it: no query (it may hold a token), userinfo as ``***``."""
    plain, userinfo = _split_userinfo(url.split("?", 1)[0])
    if userinfo is None:
        return plain
    head, slashes, rest = plain.partition("//")
    return f"{head}{slashes}***@{rest}"


def ping_secrets(url: str | None) -> list[str]:
    """The ping URL's password (its user name when it has none), as written and decoded,
    for the log filter."""
    if not url:
        return []
    _plain, userinfo = _split_userinfo(url)
    if not userinfo:
        return []
    user, colon, password = userinfo.partition(":")
    secret = password if colon else user
    forms = {secret, unquote(secret), quote(unquote(secret), safe="")}
    return sorted(form for form in forms if form)


#: ``status --max-age`` bounds: 0 would make every source CRITICAL, centuries none ever.
MIN_MAX_AGE = timedelta(minutes=1)
MAX_MAX_AGE = timedelta(days=3650)


def parse_max_age(text: str) -> timedelta:
    """``--max-age``: a duration between 1 minute and 10 years; ConfigError otherwise."""
    from cloudbackup.core.retention import parse_duration

    clean = text.strip()
    if len(clean) > 20:  # int() refuses over 4,300 digits with a ValueError of its own
        raise ConfigError(f"--max-age {shown(text)} is far too long", _MAX_AGE_HINT)
    try:
        age = parse_duration(clean)
    except ConfigError as exc:
        raise ConfigError(f"--max-age: {exc.message}", exc.hint) from None
    if not MIN_MAX_AGE <= age <= MAX_MAX_AGE:
        raise ConfigError(f"--max-age {shown(text)} is out of range", _MAX_AGE_HINT)
    return age


_MAX_AGE_HINT = "give a duration between 1m and 3650d, e.g. 26h or 8d"
