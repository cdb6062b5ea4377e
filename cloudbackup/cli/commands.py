"""The command line: Click commands over the use cases (``ops``, ``restore``), each one
parsing its options, calling its use case and handing the result to ``output``; ``main`` maps
errors to messages and exit codes (``core.outcome``)."""

from __future__ import annotations

import io
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from dotenv import dotenv_values

from cloudbackup import __version__, config
from cloudbackup import context as contexts
from cloudbackup.cli import options, output
from cloudbackup.cli.output import Progress, setup_logging
from cloudbackup.config import Settings
from cloudbackup.core.errors import CloudBackupError, ConfigError, UsageError
from cloudbackup.core.outcome import Outcome, exit_code
from cloudbackup.lock import DirLock
from cloudbackup.ops import backup as backing
from cloudbackup.ops import list as listing
from cloudbackup.ops import verify as verifying
from cloudbackup.ops.status import ping_secrets
from cloudbackup.sources.base import url_secrets
from cloudbackup.storage.base import RemoteStore
from cloudbackup.storage.local import LocalStore

_NO_REMOTE = "set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST for a directory destination)"

LOG = logging.getLogger("cloudbackup")


@dataclass
class AppState:
    env_file: Path | None = None
    verbose: bool = False
    quiet: bool = False
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


def load_settings(state: AppState, *, secrets: Sequence[str] = (), **given: Any) -> Settings:
    """Resolve settings once per command: CLI (``given``, by settings field) > environment >
    .env > default. The process environment and the .env file are read here, once: below
    the CLI nothing reads ``os.environ``."""
    state.environ = dict(os.environ)
    env_file, state.dotenv = _dotenv(state)
    settings = config.load(
        config.command_line(**given),
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
    ]
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
@options.allow_shrink
@options.full
@options.dry_run
@options.as_json
def backup(
    specs: tuple[str, ...],
    no_upload: bool,
    excludes: tuple[str, ...],
    compression: str | None,
    allow_shrink: bool,
    full: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Archive each source (arguments or CLOUDBACKUP_SOURCES), then upload it."""
    settings = load_settings(
        _state(), sources=specs, extra_exclude=excludes, compression=compression
    )
    if not settings.sources:
        raise UsageError(
            "no sources to back up",
            "give SPEC arguments or set CLOUDBACKUP_SOURCES (e.g. /srv/www)",
        )
    local_only = not settings.remote_configured
    if local_only and not no_upload:
        LOG.info("no bucket configured (CLOUDBACKUP_S3_BUCKET): local-only backup")
    ctx = make_context(settings, remote=not local_only and not dry_run)
    chosen = backing.BackupOptions(dry_run=dry_run, allow_shrink=allow_shrink, full=full)
    results = _back_up(ctx, chosen, upload=not no_upload and not local_only)
    document = {"results": [r.to_dict() for r in results], "dry_run": dry_run}
    output.show(
        as_json,
        document | {"local_only": local_only},
        lambda: output.backup_summary(
            results, local_only=local_only, dry_run=dry_run, remote_url=_remote_url(settings)
        ),
    )
    _exit(exit_code(r.outcome for r in results))


def _back_up(
    ctx: contexts.Context, chosen: backing.BackupOptions, *, upload: bool
) -> list[backing.SourceResult]:
    """Every source under the lock, uploaded (streamed while archived) when ``upload``."""
    from cloudbackup.ops import upload as uploading

    with DirLock(ctx.settings.local_dir):
        return backing.backup(
            ctx,
            ctx.settings.sources,
            chosen,
            uploader=uploading.upload_after_backup if upload else None,
            streamer=uploading.start_stream if upload else None,
        )


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
    settings = load_settings(_state(), host=host)
    _remote_needs_bucket(settings, where)
    ctx = make_context(settings, remote=where != "local", need_local=False)
    backups = listing.list_backups(ctx, where=where, source=source, all_hosts=all_hosts)
    document = {"backups": [b.to_dict() for b in backups]}
    output.show(as_json, document, lambda: output.backup_list(backups))


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
    settings = load_settings(_state(), host=host)
    _remote_needs_bucket(settings, where)
    where = where if settings.remote_configured else "local"
    ctx = make_context(settings, remote=where != "local", need_local=False)
    results = _verify(ctx, ids, source, where, deep)
    document = {"results": [r.to_dict() for r in results]}
    output.show(as_json, document, lambda: output.verify_lines(results))
    _exit(exit_code(r.outcome for r in results))


def _verify(
    ctx: contexts.Context, ids: Sequence[str], source: str | None, where: str, deep: bool
) -> list[verifying.VerifyResult]:
    """The copies ``ids`` (or all of this host's, or ``source``'s) in ``where``, verified;
    an id found nowhere is a usage error (exit 2)."""
    results = []
    host = ctx.settings.host
    if where in ("local", "all"):
        refs = verifying.select_refs(ctx.local_catalog.listing().refs, ids, source, host)
        results += [verifying.verify_local_ref(ctx, ref, deep=deep) for ref in refs]
    if where in ("remote", "all"):
        refs = verifying.select_refs(ctx.remote_catalog.listing().refs, ids, source, host)
        results += [verifying.verify_remote_ref(ctx, ref, deep=deep) for ref in refs]
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

    settings = load_settings(_state(), host=host)
    if not settings.remote_configured:
        raise UsageError("no bucket configured", _NO_REMOTE)
    ctx = make_context(settings)
    with DirLock(settings.local_dir):
        results = uploading.upload_pending(ctx, source)
    document = {"results": [r.to_dict() for r in results]}
    output.show(as_json, document, lambda: output.upload_lines(results))
    _exit(exit_code(r.outcome for r in results))


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
    settings = load_settings(_state(), host=kwargs["host"], secrets=target_secrets)
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
    else:  # with --to -, stdout carries the data alone
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
    settings = load_settings(_state(), host=host)
    pruning.validate(settings, where=where, policy=chosen, host=host, all_hosts=all_hosts)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = pruning.prune(
            ctx, where=where, policy=chosen, source=source, host=host, all_hosts=all_hosts,
            dry_run=dry_run,
        )  # fmt: skip
    document = {"dry_run": dry_run, "results": [r.to_dict() for r in results]}
    output.show(as_json, document, lambda: "\n".join(output.prune_lines(results, dry_run=dry_run)))
    _exit(pruning.exit_code(results))


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

    settings = load_settings(_state(), host=host)
    _remote_needs_bucket(settings, where)
    ctx = make_context(settings, remote=where != "local")
    with DirLock(settings.local_dir):
        results = forgetting.forget(ctx, ids, where=where, dry_run=dry_run)
    document = {"dry_run": dry_run, "results": [r.to_dict() for r in results]}
    output.show(as_json, document, lambda: "\n".join(output.forget_lines(results, dry_run=dry_run)))
    _exit(forgetting.exit_code(results))


# ---------------------------------------------------------------- run / status / check


@cli.command()
@options.allow_shrink
@options.full
@click.option("--deep", is_flag=True, help="Verify uploads by streaming them back.")
@options.act_as_host
@options.as_json
def run(allow_shrink: bool, full: bool, deep: bool, host: str | None, as_json: bool) -> None:
    """The nightly job: recover, back up, upload, verify, prune, ping; one summary."""
    from cloudbackup.ops import run as nightly

    state = _state()
    report = nightly.nightly(
        lambda: load_settings(state, host=host),
        make_context,
        describe=output.run_summary,
        fallback_ping_url=lambda: config.resolve_one("ping_url", {}, state.environ, state.dotenv),
        allow_shrink=allow_shrink,
        deep=deep,
        full=full,
    )
    output.show(as_json, report.to_dict(), lambda: output.run_summary(report))
    _exit(report.exit_code)


@cli.command()
@click.option(
    "--max-age", default="26h", show_default=True, help="CRITICAL when the newest backup is older."
)
@options.all_hosts
@options.as_json
@click.option(
    "--prometheus", type=click.Path(path_type=Path), metavar="FILE", help="Write textfile metrics."
)
def status(max_age: str, all_hosts: bool, as_json: bool, prometheus: Path | None) -> None:
    """Per host/source: newest backup, age, counts, sizes; monitoring exit codes."""
    from cloudbackup.ops import status as monitor

    try:
        age = monitor.parse_max_age(max_age)
        ctx = make_context(load_settings(_state()), need_local=False)
        report = monitor.status(ctx, max_age=age, all_hosts=all_hosts)
    except CloudBackupError as exc:
        LOG.error("%s", exc)
        detail = str(exc)
        document = {"hosts": [], "state": "UNKNOWN", "detail": [detail]}
        output.show(as_json, document, lambda: f"UNKNOWN: {detail}")
        _exit(monitor.UNKNOWN)
    if prometheus is not None:
        try:
            monitor.write_prometheus(prometheus, monitor.prometheus_text(report))
        except OSError as exc:
            report.detail.append(f"cannot write {prometheus}: {exc.strerror or exc}")
            report.state = monitor.UNKNOWN
    text = lambda: output.status_table(report, monitor.STATE_NAMES)  # noqa: E731
    output.show(as_json, report.to_dict(), text)
    _exit(report.state)


@cli.command()
@options.as_json
def check(as_json: bool) -> None:
    """Validate configuration, sources, the local dir and bucket access, one line per check."""
    from cloudbackup.ops import check as checking

    settings = load_settings(_state())
    ctx = make_context(settings, need_local=False)
    lines = checking.check(ctx)
    code = checking.check_exit(lines)
    document = {"checks": [line.to_dict() for line in lines], "ok": code == 0}
    output.show(as_json, document, lambda: output.check_lines(lines))
    _exit(code)


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
