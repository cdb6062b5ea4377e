"""``key generate``: a new age identity for encrypted backups (SPEC "Encryption").

The identity file has age-keygen's format (``# created``, ``# public key`` comments, then
the ``AGE-SECRET-KEY-1...`` line), so stock ``age -d -i`` reads it. Written to a new file
only: mode 0600 from its creation, never over an existing file or through a symlink.
"""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime
from pathlib import Path

from cloudbackup.core.errors import UsageError
from cloudbackup.core.model import format_time
from cloudbackup.stream.age import generate_identity


def identity_text(secret: str, recipient: str, now: datetime) -> str:
    return f"# created: {format_time(now)}\n# public key: {recipient}\n{secret}\n"


def generate_key(out: Path | None, now: datetime | None = None) -> tuple[str, str]:
    """(the identity file's text, the recipient). With ``out``, the text is written there
    (a new file, mode 0600, fsynced); a UsageError (exit 2) when it exists."""
    secret, recipient = generate_identity()
    text = identity_text(secret, recipient, now or datetime.now(UTC))
    if out is None:
        return text, recipient
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(out, flags, 0o600)
    except FileExistsError:
        raise UsageError(
            f"{out} exists: an identity file is never overwritten",
            "choose another --out, or remove the old file if you are sure no backup needs it",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{out} is a symlink: an identity file is never overwritten") from None
        raise UsageError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        out.unlink(missing_ok=True)
        raise
    os.close(fd)
    return "", recipient
