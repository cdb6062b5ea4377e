"""The local store: ``<local_dir>/<host>/<source>/<files>``.

The local dir can be written by others: below its root nothing is ever reached through a
symlink (``fs.dirs``: every directory opened by descriptor with ``O_NOFOLLOW``), listings
report regular files only, and writes are atomic (a random temp name created with
``O_EXCL | O_NOFOLLOW``, fsync, publish, directory fsync), so a planted link can neither
redirect a write nor be read as one of ours.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from cloudbackup.core.errors import NotFound
from cloudbackup.fs.dirs import Dir, NotFollowed, check_name, walk_files
from cloudbackup.storage.base import ObjectHead, ObjectInfo

#: Keys are ``<host>/<source>/<name>``: the listing looks no deeper.
DEPTH = 2


class LocalStore:
    where = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def _split(key: str) -> tuple[list[str], str]:
        parts = key.split("/")
        try:
            for part in parts:
                check_name(part)
        except ValueError:
            raise ValueError(f"bad key {key!r}") from None
        return parts[:-1], parts[-1]

    def path(self, key: str) -> Path:
        """The path of ``key`` (for messages and for readers that open it ``O_NOFOLLOW``)."""
        dirs, name = self._split(key)
        return self.root.joinpath(*dirs, name)

    def directory(self, key: str, *, create: bool = False) -> Dir:
        """The directory ``key`` (``host/source``), opened component by component without
        following a symlink, made when ``create`` (the local dir itself too). Raises
        FileNotFoundError, or ``NotFollowed`` for a symlink planted in its place."""
        dirs = key.split("/") if key else []
        with Dir.root(self.root, create=create) as root:
            return root.descend(dirs, create=create)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every regular file below ``prefix`` (a directory key, or ``""``); the local dir's
        own top-level entries (the lock, ``.state``, ``.machine-id``) are skipped, and so
        is anything reached through a link."""
        dirs = prefix.split("/") if prefix else []
        try:
            top = self.directory(prefix)
        except (FileNotFoundError, NotADirectoryError, NotFollowed, ValueError):
            return

        def skip(depth: int, name: str) -> bool:
            return not dirs and depth == 0 and name.startswith(".")

        with top:
            for rel, name, st in walk_files(top, max_depth=max(DEPTH - len(dirs), 0), skip=skip):
                if not dirs and not rel:
                    continue  # a file at the top of the local dir is not a backup
                key = "/".join([*dirs, *rel, name])
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def head(self, key: str) -> ObjectHead | None:
        dirs, name = self._split(key)
        try:
            parent = self.directory("/".join(dirs))
        except (FileNotFoundError, NotFollowed):
            return None
        with parent:
            st = parent.lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return ObjectHead(key=key, size=st.st_size)

    def open(self, key: str) -> io.FileIO:
        """A regular file of the local dir, reached without following any link."""
        dirs, name = self._split(key)
        try:
            with self.directory("/".join(dirs)) as parent:
                return parent.open_file(name)
        except FileNotFoundError:
            raise NotFound(f"{self.path(key)} does not exist") from None

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def put_bytes(self, key: str, data: bytes, *, replace: bool = False, mode: int = 0o600) -> None:
        """Write ``key`` atomically; an existing file is replaced only with ``replace``
        (FileExistsError otherwise)."""
        dirs, name = self._split(key)
        with self.directory("/".join(dirs), create=True) as parent:
            parent.write_atomic(name, data, mode=mode, replace=replace)

    def delete(self, key: str) -> None:
        dirs, name = self._split(key)
        try:
            parent = self.directory("/".join(dirs))
        except FileNotFoundError:
            return
        with parent:
            parent.unlink(name)
            parent.fsync()
