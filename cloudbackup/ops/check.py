"""``check``: configuration, sources, the local dir and bucket access, one line per check
(write access is proven without leaving an object behind)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cloudbackup.config import Settings
from cloudbackup.context import Context
from cloudbackup.core.errors import CloudBackupError, PermanentStorageError, SourceError
from cloudbackup.core.outcome import Outcome
from cloudbackup.core.outcome import exit_code as code_of
from cloudbackup.core.words import size
from cloudbackup.sources.registry import make_source
from cloudbackup.storage.base import RemoteStore, UploadSpec
from cloudbackup.stream.age import load_identities


@dataclass
class CheckLine:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK if self.ok else Outcome.FAILED

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "warning": self.warning, "detail": self.detail}


def check(ctx: Context) -> list[CheckLine]:
    settings = ctx.settings
    lines = [
        CheckLine("configuration", True, f"host {settings.host}, {len(settings.sources)} source(s)")
    ]
    for warning in settings.warnings:
        lines.append(CheckLine("configuration", True, warning, warning=True))
    if settings.env_file is not None:
        try:
            mode = os.stat(settings.env_file).st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                lines.append(
                    CheckLine(
                        "env file",
                        True,
                        f"{settings.env_file} is readable by other users: chmod 600 {settings.env_file}",
                        warning=True,
                    )
                )
        except OSError:
            pass
    if not settings.sources:
        lines.append(CheckLine("sources", False, "no sources configured: set CLOUDBACKUP_SOURCES"))
    for spec in settings.sources:
        try:
            detail = make_source(spec, env=settings.child_env).check()
            lines.append(CheckLine(f"source {spec.name}", True, detail))
        except (SourceError, CloudBackupError, ValueError) as exc:
            lines.append(CheckLine(f"source {spec.name}", False, str(exc)))
    lines += _check_encryption(settings)
    lines.append(_check_local_dir(settings.local_dir))
    if ctx.remote is None:
        if settings.local_only:
            lines.append(
                CheckLine("bucket", True, "local-only (CLOUDBACKUP_LOCAL_ONLY=1): no offsite copy")
            )
        else:
            lines.append(
                CheckLine(
                    "bucket",
                    False,
                    "no bucket: set CLOUDBACKUP_S3_BUCKET (or CLOUDBACKUP_DEST, or "
                    "CLOUDBACKUP_LOCAL_ONLY=1)",
                )
            )
        return lines
    lines += _check_remote(ctx, ctx.remote)
    return lines


def _check_encryption(settings: Settings) -> list[CheckLine]:
    """Recipients (validated when the settings were read: here, what they mean) and the
    identity file: readable by others, or present on a host that backs up."""
    lines = []
    recipients = settings.age_recipients
    if recipients:
        lines.append(
            CheckLine(
                "encryption",
                True,
                f"archives encrypted with age to {len(recipients)} recipient(s): "
                + ", ".join(recipients),
            )
        )
    path = settings.age_identity_file
    if path is None:
        return lines
    try:
        keyring = load_identities(path)
    except CloudBackupError as exc:
        return [*lines, CheckLine("identity", False, str(exc))]
    lines.append(
        CheckLine("identity", True, f"{path}: {len(keyring.recipients)} identity(ies), "
                  f"recipient(s) {', '.join(keyring.recipients)}")
    )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        lines.append(
            CheckLine(
                "identity",
                True,
                f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 600 {path}",
                warning=True,
            )
        )
    if recipients and settings.sources:
        lines.append(
            CheckLine(
                "identity",
                True,
                "CLOUDBACKUP_AGE_IDENTITY_FILE is set on a host that backs up: this host can "
                "read its backups; keep the identity offline, on the machine that restores",
                warning=True,
            )
        )
    return lines


def _check_local_dir(path: Any) -> CheckLine:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if path.exists() and not path.is_dir():
        return CheckLine("local dir", False, f"{path} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return CheckLine(
            "local dir",
            False,
            f"{path} is not writable (nor creatable): fix permissions or CLOUDBACKUP_LOCAL_DIR",
        )
    free = shutil.disk_usage(probe).free
    what = "writable" if path.exists() else "creatable"
    return CheckLine("local dir", True, f"{path} is {what}, {size(free)} free")


def _noun(settings: Settings) -> str:
    return "destination" if settings.dest is not None else "bucket"


def _check_remote(ctx: Context, remote: RemoteStore) -> list[CheckLine]:
    settings = ctx.settings
    noun = _noun(settings)
    host_prefix = "/".join([p for p in settings.s3_prefix.split("/") if p] + [settings.host]) + "/"
    try:
        # ListObjectsV2 (MaxKeys=1) rather than HeadBucket: works with prefix-scoped roles.
        next(iter(remote.list(host_prefix)), None)
    except CloudBackupError as exc:
        return [CheckLine(f"{noun} list", False, str(exc))]
    lines = [CheckLine(f"{noun} list", True, f"{remote.describe(host_prefix)} can be listed")]
    lines += _check_write(ctx, remote, host_prefix)
    lines.append(_check_claim(ctx, host_prefix))
    lines.append(_remote_prune_line(settings))
    return lines


def _check_write(ctx: Context, remote: RemoteStore, host_prefix: str) -> list[CheckLine]:
    """Write access, proven without leaving anything behind, and the features accepted."""
    settings = ctx.settings
    noun = _noun(settings)
    probe_key = f"{host_prefix}.cloudbackup-check-{secrets.token_hex(4)}"
    spec = UploadSpec(tags=[("cloudbackup:kind", "check")], storage_class=settings.s3_storage_class)
    try:
        probe = remote.probe_write(probe_key, spec)
    except CloudBackupError as exc:
        return [CheckLine(f"{noun} write", False, str(exc))]
    lines = []
    if probe.refused:
        lines.append(
            CheckLine(
                f"{noun} features",
                False,
                "the store rejects uploads carrying "
                + ", ".join(probe.refused)
                + ": set CLOUDBACKUP_S3_COMPAT=1 (checksums only when required, no tagging)",
            )
        )
    elif probe.accepted:
        lines.append(CheckLine(f"{noun} features", True, f"the store accepts {probe.accepted}"))
    lines.append(
        CheckLine(f"{noun} write", True, f"can write ({probe.how}; nothing left behind)")
    )
    return lines


def _check_claim(ctx: Context, host_prefix: str) -> CheckLine:
    try:
        owner = ctx.host_claim.owner()
    except CloudBackupError as exc:
        code = exc.code if isinstance(exc, PermanentStorageError) else "unreadable"
        return CheckLine(
            "host claim",
            True,
            f"cannot read the claim ({code}); checked again at upload",
            warning=True,
        )
    if owner is None:
        return CheckLine("host claim", True, f"{host_prefix} is unclaimed; the first upload claims it")
    mine = ctx.machine_id  # read, never made: `check` writes nothing locally
    if owner != mine:
        return CheckLine(
            "host claim",
            False,
            f"{host_prefix} is claimed by another machine ({owner[:12]}…, this one is "
            f"{(mine or 'not yet identified')[:12]}…): set a unique CLOUDBACKUP_HOST",
        )
    return CheckLine("host claim", True, f"{host_prefix} belongs to this machine")


def _remote_prune_line(settings: Settings) -> CheckLine:
    if settings.remote_retention is not None and settings.dest is not None:
        return CheckLine(
            "remote prune",
            True,
            f"CLOUDBACKUP_REMOTE_RETENTION={settings.remote_retention}: `run` deletes in the "
            "destination directory (delete rights not probed)",
            warning=True,
        )
    if settings.remote_retention is not None:
        return CheckLine(
            "remote prune",
            True,
            f"CLOUDBACKUP_REMOTE_RETENTION={settings.remote_retention}: `run` deletes in S3, which "
            "needs the pruner role (s3:DeleteObject; not probed)",
            warning=True,
        )
    return CheckLine(
        "remote prune",
        True,
        "off (CLOUDBACKUP_REMOTE_RETENTION unset): the writer role is enough; prune S3 from a "
        "pruner job or with lifecycle rules",
    )


def check_exit(lines: Sequence[CheckLine]) -> int:
    return code_of(line.outcome for line in lines)
