"""The command line: Click commands over the use cases (``ops``, ``restore``); ``main`` maps
errors to messages and exit codes (``core.outcome``)."""

from __future__ import annotations

import io
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from dotenv import dotenv_values

from cloudbackup import __version__, config
from cloudbackup import context as contexts
from cloudbackup.cli import options
from cloudbackup.cli.output import (
    Progress,
    human_duration,
    human_size,
    print_json,
    setup_logging,
    table,
)
from cloudbackup.config import Settings
from cloudbackup.core.errors import CloudBackupError, ConfigError, UsageError
from cloudbackup.core.outcome import Outcome, exit_code
from cloudbackup.ops import backup as backing
from cloudbackup.ops import list as listing
from cloudbackup.ops import verify as verifying
from cloudbackup.sources.base import url_secrets
from cloudbackup.storage.base import RemoteStore
from cloudbackup.storage.local import LocalStore

_NO_REMOTE = "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST for a directory destination)"

LOG = logging.getLogger("cloudbackup")
#: A .env file larger than this is not one (a wrong path, or a device behind a symlink).
MAX_ENV_FILE = 1024 * 1024


@dataclass
class AppState:
    env_file: Path | None = None
    verbose: bool = False
    quiet: bool = False
    settings: Settings | None = None
    redact: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def read_env_file(path: Path, label: str) -> dict[str, str | None]:
    """The variables of a .env file. Anything but a readable UTF-8 text file without NUL
    bytes is a ConfigError (exit 2) naming ``label``; never a traceback."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the run (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist", "give the path of your .env file") from None
    except OSError as exc:
        raise ConfigError(
            f"{label} cannot be read: {exc.strerror or exc}", "check its permissions"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{label} is a directory", "give the path of your .env file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{label} is not a regular file", "give the path of your .env file")
        data = b""
        while len(data) <= MAX_ENV_FILE and (chunk := os.read(fd, MAX_ENV_FILE + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_ENV_FILE:
        raise ConfigError(f"{label} is larger than 1 MiB: not an env file")
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ConfigError(f"{label} holds a NUL byte (line {line})", "it must be a text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{label} is not valid UTF-8 (line {line})", "save it as UTF-8 text"
        ) from None
    return dict(dotenv_values(stream=io.StringIO(text)))


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
    state: AppState, overrides: dict[str, Any] | None = None, *, secrets: Sequence[str] = ()
) -> Settings:
    """Resolve settings once per command: CLI > environment > .env > default. The process
    environment is read here, once: below the CLI nothing reads ``os.environ``."""
    env_file, dotenv = _dotenv(state)
    settings = config.load(
        overrides or {},
        os.environ,
        dotenv,
        hostname=socket.gethostname(),
        home=_home(),
        env_file=env_file,
    )
    secrets = [*secrets, *(s for spec in settings.sources for s in spec.secrets)]
    setup_logging(
        level=settings.log_level,
        verbose=state.verbose,
        quiet=state.quiet,
        log_file=settings.log_file,
        secrets=secrets,
    )
    for warning in settings.warnings:
        LOG.warning("%s", warning)
    state.settings = settings
    return settings


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
    tty = sys.stderr.isatty()

    def factory(label: str, total: int | None) -> Callable[[int], None]:
        return Progress(label, total, tty=tty)

    return factory


def _state() -> AppState:
    return click.get_current_context().find_object(AppState) or AppState()


def _emit_json(document: Any) -> None:
    print_json(document)


def _exit(code: int) -> NoReturn:
    raise SystemExit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Read settings from this .env file.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug output, with tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@click.version_option(__version__, prog_name="cloudbackup")
@click.pass_context
def cli(ctx: click.Context, env_files: tuple[Path, ...], verbose: bool, quiet: bool) -> None:
    """Compressed, checksummed backups of directories and databases, pushed to S3 and
    pruned by one retention planner."""
    setup_logging(verbose=verbose, quiet=quiet)
    if len(env_files) > 1:
        # Silently using the last one would hide the others' settings.
        raise UsageError(
            "--env-file is given more than once (" + ", ".join(map(str, env_files)) + ")",
            "give one .env file",
        )
    ctx.obj = AppState(env_file=env_files[0] if env_files else None, verbose=verbose, quiet=quiet)


# ---------------------------------------------------------------- backup


def _result_row(r: backing.SourceResult, *, local_only: bool) -> list[str]:
    """source, id, result, size, time, uploaded, notes: one row of a backup or run summary."""
    state = "ok" if r.ok and r.outcome is Outcome.OK else ("ok (warnings)" if r.ok else "FAILED")
    return [
        r.source,
        r.id or "-",
        state,
        human_size(r.size) if r.size is not None else "-",
        f"{r.seconds:.1f}s",
        "yes" if r.uploaded else ("local-only" if local_only else "no"),
        r.error or (f"{len(r.warnings)} warning(s)" if r.warnings else ""),
    ]


def _print_results(
    results: Sequence[backing.SourceResult], *, local_only: bool, dry_run: bool
) -> None:
    rows = [_result_row(r, local_only=local_only) for r in results]
    click.echo(table(rows, ["source", "id", "result", "size", "time", "uploaded", "notes"]))
    failed = [r.source for r in results if not r.ok]
    summary = f"{len(results) - len(failed)} of {len(results)} source(s) backed up"
    if dry_run:
        summary = f"dry run: {len(results) - len(failed)} of {len(results)} source(s) would be backed up; nothing written"
    if failed:
        summary += "; failed: " + ", ".join(failed)
    if local_only and not dry_run:
        summary += " (local-only: no bucket configured, nothing uploaded)"
    click.echo(summary)


@cli.command()
@click.argument("specs", nargs=-1, metavar="[SPEC]...")
@click.option("--no-upload", is_flag=True, help="Archive locally only; upload later with `upload`.")
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PAT",
    help="Exclude glob (adds to CLOUDBACKUP_EXCLUDE).",
)
@click.option("--compression", type=click.Choice(config.COMPRESSIONS), help="Compression codec.")
@click.option(
    "--allow-shrink", is_flag=True, help="Accept a source the shrink guard would stop, once."
)
@click.option("--dry-run", is_flag=True, help="Show what would be archived; write nothing.")
@options.as_json
def backup(
    specs: tuple[str, ...],
    no_upload: bool,
    excludes: tuple[str, ...],
    compression: str | None,
    allow_shrink: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Archive each source (arguments or CLOUDBACKUP_SOURCES), then upload it."""
    state = _state()
    settings = load_settings(
        state,
        {
            "sources": list(specs) or None,
            "extra_exclude": list(excludes),
            "CLOUDBACKUP_COMPRESSION": compression,
        },
    )
    if not settings.sources:
        raise UsageError(
            "no sources to back up",
            "give SPEC arguments or set CLOUDBACKUP_SOURCES (e.g. /srv/www)",
        )
    upload = not no_upload and settings.remote_configured
    ctx = make_context(settings, remote=settings.remote_configured and not dry_run)
    local_only = not settings.remote_configured
    if local_only and not no_upload:
        LOG.info("no bucket configured (CLOUDBACKUP_S3_BUCKET): local-only backup")
    from cloudbackup.lock import DirLock

    with DirLock(settings.local_dir):
        uploader, streamer = _uploader() if upload else (None, None)
        results = backing.backup(
            ctx,
            settings.sources,
            backing.BackupOptions(dry_run=dry_run, allow_shrink=allow_shrink),
            uploader=uploader,
            streamer=streamer,
        )
    if as_json:
        _emit_json(
            {
                "results": [r.to_dict() for r in results],
                "dry_run": dry_run,
                "local_only": local_only,
            }
        )
    else:
        _print_results(results, local_only=local_only, dry_run=dry_run)
    _exit(exit_code(r.outcome for r in results))


def _uploader() -> tuple[
    backing.Uploader, backing.Streamer
]:
    from cloudbackup.ops import upload as uploading

    return uploading.upload_after_backup, uploading.start_stream


# ---------------------------------------------------------------- list / verify


@cli.command(name="list")
@options.only_source
@options.where("all")
@click.option("--host", help="Backups of this host (default: this machine's).")
@click.option("--all-hosts", is_flag=True, help="Backups of every host.")
@options.as_json
def list_cmd(
    source: str | None, where: str, host: str | None, all_hosts: bool, as_json: bool
) -> None:
    """Backups with id, time, size, where they are and whether the offsite copy is verified."""
    settings = load_settings(_state(), {"CLOUDBACKUP_HOST": host})
    if where == "remote" and not settings.remote_configured:
        raise UsageError("--where remote needs a bucket", _NO_REMOTE)
    ctx = make_context(settings, remote=where != "local", need_local=False)
    backups = listing.list_backups(ctx, where=where, source=source, all_hosts=all_hosts)
    if as_json:
        _emit_json({"backups": [b.to_dict() for b in backups]})
        return
    if not backups:
        click.echo("no backups found")
        return
    rows = [
        [
            b.id,
            b.host,
            b.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            human_size(b.size),
            "both" if b.local and b.remote else ("local" if b.local else "remote"),
            "yes" if b.verified else "no",
        ]
        for b in backups
    ]
    click.echo(table(rows, ["id", "host", "created (UTC)", "size", "where", "verified offsite"]))


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
    settings = load_settings(_state(), {"CLOUDBACKUP_HOST": host})
    if where in ("remote", "all") and not settings.remote_configured:
        if where == "remote":
            raise UsageError("--where remote needs a bucket", _NO_REMOTE)
        where = "local"
    ctx = make_context(settings, remote=where != "local", need_local=False)
    results = []
    if where in ("local", "all"):
        refs = verifying.select_refs(ctx.local_catalog.listing().refs, ids, source, settings.host)
        results += [verifying.verify_local_ref(ctx, ref, deep=deep) for ref in refs]
    if where in ("remote", "all"):
        refs = verifying.select_refs(ctx.remote_catalog.listing().refs, ids, source, settings.host)
        results += [verifying.verify_remote_ref(ctx, ref, deep=deep) for ref in refs]
    if ids:
        found = {r.id for r in results}
        for missing in ids:
            if missing not in found:
                raise UsageError(f"no backup {missing!r} found ({where})", "see `cloudbackup list`")
    if as_json:
        _emit_json({"results": [r.to_dict() for r in results]})
    else:
        if not results:
            click.echo("nothing to verify")
        for r in results:
            click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.where:6} {r.id}: {r.detail}")
    _exit(exit_code(r.outcome for r in results))


@cli.command()
@options.only_source
@click.option(
    "--host", help="Upload as this host (explicit: allowed under another machine's claim)."
)
@options.as_json
def upload(source: str | None, host: str | None, as_json: bool) -> None:
    """Push every complete local backup not yet verified remotely; resumes interrupted uploads."""
    from cloudbackup.lock import DirLock
    from cloudbackup.ops import upload as uploading

    settings = load_settings(_state(), {"CLOUDBACKUP_HOST": host})
    if not settings.remote_configured:
        raise UsageError("no bucket configured", _NO_REMOTE)
    ctx = make_context(settings)
    with DirLock(settings.local_dir):
        results = uploading.upload_pending(ctx, source)
    if as_json:
        _emit_json({"results": [r.to_dict() for r in results]})
    else:
        if not results:
            click.echo("nothing to upload: every local backup is verified offsite")
        for r in results:
            click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.id}: {r.detail}")
    _exit(exit_code(r.outcome for r in results))


@cli.command()
@click.argument("target_spec", metavar="SOURCE|ID")
@click.option("--host", help="Backups of this host (the old machine's name).")
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
@click.option("--dry-run", is_flag=True, help="List what would be restored; write nothing.")
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
        _state(), {"CLOUDBACKUP_HOST": kwargs["host"]}, secrets=target_secrets
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
        _emit_json(result.to_dict())
    else:
        err = to == "-"  # stdout carries the data alone
        click.echo(result.summary(), err=err)
        for line in result.refused:
            click.echo(f"  {line}", err=err)
    _exit(result.exit_code)


@cli.command()
@options.where("local")
@click.option("--policy", help="Retention policy (default: CLOUDBACKUP_LOCAL/REMOTE_RETENTION).")
@options.only_source
@options.backups_of_host
@click.option("--all-hosts", is_flag=True, help="Every host in the bucket (a central pruner job).")
@click.option("--dry-run", is_flag=True, help="Print the plan; delete nothing.")
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
    from cloudbackup.core.retention import parse_policy
    from cloudbackup.lock import DirLock
    from cloudbackup.ops import prune as pruning

    try:
        chosen = parse_policy(policy) if policy is not None else None
    except ConfigError as exc:
        raise ConfigError(f"--policy: {exc.message}", exc.hint) from None
    except ValueError:  # a number too long for int() (over 4,300 digits)
        raise ConfigError(
            f"--policy {config.shown(policy or '')} is invalid: a number in it is far too long"
        ) from None
    settings = load_settings(_state(), {"CLOUDBACKUP_HOST": host})
    pruning.validate(settings, where=where, policy=chosen, host=host, all_hosts=all_hosts)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = pruning.prune(
            ctx,
            where=where,
            policy=chosen,
            source=source,
            host=host,
            all_hosts=all_hosts,
            dry_run=dry_run,
        )
    if as_json:
        _emit_json({"dry_run": dry_run, "results": [r.to_dict() for r in results]})
    else:
        click.echo("\n".join(pruning.describe(results, dry_run=dry_run)))
    _exit(pruning.exit_code(results))


@cli.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@options.where("local")
@options.backups_of_host
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@options.as_json
def forget(
    ids: tuple[str, ...], where: str, host: str | None, dry_run: bool, as_json: bool
) -> None:
    """Delete the named backups (manifest first); refuses unknown or locked ones."""
    from cloudbackup.lock import DirLock
    from cloudbackup.ops import forget as forgetting

    settings = load_settings(_state(), {"CLOUDBACKUP_HOST": host})
    if where == "remote" and not settings.remote_configured:
        raise UsageError("--where remote needs a bucket", _NO_REMOTE)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = forgetting.forget(ctx, ids, where=where, dry_run=dry_run)
    if as_json:
        _emit_json({"dry_run": dry_run, "results": [r.to_dict() for r in results]})
    else:
        click.echo("\n".join(forgetting.describe(results, dry_run=dry_run)))
    _exit(forgetting.exit_code(results))


@cli.command()
@click.option(
    "--allow-shrink", is_flag=True, help="Accept a source the shrink guard would stop, once."
)
@click.option("--deep", is_flag=True, help="Verify uploads by streaming them back.")
@click.option("--host", help="Run as this host (explicit: allowed under another machine's claim).")
@options.as_json
def run(allow_shrink: bool, deep: bool, host: str | None, as_json: bool) -> None:
    """The nightly job: recover, back up, upload, verify, prune, ping; one summary."""
    from cloudbackup.lock import DirLock
    from cloudbackup.ops import run as nightly
    from cloudbackup.ops import status as monitor

    state = _state()
    try:
        settings = load_settings(state, {"CLOUDBACKUP_HOST": host})
    except CloudBackupError as exc:
        monitor.ping(_raw_ping_url(state), "/fail", body=f"cloudbackup run: {exc}")
        raise
    try:
        if not settings.remote_configured and not settings.local_only:
            raise UsageError(
                "`run` needs a bucket for the offsite copy",
                "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST), or CLOUDBACKUP_LOCAL_ONLY=1 if "
                "no offsite copy is intended",
            )
        if not settings.sources:
            raise UsageError("no sources to back up", "set CLOUDBACKUP_SOURCES")
        with DirLock(settings.local_dir):
            monitor.ping(settings.ping_url, "/start")
            ctx = make_context(settings)
            report = nightly.run(ctx, allow_shrink=allow_shrink, deep=deep)
    except CloudBackupError as exc:
        monitor.ping(settings.ping_url, "/fail", body=f"cloudbackup run on {settings.host}: {exc}")
        raise
    except Exception as exc:  # a bug or an OSError: /start was pinged, so /fail must follow
        monitor.ping(
            settings.ping_url,
            "/fail",
            body=f"cloudbackup run on {settings.host}: unexpected error: {type(exc).__name__}: {exc}",
        )
        raise
    summary = _run_summary(report)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(summary)
    if report.exit_code == 0:
        monitor.ping(settings.ping_url)
    else:
        monitor.ping(settings.ping_url, "/fail", body=summary)
    _exit(report.exit_code)


def _raw_ping_url(state: AppState) -> str | None:
    """The ping URL even when other settings are invalid (so exit 2 still pings /fail)."""
    url = os.environ.get("CLOUDBACKUP_PING_URL")
    if url is None:
        try:
            url = _dotenv(state)[1].get("CLOUDBACKUP_PING_URL")
        except ConfigError:
            url = None  # the unreadable .env is what is being reported
    url = (url or "").strip()
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return url if url.startswith(("http://", "https://")) else None


def _run_summary(report: Any) -> str:
    rows = []
    for r in report.results:
        *cells, notes = _result_row(r, local_only=r.local_only)
        rows.append([*cells, str(len(r.pruned)), notes])
    lines = [
        table(rows, ["source", "id", "result", "size", "time", "uploaded", "pruned", "errors"])
    ]
    for u in report.uploads:
        lines.append(f"upload {u.id}: {'ok' if u.ok else 'FAILED'} {u.detail}")
    for v in report.verifies:
        lines.append(f"verify {v.id}: {'ok' if v.ok else 'FAILED'} {v.detail}")
    for p in report.prunes:
        if p.errors:
            lines.append(f"prune {p.where} {p.source}: " + "; ".join(p.errors))
    lines += [f"error: {e}" for e in report.errors]
    verdict = {
        0: "run succeeded",
        1: "run completed with failures or warnings",
        3: "run found an integrity failure",
    }
    lines.append(
        f"{verdict.get(report.exit_code, 'run failed')} in {report.seconds:.1f}s (exit {report.exit_code})"
    )
    return "\n".join(lines)


@cli.command()
@click.option(
    "--max-age", default="26h", show_default=True, help="CRITICAL when the newest backup is older."
)
@click.option("--all-hosts", is_flag=True, help="Every host sharing the bucket.")
@options.as_json
@click.option(
    "--prometheus", type=click.Path(path_type=Path), metavar="FILE", help="Write textfile metrics."
)
def status(max_age: str, all_hosts: bool, as_json: bool, prometheus: Path | None) -> None:
    """Per host/source: newest backup, age, counts, sizes; monitoring exit codes."""
    from cloudbackup.ops import status as monitor

    try:
        age = monitor.parse_max_age(max_age)
        settings = load_settings(_state())
        ctx = make_context(settings, need_local=False)
        report = monitor.status(ctx, max_age=age, all_hosts=all_hosts)
    except CloudBackupError as exc:
        LOG.error("%s", exc)
        if as_json:
            _emit_json({"hosts": [], "state": "UNKNOWN", "detail": [str(exc)]})
        else:
            click.echo(f"UNKNOWN: {exc}")
        _exit(monitor.UNKNOWN)
    if prometheus is not None:
        try:
            monitor.write_prometheus(prometheus, monitor.prometheus_text(report))
        except OSError as exc:
            report.detail.append(f"cannot write {prometheus}: {exc.strerror or exc}")
            report.state = monitor.UNKNOWN
    if as_json:
        _emit_json(report.to_dict())
    else:
        rows = []
        for host, sources in sorted(report.hosts.items()):
            for s in sources:
                rows.append(
                    [
                        host,
                        s.source,
                        monitor.STATE_NAMES[s.state],
                        s.newest or "-",
                        human_duration(s.age_seconds),
                        f"{s.local_count}/{s.remote_count}",
                        human_size(s.local_bytes + s.remote_bytes),
                        "; ".join(s.reasons),
                    ]
                )
        click.echo(
            table(
                rows, ["host", "source", "state", "newest", "age", "local/remote", "bytes", "why"]
            )
        )
        for line in report.detail:
            click.echo(line)
        click.echo(f"status: {monitor.STATE_NAMES[report.state]}")
    _exit(report.state)


@cli.command()
@options.as_json
def check(as_json: bool) -> None:
    """Validate configuration, sources, the local dir and bucket access, one line per check."""
    from cloudbackup.ops import check as checking

    settings = load_settings(_state())
    ctx = make_context(settings, need_local=False)
    lines = checking.check(ctx)
    if as_json:
        _emit_json(
            {"checks": [line.to_dict() for line in lines], "ok": checking.check_exit(lines) == 0}
        )
    else:
        for line in lines:
            mark = "ok  " if line.ok and not line.warning else ("warn" if line.ok else "FAIL")
            click.echo(f"{mark} {line.name}: {line.detail}")
    _exit(checking.check_exit(lines))


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

    given = {"CLOUDBACKUP_S3_BUCKET": bucket, "CLOUDBACKUP_S3_PREFIX": prefix}
    if bucket is not None and prefix is not None:
        # Everything the policy needs is on the command line: validate just that, so an
        # unrelated broken variable (say, a retention policy) does not stop an operator
        # writing IAM policies on another machine.
        settings = config.load(given, {}, {}, hostname=socket.gethostname(), home=_home())
    else:
        settings = load_settings(_state(), given)
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
    verbose = any(a in ("-v", "--verbose") for a in args)
    try:
        cli.main(args=args, prog_name="cloudbackup", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.exit(code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(exit_code(Outcome.INTERRUPTED))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exit_code(Outcome.REFUSED) if isinstance(exc, click.UsageError) else exc.exit_code)
    except CloudBackupError as exc:
        if verbose:
            LOG.exception("%s", exc)
        else:
            LOG.error("%s", exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(exit_code(Outcome.INTERRUPTED))
    except Exception as exc:  # a bug: say so in one line unless -v
        if verbose:
            LOG.exception("unexpected error")
        else:
            LOG.error("unexpected error: %s: %s (run with -v for details)", type(exc).__name__, exc)
        sys.exit(1)
    sys.exit(0)
