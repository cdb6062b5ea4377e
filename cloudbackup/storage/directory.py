"""The directory destination (``CLOUDBACKUP_DEST=file:///mnt/nas/backups``): the bucket's
layout in a directory on another disk or a mounted NAS.

The directory is untrusted like a bucket: below its root (which must exist: an unmounted
mount point is never filled) every directory is opened by descriptor with ``O_NOFOLLOW``
(``fs.dirs``), listings report regular files only (lstat), and paths are built from
validated keys alone. Writes are atomic and never overwrite: a temp file, fsync, a
no-overwrite rename, a directory fsync. A multipart upload is a hidden directory beside its
object (``.~upload-<id>``: the object's name and one file per part, each written
atomically); completing concatenates the parts into a temp file — checking each part's
SHA-256 against the one recorded when it was sent — and publishes it, so the upload record
(part size, part count, composite checksum) is the same as with S3. Nothing here keeps
metadata or tags: a copy is verified by re-hashing it (:attr:`VerifyMethod.REHASH`).
"""

from __future__ import annotations

import base64
import builtins
import errno
import hashlib
import io
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cloudbackup.core.errors import (
    CloudBackupError,
    IntegrityError,
    NotFound,
    PermanentStorageError,
    TransientStorageError,
)
from cloudbackup.fs.dirs import TEMP_PREFIX, Dir, NotFollowed, check_name, walk_files, write_all
from cloudbackup.storage.base import (
    ObjectHead,
    ObjectInfo,
    PartInfo,
    ReadStream,
    SentParts,
    UploadInfo,
    UploadSpec,
    VerifyMethod,
    WriteProbe,
    checksums_match,
    composite_checksum,
    sha256_b64,
)
from cloudbackup.storage.parts import MultipartStore
from cloudbackup.storage.retry import ResumingReader, RetryPolicy

LOG = logging.getLogger("cloudbackup")
T = TypeVar("T")

#: Names starting with this are the store's own (temp files, uploads): never keys.
RESERVED = ".~"
UPLOAD_PREFIX = ".~upload-"
UPLOAD_NAME = "name"  # in an upload's directory: the file name of the object it makes
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_PART = re.compile(r"part-(\d{5})")
MAX_DEPTH = 16  # keys are <prefix>/<host>/<source>/<name>: deeper trees are not ours
CHUNK = 1024**2
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.EAGAIN,
    errno.EINTR,
    errno.EBUSY,
    errno.ENOTCONN,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ENETDOWN,
    errno.ENETUNREACH,
}


def part_name(number: int) -> str:
    return f"part-{number:05d}"


class DirectoryStore(MultipartStore):
    """A directory destination; ``root`` is the path of the ``file://`` URL."""

    where = "remote"
    verify_method = VerifyMethod.REHASH
    keeps_metadata = False

    def __init__(
        self,
        root: Path,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 4,
        part_size: int | None = None,
    ) -> None:
        self.root = root
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.part_size = part_size

    def describe(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    # -- plumbing

    def _error(self, exc: OSError, what: str, key: str) -> CloudBackupError:
        """An OSError as our error types: transient (a flaky disk or NAS), not found, or
        permanent with a code the callers know."""
        where = f"{self.describe(key)}: {what}"
        if isinstance(exc, NotFollowed):
            return PermanentStorageError(
                f"{where}: {exc.filename} is a symlink or not a directory",
                "nothing under the destination is ever followed through a link; remove it",
                code="NotFollowed",
            )
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"{where}: not found", code="NoSuchKey")
        if isinstance(exc, FileExistsError):
            return PermanentStorageError(f"{where}: exists already", code="PreconditionFailed")
        reason = exc.strerror or str(exc)
        if exc.errno in _TRANSIENT_ERRNOS:
            return TransientStorageError(f"{where}: {reason}")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return PermanentStorageError(
                f"{where}: {reason}",
                "check that the destination is mounted read-write and this user may write it",
                code="AccessDenied",
            )
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return PermanentStorageError(
                f"{where}: {reason}", "free space on the destination", code="NoSpace"
            )
        return PermanentStorageError(
            f"{where}: {reason}", code=errno.errorcode.get(exc.errno or 0, "OSError")
        )

    def _op(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """``fn`` under the retry policy, its OSErrors classified."""

        def attempt() -> T:
            try:
                return fn()
            except OSError as exc:
                raise self._error(exc, what, key) from exc

        return self.policy.call(f"{what} {key}", attempt)

    def _root(self) -> Dir:
        try:
            return Dir.root(self.root)
        except FileNotFoundError:
            raise PermanentStorageError(
                f"the destination directory {self.describe('')} does not exist",
                "mount the disk (or create the directory): it is never created, so that an "
                "unmounted mount point is not filled",
                code="NoSuchDestination",
            ) from None
        except NotADirectoryError:
            raise PermanentStorageError(
                f"the destination {self.describe('')} is not a directory",
                code="NoSuchDestination",
            ) from None

    @staticmethod
    def _split(key: str) -> tuple[list[str], str]:
        """A key's directories and file name, each component checked (never ``..``, never
        a name of the store's own)."""
        parts = key.split("/")
        try:
            for part in parts:
                check_name(part)
                if part.startswith(RESERVED):
                    raise ValueError(f"reserved name {part!r}")
        except ValueError as exc:
            raise PermanentStorageError(f"bad key {key!r}: {exc}", code="InvalidKey") from None
        return parts[:-1], parts[-1]

    def _parent(self, key: str, *, create: bool = False) -> tuple[Dir, str]:
        """The directory holding ``key`` (made when ``create``) and the key's file name."""
        dirs, name = self._split(key)
        with self._root() as root:
            return root.descend(dirs, create=create), name

    # -- objects

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(self._op("list", prefix, lambda: self._list(prefix)))

    def _prefix_dir(self, prefix: str) -> tuple[Dir | None, builtins.list[str], str]:
        """Where a listing of ``prefix`` starts: the directory of its complete components
        (None when there is none: nothing to list), those components, and the start of the
        names to list in it."""
        base, _, start = prefix.rpartition("/")
        try:
            dirs = [check_name(p) for p in base.split("/")] if base else []
        except ValueError:
            return None, [], start
        with self._root() as root:
            try:
                return root.descend(dirs), dirs, start
            except (FileNotFoundError, NotFollowed):
                return None, dirs, start

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        top, dirs, start = self._prefix_dir(prefix)
        if top is None:
            return []
        found = []
        with top:
            for rel, name, st in walk_files(
                top,
                max_depth=MAX_DEPTH,
                skip=lambda depth, n: (
                    n.startswith(RESERVED) or (depth == 0 and not n.startswith(start))
                ),
            ):
                key = "/".join([*dirs, *rel, name])
                found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        return sorted(found, key=lambda o: o.key)

    def head(self, key: str) -> ObjectHead | None:
        def head() -> ObjectHead | None:
            try:
                parent, name = self._parent(key)
            except (FileNotFoundError, NotFollowed):
                return None
            with parent:
                st = parent.lstat(name)
            if st is None or not _regular(st):
                return None  # a symlink or anything else planted there is not an object
            return ObjectHead(key=key, size=st.st_size)

        return self._op("head", key, head)

    def open(self, key: str, *, size: int | None = None) -> ReadStream:
        """The file, streamed; a transient read error reopens it at the offset reached."""
        what = f"read {key}"

        def opener(offset: int) -> _FileBody:
            try:
                parent, name = self._parent(key)
                with parent:
                    handle = parent.open_file(name)
                handle.seek(offset)
            except OSError as exc:
                raise self._error(exc, "read", key) from exc
            return _FileBody(handle, lambda exc: self._error(exc, "read", key))

        return ResumingReader(opener, self.policy, what)

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            parent, name = self._parent(key)
            with parent:
                return parent.read_file(name)

        return self._op("read", key, get)

    def put_bytes(self, key: str, data: bytes, *, spec: UploadSpec | None = None) -> None:
        self._put_whole(key, data, spec or UploadSpec())

    def _put_whole(self, key: str, data: bytes, spec: UploadSpec) -> str | None:
        def put() -> None:
            parent, name = self._parent(key, create=True)
            with parent:
                parent.write_atomic(name, data)

        self._op("write", key, put)
        return None

    def delete(self, key: str) -> None:
        def delete() -> None:
            try:
                parent, name = self._parent(key)
            except FileNotFoundError:
                return
            with parent:
                parent.unlink(name)
                parent.fsync()

        self._op("delete", key, delete)

    # -- multipart

    def _upload_dir(self, parent: Dir, name: str, upload_id: str) -> Dir:
        """An upload's directory, checked to be the upload of ``name``; NoSuchUpload else."""
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise PermanentStorageError(f"no upload {upload_id!r}", code="NoSuchUpload")
        try:
            directory = parent.sub(UPLOAD_PREFIX + upload_id)
        except (FileNotFoundError, NotFollowed):
            raise PermanentStorageError(
                f"{self.describe(name)}: no upload {upload_id[:12]}…", code="NoSuchUpload"
            ) from None
        try:
            owner = directory.read_file(UPLOAD_NAME, limit=4096).decode("utf-8", "replace")
        except OSError:
            owner = ""
        if owner.strip() != name:
            directory.close()
            raise PermanentStorageError(
                f"{self.describe(name)}: upload {upload_id[:12]}… is not this object's",
                code="NoSuchUpload",
            )
        return directory

    def create_upload(self, key: str, spec: UploadSpec) -> str:
        upload_id = secrets.token_hex(16)

        def create() -> None:
            parent, name = self._parent(key, create=True)
            with parent, parent.sub(UPLOAD_PREFIX + upload_id, create=True) as upload:
                upload.write_atomic(UPLOAD_NAME, (name + "\n").encode())
                parent.fsync()

        self._op("create upload", key, create)
        return upload_id

    def _put_part(
        self, key: str, upload_id: str, number: int, data: bytes, checksum: str, label: str
    ) -> str:
        def put() -> None:
            parent, name = self._parent(key)
            with parent, self._upload_dir(parent, name, upload_id) as upload:
                upload.write_atomic(part_name(number), data, replace=True)  # a re-sent part

        self._op(f"write {label}", "", put)
        return checksum

    def list_parts(self, key: str, upload_id: str) -> builtins.list[PartInfo]:
        """Each part, hashed from what is on disk (proof enough to reuse it)."""

        def parts() -> builtins.list[PartInfo]:
            try:
                parent, name = self._parent(key)
            except (FileNotFoundError, NotFollowed):
                raise PermanentStorageError(
                    f"no upload {upload_id!r}", code="NoSuchUpload"
                ) from None
            found = []
            with parent, self._upload_dir(parent, name, upload_id) as upload:
                for entry, st in upload.entries():
                    match = _PART.fullmatch(entry)
                    if match is None or not _regular(st):
                        continue
                    digest = sha256_b64(upload.read_file(entry))
                    number = int(match.group(1))
                    found.append(PartInfo(number, st.st_size, digest, digest))
            return sorted(found, key=lambda p: p.number)

        return self._op("list parts of", key, parts)

    def _complete(self, key: str, sent: SentParts) -> tuple[str | None, str | None]:
        def complete() -> str:
            parent, name = self._parent(key)
            with parent:
                if parent.lstat(name) is not None:
                    raise FileExistsError(errno.EEXIST, "exists", name)
                with self._upload_dir(parent, name, sent.upload_id) as upload:
                    digest = self._concatenate(parent, upload, name, sent, key)
                    try:
                        _remove_upload(parent, upload, sent.upload_id)
                    except OSError as exc:  # the object is complete: a leftover is no failure
                        LOG.warning(
                            "cannot remove the parts of the finished upload of %s: %s",
                            self.describe(key),
                            exc.strerror or exc,
                        )
                parent.fsync()
            return digest

        return None, self._op("complete upload", key, complete)

    def _concatenate(self, parent: Dir, upload: Dir, name: str, sent: SentParts, key: str) -> str:
        """The parts, in order, into a temp file published as ``name`` (no overwrite); each
        part must still hash to the checksum recorded when it was sent. The SHA-256 (hex)
        of the whole."""
        whole = hashlib.sha256()
        temp, fd = parent.create_temp()
        try:
            try:
                for number in range(1, sent.count + 1):
                    part = hashlib.sha256()
                    with upload.open_file(part_name(number)) as handle:
                        while chunk := handle.read(CHUNK):
                            part.update(chunk)
                            whole.update(chunk)
                            write_all(fd, chunk)
                    if _b64(part) != sent.checksums[number]:
                        raise IntegrityError(
                            f"{self.describe(key)}: part {number} changed on the destination "
                            "after it was written; nothing was published"
                        )
                os.fsync(fd)
            finally:
                os.close(fd)
            parent.publish(temp, name)
        except BaseException:
            parent.unlink(temp)
            raise
        return whole.hexdigest()

    def abort(self, key: str, upload_id: str) -> None:
        def abort() -> None:
            try:
                parent, name = self._parent(key)
            except (FileNotFoundError, NotFollowed):
                return
            with parent:
                try:
                    upload = self._upload_dir(parent, name, upload_id)
                except PermanentStorageError:
                    return  # gone already (or never this object's)
                with upload:
                    _remove_upload(parent, upload, upload_id)
                parent.fsync()

        self._op("abort upload", key, abort)

    def list_uploads(self, prefix: str) -> builtins.list[UploadInfo]:
        return self._op("list uploads", prefix, lambda: self._list_uploads(prefix))

    def _list_uploads(self, prefix: str) -> builtins.list[UploadInfo]:
        top, dirs, start = self._prefix_dir(prefix)
        if top is None:
            return []

        def skip(depth: int, name: str) -> bool:
            if name.startswith(UPLOAD_PREFIX):
                return False
            return name.startswith(RESERVED) or (depth == 0 and not name.startswith(start))

        uploads = []
        with top:
            for rel, name, st in walk_files(top, max_depth=MAX_DEPTH, skip=skip):
                if not rel or name != UPLOAD_NAME or not rel[-1].startswith(UPLOAD_PREFIX):
                    continue
                upload_id = rel[-1][len(UPLOAD_PREFIX) :]
                try:
                    with top.descend(rel) as upload:
                        target = upload.read_file(UPLOAD_NAME, limit=4096).decode().strip()
                    check_name(target)
                except (OSError, ValueError):
                    continue  # not an upload of ours
                key = "/".join([*dirs, *rel[:-1], target])
                if _UPLOAD_ID.fullmatch(upload_id) and key.startswith(prefix):
                    initiated = datetime.fromtimestamp(st.st_mtime, UTC)
                    uploads.append(UploadInfo(key, upload_id, initiated))
        return sorted(uploads, key=lambda u: (u.key, u.upload_id))

    def probe_write(self, key: str, spec: UploadSpec) -> WriteProbe:
        """Create, fsync and remove a temp file in the deepest directory of ``key``'s that
        exists (nothing is created on the way: a probe leaves nothing behind)."""

        def probe() -> None:
            dirs, _ = self._split(key)
            with self._root() as root:
                current = root.descend([])
                try:
                    for name in dirs:
                        try:
                            child = current.sub(name)
                        except FileNotFoundError:
                            break
                        current.close()
                        current = child
                    temp, fd = current.create_temp()
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                        current.unlink(temp)
                finally:
                    current.close()

        self._op("write probe", key, probe)
        return WriteProbe("a temp file created, fsynced and removed")

    # -- what the multipart engine asks

    def _holds(
        self, head: ObjectHead, size: int, checksum: str, part_size: int, spec: UploadSpec
    ) -> bool:
        """Re-hash the file: the same parts (or the same whole, for one part)?"""
        if head.size != size:
            return False

        def rehash() -> str:
            parent, name = self._parent(head.key)
            with parent, parent.open_file(name) as handle:
                if "-" not in checksum:
                    digest = hashlib.sha256()
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)
                    return _b64(digest)
                parts = []
                while True:
                    data = handle.read(part_size)
                    if not data:
                        break
                    parts.append(sha256_b64(data))
                return composite_checksum(parts or [sha256_b64(b"")])

        return checksums_match(checksum, self._op("read", head.key, rehash))


class _FileBody:
    """A file of the destination read as a body: OSErrors become our error types."""

    def __init__(self, handle: io.FileIO, error: Callable[[OSError], CloudBackupError]) -> None:
        self.handle, self.error = handle, error

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self.handle.read(size) or b""
        except OSError as exc:
            raise self.error(exc) from exc

    def close(self) -> None:
        self.handle.close()


def _regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _b64(digest: Any) -> str:
    """A hashlib object's digest in base64, as S3 writes checksums."""
    return base64.b64encode(digest.digest()).decode()


def _remove_upload(parent: Dir, upload: Dir, upload_id: str) -> None:
    """Remove an upload's files (parts, name, leftover temp files), then its directory."""
    for entry, _ in upload.entries():
        if entry == UPLOAD_NAME or _PART.fullmatch(entry) or entry.startswith(TEMP_PREFIX):
            upload.unlink(entry)
    parent.rmdir(UPLOAD_PREFIX + upload_id)
