"""age encryption as one more stage of the archive pipeline, both ways (SPEC "Encryption").

Write: compressor → :class:`EncryptStage` → SHA-256 + file (``hashing``). Read: hashed
stored bytes → the decrypting child (a stage of the restore pipeline, ``restore.apply``;
:meth:`Decryption.open` for ``verify --deep``) → decompressor. Both are streams through one child
process running ``pyrage`` (the Rust ``rage`` implementation of age; no cryptography here):
its ``encrypt_io``/``decrypt_io`` hold the GIL until the end of the stream, so in this process
they would stall the tar writer, the hashing thread and the uploader. The child gets:

* a command line and environment that hold nothing (``python -I -S -c <program> <fd>``, an
  empty environment); the keys — recipients, or the identity when decrypting — and the
  parent's ``sys.path`` arrive as JSON through a pipe of their own (descriptor ``<fd>``);
* the data on stdin (a pipe of 1 MiB) and gives the result on stdout;
* its verdict as an exit status: a tampered or truncated ciphertext (pyrage's plain
  ``OSError('decryption error')``, or an unreadable header) is an integrity failure (exit 3);
  "No matching keys found" is a wrong key (exit 2) unless one of the identities is among the
  archive's recipients as its manifest records them — then the recipient stanza was damaged
  (exit 3).

Keys: :func:`parse_recipients` (``CLOUDBACKUP_AGE_RECIPIENTS``, or the content of a recipients
file) and :func:`load_identities` (a strict reader of age identity files: ``AGE-SECRET-KEY-1``
lines, ``#`` comments and blank lines; pyrage has no parser of its own).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbackup.core.errors import CloudBackupError, ConfigError, IntegrityError

SUFFIX = ".age"
CHUNK = 1024 * 1024
#: An identity file is a few lines; anything this large is not one.
MAX_IDENTITY_FILE = 64 * 1024
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"
RECIPIENT_PREFIX = "age1"

_INTEGRITY_HINT = "restore another copy (--from local/remote) or an older backup (--at)"

# Exit statuses of the child (anything else: an unexpected failure, its stderr says why).
_NO_MATCH = 10
_TAMPERED = 11
_BAD_HEADER = 12
_PIPE = 13
_UNZSTD = 15  # authenticated plaintext that does not decompress

# The child: reads the header, then streams stdin → age → stdout. It imports nothing of
# cloudbackup; the parent's sys.path finds pyrage wherever this process found it.
_CHILD = r"""
import io, json, os, sys
def main():
    # pyrage reads 8 KiB at a time and writes 64 KiB chunks: 1 MiB buffers over the pipes
    # turn those into few system calls.
    inp = io.BufferedReader(io.FileIO(0, "rb", closefd=False), 1 << 20)
    out = io.BufferedWriter(io.FileIO(1, "wb", closefd=False), 1 << 20)
    with io.FileIO(int(sys.argv[1]), "rb") as keys:
        head = json.loads(keys.readall())
    sys.path[:] = head["path"]
    import pyrage
    from pyrage import x25519
    try:
        if head["mode"] == "encrypt":
            keys = [x25519.Recipient.from_str(k) for k in head["keys"]]
            del head
            pyrage.encrypt_io(inp, out, keys)
        else:
            keys = [x25519.Identity.from_str(k) for k in head["keys"]]
            sink = out
            if head.get("decompress") == "zstd":
                # Decompressed here too: the consumer's thread is left the tar stream alone.
                import zstandard
                sink = zstandard.ZstdDecompressor().stream_writer(
                    out, write_size=1 << 20, closefd=False
                )
            del head
            pyrage.decrypt_io(inp, sink, keys)
            sink.flush()
        out.flush()
    except pyrage.DecryptError as exc:
        text = str(exc)
        sys.stderr.write(text[:200] + "\n")
        return 10 if "No matching keys" in text else 12
    except OSError as exc:
        if exc.errno in (32, 104):
            return 13
        sys.stderr.write(str(exc)[:200] + "\n")
        return 11 if exc.errno is None and str(exc) == "decryption error" else 14
    except Exception as exc:
        if type(exc).__name__ != "ZstdError":
            raise
        sys.stderr.write(str(exc)[:200] + "\n")  # authenticated, but not zstd
        return 15
    return 0
code = main()
sys.stderr.flush()
os._exit(code)  # at once: no interpreter teardown, no flush of what a failure left buffered
"""


# ---------------------------------------------------------------- keys


def _pyrage() -> Any:
    import pyrage  # imported when keys are used: most commands never need it

    return pyrage


def check_recipient(text: str) -> str:
    """``text`` if it is an age X25519 recipient (``age1...``); ValueError otherwise."""
    if not text.startswith(RECIPIENT_PREFIX):
        raise ValueError(f"{text[:80]!r} is not an age recipient (a public key age1...)")
    pyrage = _pyrage()
    try:
        pyrage.x25519.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ValueError(f"{text[:80]!r} is not a valid age recipient ({exc})") from None
    return text


def parse_recipients(text: str) -> tuple[str, ...]:
    """Recipients separated by commas or newlines; blank lines and ``#`` comments ignored
    (the form of ``CLOUDBACKUP_AGE_RECIPIENTS`` and of a recipients file). Each is checked;
    the first bad one is named in the ValueError. Duplicates are dropped, order kept."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in line.split(","):
            item = item.strip()
            if item and check_recipient(item) not in found:
                found.append(item)
    if not found:
        raise ValueError("no recipient given (age public keys age1...)")
    return tuple(found)


@dataclass(frozen=True)
class Keyring:
    """The identities of an identity file and their recipients. The secret keys never
    appear in a repr, a log or an error message."""

    path: Path
    recipients: tuple[str, ...]
    _secrets: tuple[str, ...] = field(repr=False)

    def __repr__(self) -> str:
        return f"Keyring({str(self.path)!r}, recipients={self.recipients!r})"

    def matches(self, recipients: Iterable[str]) -> bool:
        return bool(set(self.recipients) & set(recipients))


def _read_small(path: Path, label: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{label} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"{label} {path} cannot be read: {exc.strerror or exc}",
            "run as the user who owns it",
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{label} {path} is not a regular file")
        data = b""
        while len(data) <= MAX_IDENTITY_FILE and (
            chunk := os.read(fd, MAX_IDENTITY_FILE + 1 - len(data))
        ):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_IDENTITY_FILE:
        raise ConfigError(f"{label} {path} is larger than 64 KiB: not an age identity file")
    return data


def parse_identities(data: bytes, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(secret keys, their recipients) of an age identity file's bytes. Strict: every line
    is blank, a ``#`` comment or one ``AGE-SECRET-KEY-1...`` key; anything else is a
    ConfigError naming the line by its number only (never its content)."""
    pyrage = _pyrage()
    if data.startswith(b"age-encryption.org/") or data.startswith(b"-----BEGIN AGE"):
        raise ConfigError(
            f"{where} is itself encrypted (a passphrase-protected identity)",
            "decrypt it first (age -d) into a file readable only by the restoring user",
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not an age identity file (not ASCII text)") from None
    secrets: list[str] = []
    publics: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        problem = None
        if not line.startswith(IDENTITY_PREFIX):
            problem = "is not an age identity (AGE-SECRET-KEY-1...)"
        else:
            try:
                identity = pyrage.x25519.Identity.from_str(line)
            except pyrage.IdentityError:
                problem = "is not a valid age identity"
        if problem is not None:
            raise ConfigError(
                f"{where}: line {number} {problem}",
                "an identity file holds AGE-SECRET-KEY-1... lines and # comments",
            )
        secrets.append(line)
        publics.append(str(identity.to_public()))
    if not secrets:
        raise ConfigError(f"{where} holds no identity (AGE-SECRET-KEY-1...)")
    return tuple(secrets), tuple(publics)


def load_identities(path: Path) -> Keyring:
    """The identities of the file at ``path`` (``CLOUDBACKUP_AGE_IDENTITY_FILE``)."""
    label = "CLOUDBACKUP_AGE_IDENTITY_FILE"
    secrets, publics = parse_identities(_read_small(path, label), f"{label} {path}")
    return Keyring(path, publics, secrets)


def generate_identity() -> tuple[str, str]:
    """A new identity: (the secret key, its recipient)."""
    pyrage = _pyrage()
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())


# ---------------------------------------------------------------- the child


def _widen(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
    except OSError:  # over /proc/sys/fs/pipe-max-size for this user: the default will do
        pass


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def child_argv(keys_fd: int) -> list[str]:
    """The command line of an age child reading its keys from descriptor ``keys_fd``
    (nothing secret: the program and a descriptor number)."""
    return [sys.executable, "-I", "-S", "-c", _CHILD, str(keys_fd)]


def keys_pipe(mode: str, keys: Sequence[str], *, decompress: str | None = None) -> int:
    """The reading end of a pipe that holds the child's header (``mode``, ``keys``, this
    process's ``sys.path``, and ``decompress``: ``zstd`` to decompress the plaintext in the
    child too), written and closed: hand it to the child (``pass_fds``) and close it here
    once the child is started."""
    keys_in, keys_out = os.pipe()
    try:
        fields = {"mode": mode, "keys": list(keys), "path": sys.path, "decompress": decompress}
        head = json.dumps(fields).encode()
        _write_all(keys_out, head)  # a few hundred bytes: the pipe holds them
        del head
    except BaseException:
        os.close(keys_in)
        raise
    finally:
        os.close(keys_out)
    return keys_in


class _Child:
    """One pyrage child: header and data in, result out, verdict as exit status."""

    def __init__(self, mode: str, keys: Sequence[str]) -> None:
        self._verdict: tuple[int, str] | None = None
        keys_in = keys_pipe(mode, keys)
        try:
            self.proc = subprocess.Popen(
                child_argv(keys_in),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={},
                close_fds=True,
                pass_fds=(keys_in,),
            )
        finally:
            os.close(keys_in)
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        _widen(self.stdin)
        _widen(self.stdout)

    def close_input(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def finish(self) -> tuple[int, str]:
        """Wait for the child (once); its exit status and what it said."""
        if self._verdict is None:
            self.close_input()
            assert self.proc.stderr
            said = self.proc.stderr.read(4096).decode(errors="replace").strip()
            code = self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()
            self._verdict = (code, said)
        return self._verdict

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def _child_failed(code: int, said: str, what: str) -> CloudBackupError:
    return CloudBackupError(
        f"age {what} failed (exit status {code}" + (f": {said}" if said else "") + ")",
        "is the pyrage package installed for this Python?" if code == 1 else None,
    )


def decryption_failure(
    code: int, said: str, keyring: Keyring, recipients: Sequence[str], name: str
) -> CloudBackupError:
    """The error a decrypting child's exit status ``code`` (and its message) means: a wrong
    key (exit 2) or — when the identity is among the manifest's ``recipients`` — a damaged
    header, tampered or truncated ciphertext (exit 3), or the child's own failure."""
    if code == _NO_MATCH:
        if keyring.matches(recipients):
            return IntegrityError(
                f"{name}: the identity is one of the archive's recipients, but no recipient "
                "stanza of the archive opens with it (the header is damaged)",
                _INTEGRITY_HINT,
            )
        return ConfigError(
            f"{name}: no identity in {keyring.path} matches the archive's recipients",
            "give the identity of one of the recipients its manifest records "
            "(CLOUDBACKUP_AGE_IDENTITY_FILE)",
        )
    if code == _UNZSTD:
        return IntegrityError(
            f"{name}: the decrypted data is not the zstd stream it should be ({said}); "
            "nothing was restored",
            _INTEGRITY_HINT,
        )
    if code in (_TAMPERED, _BAD_HEADER):
        return IntegrityError(
            f"{name} fails age's authentication (tampered or truncated ciphertext: "
            f"{said or 'decryption error'}); nothing was restored",
            _INTEGRITY_HINT,
        )
    return _child_failed(code, said, "decryption")


# ---------------------------------------------------------------- write


class EncryptStage:
    """A sink for compressed bytes (``put``) that encrypts them to ``recipients`` and hands
    the ciphertext to ``emit`` (the hashing sink's ``write``) from its own thread, in one
    reused buffer (``emit`` must be done with it when it returns). ``close`` ends the
    stream and raises what went wrong; ``abort`` stops everything on an error elsewhere."""

    def __init__(self, recipients: Sequence[str], emit: Callable[[memoryview], None]) -> None:
        if not recipients:
            raise ValueError("encryption needs at least one recipient")
        self._emit = emit
        self._child = _Child("encrypt", recipients)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._pump, name="age-encrypt", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        try:
            while n := os.readv(self._child.stdout, [buffer]):
                self._emit(view[:n])
        except BaseException as exc:  # surfaced on the writing thread
            self.error = exc
            if self._child.proc.poll() is None:
                self._child.proc.kill()  # a writer blocked on the pipe gets EPIPE

    def put(self, chunk: Any) -> None:
        if self.error is not None:
            raise self.error
        if not chunk:
            return
        try:
            _write_all(self._child.stdin, chunk)
        except BrokenPipeError:
            self._thread.join()
            if self.error is not None:
                raise self.error from None
            code, said = self._child.finish()
            raise _child_failed(code, said, "encryption") from None

    def close(self) -> None:
        self._child.close_input()
        self._thread.join()
        code, said = self._child.finish()
        if self.error is not None:
            raise self.error
        if code != 0:
            raise _child_failed(code, said, "encryption")

    def abort(self) -> None:
        self._child.kill()
        self._thread.join()


# ---------------------------------------------------------------- read


class DecryptingReader:
    """The plaintext of an age stream read from ``raw`` (a hashing reader over the stored
    bytes), decrypted by a child; a feeder thread copies ``raw`` into it. ``read`` raises,
    at the end of the stream, the child's verdict: IntegrityError for tampered or truncated
    ciphertext and damaged headers, ConfigError for a wrong key."""

    def __init__(
        self, raw: Any, keyring: Keyring, recipients: Sequence[str], name: str
    ) -> None:
        self._keyring = keyring
        self._recipients = tuple(recipients)
        self._name = name
        self._feed_error: BaseException | None = None
        self._done = False
        self._raw = raw
        self._child = _Child("decrypt", keyring._secrets)
        self._thread = threading.Thread(target=self._feed, name="age-decrypt", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            while data := self._raw.read(CHUNK):
                _write_all(self._child.stdin, data)
        except BrokenPipeError:
            pass  # the child stopped reading: its exit status says why
        except BaseException as exc:
            self._feed_error = exc
            if self._child.proc.poll() is None:
                self._child.proc.kill()
        finally:
            self._child.close_input()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._done:
            return b""
        if size is None or size < 0:
            size = CHUNK
        data = os.read(self._child.stdout, min(size, CHUNK))
        if not data:
            self._done = True
            self._conclude()
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _conclude(self) -> None:
        self._thread.join()
        code, said = self._child.finish()
        if self._feed_error is not None:
            raise self._feed_error
        if code != 0:
            raise decryption_failure(code, said, self._keyring, self._recipients, self._name)

    def drain(self) -> None:
        """Read to the end (a tar reader stops at its end-of-archive blocks): every byte
        stored is fed and authenticated, and the child's verdict is raised."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        """Stop early (or after the end): the child is killed if still running."""
        if not self._done:
            self._done = True
            self._child.kill()
            self._thread.join()


@dataclass(frozen=True)
class Decryption:
    """How to open one encrypted archive: the keyring, and the recipients its manifest
    records (they tell a wrong key from a damaged header)."""

    keyring: Keyring
    recipients: tuple[str, ...]
    name: str

    def open(self, raw: Any) -> DecryptingReader:
        """``raw`` (the stored bytes, already being hashed) decrypted, for a reader on this
        thread (``verify --deep``); the restore pipeline runs the child as a stage."""
        return DecryptingReader(raw, self.keyring, self.recipients, self.name)

    def keys_pipe(self, *, decompress: str | None = None) -> int:
        """The header of a decrypting child (see :func:`keys_pipe`)."""
        return keys_pipe("decrypt", self.keyring._secrets, decompress=decompress)

    def failure(self, code: int, said: str) -> CloudBackupError:
        """What the exit status ``code`` of a decrypting child means."""
        return decryption_failure(code, said, self.keyring, self.recipients, self.name)


def keyring_at(path: Path | None) -> Keyring | None:
    """The identities of ``CLOUDBACKUP_AGE_IDENTITY_FILE``, when it is set."""
    return None if path is None else load_identities(path)


def decryption_for(
    keyring: Keyring | None, recipients: Sequence[str], name: str, why: str
) -> Decryption:
    """The decryption of an archive encrypted to ``recipients``, or the exit-2 error before
    anything is read: without an identity file, or with one that holds none of them."""
    if keyring is None:
        raise ConfigError(
            f"{name} is encrypted: {why} needs CLOUDBACKUP_AGE_IDENTITY_FILE",
            "set it to the age identity file of one of its recipients (kept offline, not "
            "on the host that backs up)",
        )
    if not keyring.matches(recipients):
        raise ConfigError(
            f"{name}: no identity in {keyring.path} matches the archive's recipients "
            f"({', '.join(recipients)})",
            "give the identity of one of them (CLOUDBACKUP_AGE_IDENTITY_FILE)",
        )
    return Decryption(keyring, tuple(recipients), name)
