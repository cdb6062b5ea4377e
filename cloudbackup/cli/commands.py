"""The command line: Click commands over the use cases (``ops``, ``restore``), each one
parsing its options, calling its use case and handing the result to ``output``; ``main`` maps
errors to messages and exit codes (``core.outcome``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from dotenv import dotenv_values

from cloudbackup import __version__, config
from cloudbackup import context as contexts
from cloudbackup.cli import options, output
from cloudbackup.cli.output import Progress, ProgressLine, setup_logging
from cloudbackup.config import Settings
from cloudbackup.core.errors import CloudBackupError, ConfigError, Interrupted, UsageError
from cloudbackup.core.model import valid_name
from cloudbackup.core.outcome import REPORTED, Outcome, exit_code
from cloudbackup.core.words import one_line
from cloudbackup.lock import DirLock
from cloudbackup.ops.status import ping_secrets
from cloudbackup.sources.base import url_secrets
from cloudbackup.storage.base import RemoteStore
from cloudbackup.storage.local import LocalStore

if TYPE_CHECKING:  # imported where used: a command loads only what it runs (start-up time)
    from cloudbackup.ops import backup as backing
    from cloudbackup.ops import verify as verifying

_NO_REMOTE = "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST for a directory destination)"

LOG = logging.getLogger("cloudbackup")


@dataclass
class AppState:
    env_file: Path | None = None
    verbose: bool = False
    quiet: bool = False
    log_json: bool = False
    settings: Settings | None = None
    redact: list[str] = field(default_factory=list)
    #: What the settings were read from, read once per command (:func:`load_settings`).
    environ: Mapping[str, str] = field(default_factory=dict)
    dotenv: Mapping[str, str | None] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


def read_env_file(path: Path, label: str) -> dict[str, str | None]:
    """The variables of a .env file. Anything but a readable UTF-8 text file without NUL
    bytes is a ConfigError (exit 2) naming ``label``; never a traceback."""
    return dict(dotenv_values(stream=io.StringIO(config.read_text_file(path, label))))


def _dotenv(state: AppState) -> tuple[Path | None, dict[str, str | None]]:
    """``--env-file``, else a ``.env`` file in the current directory (a directory named
    ``.env``, such as a virtualenv, is not one), else nothing."""
    if state.env_file is not None:
        return state.env_file, read_env_file(state.env_file, f"--env-file {state.env_file}")
    try:
        regular = stat.S_ISREG(os.stat(".env").st_mode)
    except OSError:
        regular = False
    if not regular:
        return None, {}
    env_file = Path(".env").absolute()
    return env_file, read_env_file(env_file, f".env in the current directory ({env_file})")


def _home() -> Path | None:
    try:
        return Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def load_settings(
    state: AppState,
    *,
    as_json: bool = False,
    secrets: Sequence[str] = (),
    sources: Sequence[str] | None = None,
    **given: Any,
) -> Settings:
    """Resolve settings once per command: CLI (``given``, by settings field) > environment >
    .env > default. The process environment and the .env file are read here, once: below
    the CLI nothing reads ``os.environ``. ``as_json``: the result goes to stdout as JSON,
    not as a report for people (the log then keeps every event on stderr)."""
    from cloudbackup.ops.notify import target_secrets

    state.environ = dict(os.environ)
    env_file, state.dotenv = _dotenv(state)
    settings = config.load(
        config.command_line(sources=sources, **given),
        state.environ,
        state.dotenv,
        hostname=socket.gethostname(),
        home=_home(),
        env_file=env_file,
    )
    secrets = [
        *secrets,
        *(s for spec in settings.sources for s in spec.secrets),
        *ping_secrets(settings.ping_url),
        *target_secrets(settings.notify),
    ]
    _logging(state, as_json=as_json, settings=settings, secrets=secrets)
    for warning in settings.warnings:
        LOG.warning("%s", warning)
    state.settings = settings
    return settings


def _logging(
    state: AppState,
    *,
    as_json: bool = False,
    settings: Settings | None = None,
    secrets: Sequence[str] = (),
) -> None:
    setup_logging(
        level=settings.log_level if settings else "INFO",
        verbose=state.verbose,
        quiet=state.quiet,
        log_file=settings.log_file if settings else None,
        secrets=secrets,
        log_json=state.log_json,
        human_report=not as_json,
        environ=os.environ,
    )


def make_context(
    settings: Settings, *, remote: bool = True, need_local: bool = True
) -> contexts.Context:
    """The context of one command. ``need_local``: the command writes to the local dir (a
    machine id is then made if there is none); otherwise nothing is created there."""
    if need_local:
        machine: str | None = contexts.machine_id(settings.local_dir)
    else:
        machine = contexts.read_machine_id(settings.local_dir)
    return contexts.Context(
        settings=settings,
        local=LocalStore(settings.local_dir),
        now=_now,
        machine_id=machine,
        remote=make_remote(settings) if remote else None,
        progress=_progress_factory(),
    )


def make_remote(
    settings: Settings, *, sleep: Callable[[float], None] = time.sleep
) -> RemoteStore | None:
    """The offsite store the settings name (a directory destination or a bucket), each
    given the retry policy; None when there is none."""
    from cloudbackup.storage.retry import RetryPolicy

    policy = RetryPolicy(attempts=settings.retry_attempts, sleep=sleep)
    if settings.dest is not None:
        from cloudbackup.storage.directory import DirectoryStore

        return DirectoryStore(
            settings.dest,
            policy=policy,
            concurrency=settings.s3_concurrency,
            part_size=settings.s3_part_size,
        )
    if settings.s3_bucket is not None:
        from cloudbackup.storage.s3 import S3Store

        return S3Store.from_settings(settings, policy)
    return None


def _progress_factory() -> Callable[[str, int | None], Callable[[int], None]]:
    """Bars on a terminal (one line for all of them), never with ``-q``; else a log line
    every 10 s."""
    tty = sys.stderr.isatty() and not _state().quiet
    line = ProgressLine(sys.stderr) if tty else None

    def factory(label: str, total: int | None) -> Callable[[int], None]:
        return Progress(label, total, tty=tty, line=line)

    return factory


def _remote_url(settings: Settings) -> Callable[[str], str]:
    """How output names a key of the offsite destination."""
    dest, bucket = settings.dest, settings.s3_bucket
    if dest is not None:
        return lambda key: (dest / key).as_uri()
    return lambda key: f"s3://{bucket}/{key}"


def _state() -> AppState:
    return click.get_current_context().find_object(AppState) or AppState()


def _exit(code: int) -> NoReturn:
    raise SystemExit(code)


def _finish(as_json: bool, document: Any, text: Callable[[], str], code: int) -> NoReturn:
    """Show the result and exit with ``code``: a human report is left out when ``-q`` and
    the command succeeded (SPEC "Operations": a quiet good night prints nothing); JSON, which
    a program asked for, always goes out."""
    if as_json or code != 0 or not _state().quiet:
        output.show(as_json, document, text)
    _exit(code)


def _remote_needs_bucket(settings: Settings, where: str) -> None:
    """``--where remote`` without a bucket is a usage error (exit 2)."""
    if where == "remote" and not settings.remote_configured:
        raise UsageError("--where remote needs a bucket", _NO_REMOTE)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Read settings from this .env file.",
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Debug output: decisions, timings per phase, tracebacks."
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Nothing at all when the command succeeds; else its summary and errors.",
)
@click.option(
    "--log-json", is_flag=True, help="Log one JSON object per line (for log shippers)."
)
@click.version_option(__version__, prog_name="cloudbackup")
@click.pass_context
def cli(
    ctx: click.Context, env_files: tuple[Path, ...], verbose: bool, quiet: bool, log_json: bool
) -> None:
    """Compressed, checksummed backups of directories and databases, pushed to S3 and
    pruned by one retention planner."""
    state = AppState(verbose=verbose, quiet=quiet, log_json=log_json)
    _logging(state)
    if len(env_files) > 1:
        # Silently using the last one would hide the others' settings.
        raise UsageError(
            "--env-file is given more than once (" + ", ".join(map(str, env_files)) + ")",
            "give one .env file",
        )
    state.env_file = env_files[0] if env_files else None
    ctx.obj = state


# ---------------------------------------------------------------- backup


BACKUP_HELP = """Archive each source, then upload it.

SPEC is the name of a configured source (CLOUDBACKUP_SOURCES) or a source spec: a
directory, NAME=glob, sqlite:///file, postgresql://..., NAME=cmd:command. Without SPEC
(and without --source), every configured source.

\b
Examples:
  cloudbackup backup                          every configured source
  cloudbackup backup www                      the configured source named www
  cloudbackup backup --source www --source db two configured sources
  cloudbackup backup /srv/www                 a directory (source name: www)
  cloudbackup backup conf='/etc/app/**/*.yaml' sqlite:///var/lib/app/app.db
  cloudbackup backup --no-upload --dry-run    what would be archived, nothing written
"""


@cli.command(help=BACKUP_HELP)
@click.argument("specs", nargs=-1, metavar="[SPEC]...")
@options.sources
@click.option("--no-upload", is_flag=True, help="Archive locally only; upload later with `upload`.")
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PAT",
    help="Exclude glob (adds to CLOUDBACKUP_EXCLUDE).",
)
@click.option("--compression", type=click.Choice(config.COMPRESSIONS), help="Compression codec.")
@options.allow_shrink
@options.full
@options.dry_run
@options.as_json
def backup(
    specs: tuple[str, ...],
    sources: tuple[str, ...],
    no_upload: bool,
    excludes: tuple[str, ...],
    compression: str | None,
    allow_shrink: bool,
    full: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    state = _state()
    named, adhoc = _configured_or_specs(state, specs, sources)
    settings = load_settings(
        state, as_json=as_json, sources=adhoc, extra_exclude=excludes, compression=compression
    )
    if named is not None:
        settings = settings.only(named)
    if not settings.sources:
        raise UsageError(
            "no sources to back up",
            "give SPEC arguments or set CLOUDBACKUP_SOURCES (e.g. /srv/www)",
        )
    local_only = not settings.remote_configured
    if local_only and not no_upload:
        LOG.info(
            "no bucket configured (CLOUDBACKUP_S3_BUCKET or CLOUDBACKUP_DEST): local-only backup"
        )
    from cloudbackup.ops import backup as backing

    ctx = make_context(settings, remote=not local_only and not dry_run)
    chosen = backing.BackupOptions(dry_run=dry_run, allow_shrink=allow_shrink, full=full)
    results, stopped = _back_up(ctx, chosen, upload=not no_upload and not local_only)
    document = {"results": [r.to_dict() for r in results], "dry_run": dry_run}
    stop = [] if stopped is None else [
        f"backup interrupted by {stopped.signal_name} (exit {stopped.exit_code})"
    ]

    def text() -> str:
        summary = output.backup_summary(
            results, local_only=local_only, dry_run=dry_run, remote_url=_remote_url(settings)
        )
        return "\n".join([summary, *stop])

    _finish(
        as_json,
        document | {"local_only": local_only, "interrupted": stopped is not None},
        text,
        stopped.exit_code if stopped else exit_code(r.outcome for r in results),
    )


def _configured_or_specs(
    state: AppState, specs: Sequence[str], sources: Sequence[str]
) -> tuple[list[str] | None, list[str] | None]:
    """``backup NAME`` is the configured source of that name, a path or spec otherwise
    (SPEC "Operations"); ``--source NAME`` only ever a configured source.

    Returns (configured names to keep, or None for all of them; specs given on the command
    line instead of the configured ones, or None). A configured source named alongside an
    ad-hoc spec is passed on as its configured spec, so both go through one list."""
    if not specs:
        return (list(sources) if sources else None), None
    configured = _configured_specs(state) if any(valid_name(s) for s in specs) else {}
    if all(spec in configured for spec in specs):
        return [*sources, *specs], None
    if sources:
        raise UsageError(
            "--source names configured sources; it cannot be mixed with specs "
            + ", ".join(repr(s) for s in specs if s not in configured),
            "give either source names or specs",
        )
    return None, [configured[s] if s in configured else s for s in specs]


def _configured_specs(state: AppState) -> dict[str, str]:
    """The configured sources (CLOUDBACKUP_SOURCES) by name, as specs; none when the
    variable is unset or does not parse (the spec is then read as a path)."""
    env_file = _dotenv(state)[1]
    found = config.resolve_one("sources", {}, os.environ, env_file) or ()
    return {spec.name: f"{spec.name}={spec.spec}" for spec in found}


def _back_up(
    ctx: contexts.Context, chosen: backing.BackupOptions, *, upload: bool
) -> tuple[list[backing.SourceResult], Interrupted | None]:
    """Every source under the lock, uploaded (streamed while archived) when ``upload``; and
    the signal that stopped it part way, if one did (the results then say what finished)."""
    from cloudbackup.ops import backup as backing
    from cloudbackup.ops import upload as uploading

    results: list[backing.SourceResult] = []
    with DirLock(ctx.settings.local_dir):
        try:
            backing.backup(
                ctx,
                ctx.settings.sources,
                chosen,
                uploader=uploading.upload_after_backup if upload else None,
                streamer=uploading.start_stream if upload else None,
                results=results,
            )
        except (KeyboardInterrupt, Interrupted) as exc:
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            message = f"interrupted by {stopped.signal_name}: the backup stopped where it was"
            LOG.error("%s", message, extra=REPORTED)
            return results, stopped
    return results, None


# ---------------------------------------------------------------- list / verify / upload


@cli.command(name="list")
@options.only_source
@options.where("all")
@options.backups_of_host
@options.all_hosts
@options.as_json
def list_cmd(
    source: str | None, where: str, host: str | None, all_hosts: bool, as_json: bool
) -> None:
    """Backups with id, time, size, where they are and whether the offsite copy is verified."""
    from cloudbackup.ops import list as listing

    settings = load_settings(_state(), as_json=as_json, host=host)
    _remote_needs_bucket(settings, where)
    ctx = make_context(settings, remote=where != "local", need_local=False)
    backups = listing.list_backups(ctx, where=where, source=source, all_hosts=all_hosts)
    document: dict[str, Any] = {"backups": [b.to_dict() for b in backups]}
    others: list[str] = []
    if not backups and where != "local" and not all_hosts:
        others = [h for h in listing.hosts_with_backups(ctx) if h != settings.host]
        document["hosts_with_backups"] = others
    text = lambda: output.backup_list(backups, host=settings.host, other_hosts=others)  # noqa: E731
    output.show(as_json, document, text)


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@options.only_source
@options.backups_of_host
@options.where("local")
@click.option(
    "--deep", is_flag=True, help="Also decompress and walk the archive (remote: stream it)."
)
@options.as_json
def verify(
    ids: tuple[str, ...],
    source: str | None,
    host: str | None,
    where: str,
    deep: bool,
    as_json: bool,
) -> None:
    """Local: re-hash archives against manifests. Remote: compare S3's checksum, size and
    metadata with the manifest without downloading (--deep streams and re-hashes)."""
    settings = load_settings(_state(), as_json=as_json, host=host)
    _remote_needs_bucket(settings, where)
    where = where if settings.remote_configured else "local"
    ctx = make_context(settings, remote=where != "local", need_local=False)
    results = _verify(ctx, ids, source, where, deep)
    document = {"results": [r.to_dict() for r in results]}
    _finish(
        as_json, document, lambda: output.verify_lines(results), exit_code(r.outcome for r in results)
    )


def _verify(
    ctx: contexts.Context, ids: Sequence[str], source: str | None, where: str, deep: bool
) -> list[verifying.VerifyResult]:
    """The copies ``ids`` (or all of this host's, or ``source``'s) in ``where``, verified;
    an id found nowhere is a usage error (exit 2)."""
    from cloudbackup.ops import verify as verifying

    results = []
    host = ctx.settings.host
    local = remote = []
    if where in ("local", "all"):
        local = verifying.select_refs(ctx.local_catalog.listing().refs, ids, source, host)
    if where in ("remote", "all"):
        remote = verifying.select_refs(ctx.remote_catalog.listing().refs, ids, source, host)
    if deep:
        verifying.require_identity(ctx, [*local, *remote])  # exit 2 before any is read
    results += [verifying.verify_local_ref(ctx, ref, deep=deep) for ref in local]
    results += [verifying.verify_remote_ref(ctx, ref, deep=deep) for ref in remote]
    found = {r.id for r in results}
    for missing in ids:
        if missing not in found:
            raise UsageError(f"no backup {missing!r} found ({where})", "see `cloudbackup list`")
    return results


@cli.command()
@options.only_source
@options.act_as_host
@options.as_json
def upload(source: str | None, host: str | None, as_json: bool) -> None:
    """Push every complete local backup not yet verified remotely; resumes interrupted uploads."""
    from cloudbackup.ops import upload as uploading

    settings = load_settings(_state(), as_json=as_json, host=host)
    if not settings.remote_configured:
        raise UsageError("no bucket configured", _NO_REMOTE)
    ctx = make_context(settings)
    with DirLock(settings.local_dir):
        results = uploading.upload_pending(ctx, source)
    document = {"results": [r.to_dict() for r in results]}
    _finish(
        as_json, document, lambda: output.upload_lines(results), exit_code(r.outcome for r in results)
    )


# ---------------------------------------------------------------- restore


@cli.command()
@click.argument("target_spec", metavar="SOURCE|ID")
@options.backups_of_host
@click.option(
    "--at", "at", metavar="TIME", help="Newest backup at or before TIME (RFC 3339 or a date)."
)
@click.option(
    "--to", "to", metavar="TARGET", help="Directory, SQLite file, postgresql:// URL or - (stdout)."
)
@click.option(
    "--from", "from_", type=click.Choice(["remote", "local"]), help="Where to restore from."
)
@click.option(
    "--include", "includes", multiple=True, metavar="PAT", help="Restore only matching members."
)
@click.option(
    "--force", is_flag=True, help="Replace a non-empty target (the old one is moved aside)."
)
@options.dry_run
@options.as_json
def restore(**kwargs: Any) -> None:
    """Restore the newest backup of SOURCE (or backup ID), verified before anything is written."""
    from cloudbackup.restore import apply as restoring
    from cloudbackup.restore import select as selecting

    to, as_json = kwargs["to"], kwargs["as_json"]
    if to == "-" and as_json:
        raise UsageError("--json cannot be used with --to -", "stdout carries the data alone")
    target_secrets = url_secrets(to) if to and "://" in to else []
    settings = load_settings(
        _state(), as_json=as_json, host=kwargs["host"], secrets=target_secrets
    )
    at = selecting.parse_at(kwargs["at"]) if kwargs["at"] is not None else None
    ctx = make_context(settings, remote=kwargs["from_"] != "local", need_local=False)
    result = restoring.restore(  # no lock: restore only reads the local dir (SPEC)
        ctx,
        kwargs["target_spec"],
        host=settings.host,
        at=at,
        to=to,
        from_=kwargs["from_"],
        includes=kwargs["includes"],
        force=kwargs["force"],
        dry_run=kwargs["dry_run"],
        stdout=sys.stdout.buffer if to == "-" else None,
    )
    if as_json:
        output.print_json(result.to_dict())
    elif result.exit_code != 0 or not _state().quiet:  # with --to -, stdout carries the data alone
        lines = [result.summary(), *(f"  {line}" for line in result.refused)]
        click.echo("\n".join(lines), err=to == "-")
    _exit(result.exit_code)


# ---------------------------------------------------------------- prune / forget


@cli.command()
@options.where("local")
@click.option("--policy", help="Retention policy (default: CLOUDBACKUP_LOCAL/REMOTE_RETENTION).")
@options.only_source
@options.backups_of_host
@options.all_hosts
@options.dry_run
@options.as_json
def prune(
    where: str,
    policy: str | None,
    source: str | None,
    host: str | None,
    all_hosts: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Apply the retention plan: print kept (with reasons), pinned and deleted backups."""
    from cloudbackup.ops import prune as pruning

    chosen = _policy(policy)
    settings = load_settings(_state(), as_json=as_json, host=host)
    pruning.validate(settings, where=where, policy=chosen, host=host, all_hosts=all_hosts)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = pruning.prune(
            ctx, where=where, policy=chosen, source=source, host=host, all_hosts=all_hosts,
            dry_run=dry_run,
        )  # fmt: skip
    document = {"dry_run": dry_run, "results": [r.to_dict() for r in results]}
    document |= {"kept_bytes": sum(r.kept_bytes for r in results)}
    document |= {"freed_bytes": sum(r.freed_bytes for r in results)}
    text = lambda: "\n".join(output.prune_lines(results, dry_run=dry_run))  # noqa: E731
    _finish(as_json, document, text, pruning.exit_code(results))


def _policy(text: str | None) -> Any:
    """``--policy``, parsed (exit 2 naming it when invalid); None when not given."""
    if text is None:
        return None
    try:
        return config.parse_policy(text)
    except config.Invalid as exc:
        raise ConfigError(f"--policy: {exc}", exc.hint) from None


@cli.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@options.where("local")
@options.backups_of_host
@options.dry_run
@options.as_json
def forget(
    ids: tuple[str, ...], where: str, host: str | None, dry_run: bool, as_json: bool
) -> None:
    """Delete the named backups (manifest first); refuses unknown or locked ones."""
    from cloudbackup.ops import forget as forgetting

    settings = load_settings(_state(), as_json=as_json, host=host)
    _remote_needs_bucket(settings, where)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = forgetting.forget(ctx, ids, where=where, dry_run=dry_run)
    document = {"dry_run": dry_run, "results": [r.to_dict() for r in results]}
    text = lambda: "\n".join(output.forget_lines(results, dry_run=dry_run))  # noqa: E731
    _finish(as_json, document, text, forgetting.exit_code(results))


# ---------------------------------------------------------------- run / status / check


RUN_HELP = """The nightly job: recover, back up, upload, verify, prune; one summary.

Around it: CLOUDBACKUP_BEFORE_RUN / AFTER_RUN / ON_FAILURE hooks, healthchecks pings
(CLOUDBACKUP_PING_URL) and notifications (CLOUDBACKUP_NOTIFY). With -q a good night
prints nothing. SIGINT/SIGTERM stop it as `interrupted` (exit 130/143).

\b
Examples:
  cloudbackup --env-file /etc/cloudbackup.env -q run     the nightly cron line
  cloudbackup run --source app-db                        an hourly database job
  cloudbackup run --dry-run                              what it would archive, upload, prune
"""


@cli.command(help=RUN_HELP)
@options.sources
@options.allow_shrink
@options.full
@click.option("--deep", is_flag=True, help="Verify uploads by streaming them back.")
@options.dry_run
@options.act_as_host
@options.as_json
def run(
    sources: tuple[str, ...],
    full: bool,
    allow_shrink: bool,
    deep: bool,
    dry_run: bool,
    host: str | None,
    as_json: bool,
) -> None:
    from cloudbackup.ops import run as nightly

    state = _state()
    chosen = nightly.RunOptions(
        allow_shrink=allow_shrink, deep=deep, full=full, dry_run=dry_run, sources=sources
    )
    report = nightly.nightly(
        lambda: load_settings(state, as_json=as_json, host=host),
        make_context,
        describe=output.run_summary,
        fallback=lambda: _fallback_alerts(state),
        logs=nightly.LogView(tail=_log_tail, redact=_redact),
        options=chosen,
    )
    _finish(as_json, report.to_dict(), lambda: output.run_summary(report), report.exit_code)


def _fallback_alerts(state: AppState) -> Any:
    """Who to tell about a run whose configuration is invalid: every value that can still
    be read on its own (``CLOUDBACKUP_PING_URL``, ``CLOUDBACKUP_NOTIFY``, ...)."""
    from cloudbackup.ops.run import Alerts

    def value(name: str) -> Any:
        return config.resolve_one(name, {}, state.environ, state.dotenv)

    host = value("host") or socket.gethostname()
    return Alerts(host, value("ping_url"), value("notify") or (), value("notify_on") or "failure")


def _log_tail() -> Sequence[str]:
    logs = output.current_logs()
    return logs.tail.lines() if logs else ()


def _redact(text: str) -> str:
    logs = output.current_logs()
    return logs.redactor.redact(text) if logs else text


@cli.command()
@click.option(
    "--max-age",
    default="26h",
    show_default=True,
    metavar="DURATION",
    help="CRITICAL when the newest backup is older: a number and s/m/h/d/w (90m, 26h, 8d), "
    "1m to 3650d.",
)
@options.all_hosts
@options.as_json
@click.option(
    "--prometheus", type=click.Path(path_type=Path), metavar="FILE", help="Write textfile metrics."
)
def status(max_age: str, all_hosts: bool, as_json: bool, prometheus: Path | None) -> None:
    """Per host/source: newest backup, age, counts, local and remote sizes; monitoring
    exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."""
    from cloudbackup.ops import status as monitor

    try:
        age = monitor.parse_max_age(max_age)
        ctx = make_context(load_settings(_state(), as_json=as_json), need_local=False)
        report = monitor.status(ctx, max_age=age, all_hosts=all_hosts)
    except CloudBackupError as exc:
        LOG.error("%s", exc, extra=REPORTED)  # said once: in the report (stderr with --json)
        detail = str(exc)
        document = {"hosts": [], "state": "UNKNOWN", "detail": [detail]}
        _finish(as_json, document, lambda: f"UNKNOWN: {one_line(detail)}", monitor.UNKNOWN)
    if prometheus is not None:
        try:
            monitor.write_prometheus(prometheus, monitor.prometheus_text(report))
        except OSError as exc:
            report.detail.append(f"cannot write {prometheus}: {exc.strerror or exc}")
            report.state = monitor.UNKNOWN
    text = lambda: output.status_table(report, monitor.STATE_NAMES)  # noqa: E731
    _finish(as_json, report.to_dict(), text, report.state)


@cli.command()
@options.as_json
def check(as_json: bool) -> None:
    """Validate configuration, sources, the local dir and bucket access, one line per check."""
    from cloudbackup.ops import check as checking

    settings = load_settings(_state(), as_json=as_json)
    ctx = make_context(settings, need_local=False)
    lines = checking.check(ctx)
    if settings.notify:
        lines.insert(1, _notify_check(settings, checking.CheckLine))
    code = checking.check_exit(lines)
    document = {"checks": [line.to_dict() for line in lines], "ok": code == 0}
    _finish(as_json, document, lambda: output.check_lines(lines), code)


def _notify_check(settings: Settings, line: Any) -> Any:
    """One check line: whether Apprise can use every notification target (as `run` checks
    them at start-up)."""
    from cloudbackup.ops import notify

    try:
        notify.validate(settings.notify)
    except ConfigError as exc:
        return line("notifications", False, str(exc))
    count = len(settings.notify)
    detail = f"{count} target{'' if count == 1 else 's'} accepted by Apprise, on {settings.notify_on}"
    return line("notifications", True, detail)


SCHEDULE_HELP = """Print ready-to-install units that run `cloudbackup run` every day.

KIND is `cron` (a cron.d file) or `systemd` (a service and a timer, each after a
`# /etc/systemd/system/<name>` line), for this installation's absolute paths and
--env-file (default /etc/cloudbackup.env).

\b
Examples:
  cloudbackup schedule cron --at 03:30 > /etc/cron.d/cloudbackup
  cloudbackup schedule systemd | awk '/^# \\/etc\\/systemd\\/system\\//{f=$2} {print > f}'
"""


@cli.command(help=SCHEDULE_HELP)
@click.argument("kind", type=click.Choice(["cron", "systemd"]))
@click.option(
    "--at", "at", default="02:15", show_default=True, metavar="HH:MM",
    help="Time of day (24-hour, this machine's local time).",
)
def schedule(kind: str, at: str) -> None:
    from cloudbackup.ops import schedule as scheduling

    state = _state()
    env_file = str(state.env_file.absolute()) if state.env_file else scheduling.DEFAULT_ENV_FILE
    text = scheduling.render(
        kind,
        at,
        executable=scheduling.find_executable(),
        env_file=env_file,
        write_paths=_write_paths(state),
    )
    click.echo(text, nl=False)


def _write_paths(state: AppState) -> list[str]:
    """What the systemd service may write: the configured local dir, a directory
    destination (CLOUDBACKUP_DEST) and the log file's directory, as far as they can be read
    here (each on its own); else the defaults."""
    from cloudbackup.ops import schedule as scheduling

    dotenv = _dotenv(state)[1]  # an --env-file that cannot be read is exit 2, as anywhere
    local_dir = config.resolve_one("local_dir", {}, os.environ, dotenv)
    dest = config.resolve_one("dest", {}, os.environ, dotenv)
    log_file = config.resolve_one("log_file", {}, os.environ, dotenv)
    paths = [str(local_dir) if local_dir else scheduling.DEFAULT_WRITE_PATHS[0]]
    if dest is not None:
        paths.append(str(dest))
    paths.append(str(log_file.parent) if log_file else scheduling.DEFAULT_WRITE_PATHS[1])
    return paths


@cli.group()
def key() -> None:
    """age keys for encrypted backups."""


@key.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the identity to this new file (mode 0600; never over an existing file).",
)
def generate(out: Path | None) -> None:
    """Make a new age identity and print its recipient (`Public key: age1...`).

    Without --out the identity goes to stdout and the recipient to stderr, as age-keygen
    does. The recipient goes into CLOUDBACKUP_AGE_RECIPIENTS on the hosts that back up; the
    identity stays offline, with whoever restores.
    """
    from cloudbackup.ops.keys import generate_key

    identity, recipient = generate_key(out)
    line = f"Public key: {recipient}"
    if out is None:
        click.echo(identity, nl=False)
        click.echo(line, err=True)
    else:
        click.echo(line)


@cli.group()
def iam() -> None:
    """IAM policy templates for least-privilege roles."""


@iam.command()
@click.option(
    "--role",
    type=click.Choice(["writer", "pruner", "restorer", "bucket-policy"]),
    default="writer",
    show_default=True,
)
@click.option("--bucket", help="Bucket name (default: CLOUDBACKUP_S3_BUCKET).")
@click.option("--prefix", help="Key prefix (default: CLOUDBACKUP_S3_PREFIX).")
@click.option("--host", help="Scope the policy to this host's prefix.")
@click.option(
    "--object-lock", is_flag=True, help="Add s3:PutObjectRetention (CLOUDBACKUP_S3_OBJECT_LOCK)."
)
@click.option("--kms-key-arn", metavar="ARN", help="Add KMS permissions on this key (SSE-KMS).")
@click.option(
    "--require-conditional-writes",
    is_flag=True,
    help="bucket-policy: deny PUTs without If-None-Match.",
)
def render(
    role: str,
    bucket: str | None,
    prefix: str | None,
    host: str | None,
    object_lock: bool,
    kms_key_arn: str | None,
    require_conditional_writes: bool,
) -> None:
    """Print the IAM policy for a role with bucket, prefix and host filled in."""
    from cloudbackup import iam as iam_templates

    if bucket is not None and prefix is not None:
        # Everything the policy needs is on the command line: validate just that, so an
        # unrelated broken variable (say, a retention policy) does not stop an operator
        # writing IAM policies on another machine.
        given = config.command_line(s3_bucket=bucket, s3_prefix=prefix)
        settings = config.load(given, {}, {}, hostname=socket.gethostname(), home=_home())
    else:
        settings = load_settings(_state(), s3_bucket=bucket, s3_prefix=prefix)
    if not settings.s3_bucket:
        raise UsageError("no bucket given", "pass --bucket or set CLOUDBACKUP_S3_BUCKET")
    if role == "bucket-policy":
        text = iam_templates.render_bucket_policy(
            settings.s3_bucket,
            settings.s3_prefix,
            require_conditional_writes=require_conditional_writes,
        )
    else:
        text = iam_templates.render(
            role,
            settings.s3_bucket,
            settings.s3_prefix,
            host,
            object_lock=object_lock,
            kms_key_arn=kms_key_arn,
        )
    click.echo(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one place maps errors to messages and exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    with _signals_stop_the_work():
        code = _main(args)
    output.finish_logging(code)
    sys.exit(code)


def _main(args: list[str]) -> int:
    verbose = any(a in ("-v", "--verbose") for a in args)
    try:
        cli.main(args=args, prog_name="cloudbackup", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (click.exceptions.Abort, KeyboardInterrupt):
        LOG.error("interrupted by SIGINT")
        return exit_code(Outcome.INTERRUPTED)
    except Interrupted as exc:
        LOG.error("interrupted by %s", exc.signal_name)
        return exc.exit_code
    except click.ClickException as exc:
        _show_click_error(exc)
        return exit_code(Outcome.REFUSED) if isinstance(exc, click.UsageError) else exc.exit_code
    except CloudBackupError as exc:
        if verbose:
            LOG.exception("%s", exc)
        else:
            LOG.error("%s", exc)
        return exc.exit_code
    except Exception as exc:  # a bug: say so in one line unless -v
        if verbose:
            LOG.exception("unexpected error")
        else:
            LOG.error("unexpected error: %s: %s (run with -v for details)", type(exc).__name__, exc)
        return 1
    return 0


def _show_click_error(exc: click.ClickException) -> None:
    """Click's own errors (a bad option, a missing argument) in our words: ``error: ...``
    after the usage, as every other error reads."""
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        click.echo(ctx.get_usage(), err=True)
        click.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
    click.echo(f"error: {exc.format_message()}", err=True)


@contextlib.contextmanager
def _signals_stop_the_work() -> Iterator[None]:
    """SIGTERM (systemd stopping the service, a shutdown) and SIGINT (Ctrl-C) raise
    :class:`Interrupted` in the main thread, so the work stops where it is and ``run``
    records it as interrupted (exit 143 / 130). A SIGINT that was ignored when this process
    started (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)
