"""The local store: ``<local_dir>/<host>/<source>/<files>``; writes are atomic."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from cloudbackup.core.errors import NotFound
from cloudbackup.fs.files import fsync_dir, open_regular, write_file_atomic
from cloudbackup.storage.base import ObjectHead, ObjectInfo


class LocalStore:
    where = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"bad key {key!r}")
        return self.root.joinpath(*parts)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file below ``prefix`` (hidden top-level entries such as the lock skipped)."""
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        # os.walk's order and results, iteratively: os.walk recurses, and a deep tree
        # planted in the (untrusted) local dir must not stop listing.
        stack = [os.fspath(base)]
        while stack:
            dirpath = stack.pop()
            try:
                with os.scandir(dirpath) as it:
                    found = list(it)
            except OSError:
                continue
            rel = os.path.relpath(dirpath, self.root)
            filenames = [e.name for e in found if not _is_dir(e)]
            subdirs = [e.name for e in found if _is_dir(e) and not e.is_symlink()]
            if rel == ".":
                subdirs = [d for d in subdirs if not d.startswith(".")]
            else:
                subdirs.sort()
            stack.extend(os.path.join(dirpath, d) for d in reversed(subdirs))
            if rel == ".":
                continue
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # a symlink or special file planted in the local dir: never ours
                key = f"{rel.replace(os.sep, '/')}/{name}"
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def head(self, key: str) -> ObjectHead | None:
        try:
            st = self.path(key).lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectHead(key=key, size=st.st_size)

    def open(self, key: str) -> IO[bytes]:
        try:
            return open_regular(self.path(key))
        except FileNotFoundError:
            raise NotFound(f"{self.path(key)} does not exist") from None

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as handle:
            return handle.read()

    def put_bytes(self, key: str, data: bytes, *, kind: str = "manifest") -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, data)

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
