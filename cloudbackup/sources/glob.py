"""Glob sources: the files under a pattern's fixed prefix that match it, with their parent
directories.

The fixed prefix is opened component by component from ``/`` without following a symlink
(``fs.tree.open_directory``) and the walk starts from that descriptor: a symlink anywhere
in the prefix fails the source with one line naming it. Unlike a directory source's root
(resolved once and recorded in the manifest), a glob's prefix is part of the pattern as
written: a link there, whoever swapped it in, would make the same pattern archive another
tree (``mv config config.old && ln -s /root-only config``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.core.patterns import compile_glob, has_wildcard, split_glob
from cloudbackup.fs.tree import LinkInPath, open_directory
from cloudbackup.sources.base import Entries, SourceContext, SourceSpec
from cloudbackup.sources.tree import TreeSource, walk_tree


class GlobSource(TreeSource):
    """The files matching a pattern, below the part of it before the first wildcard."""

    kind = "glob"

    @classmethod
    def claims(cls, raw: str) -> bool:
        return has_wildcard(raw)

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        if name is None:
            raise ValueError("a glob source needs a name: NAME=/path/**/*.conf")
        try:
            split_glob(raw)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return ""

    def __init__(self, spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> None:
        super().__init__(spec, env=env)
        self.base, self.pattern = split_glob(spec.spec)
        self.regex = compile_glob(self.pattern)

    def root_device(self) -> int | None:
        try:
            fd = open_directory(self.base)
        except OSError:
            return None
        try:
            return os.fstat(fd).st_dev
        finally:
            os.close(fd)

    def _open_base(self) -> int:
        """The fixed prefix, opened without following a symlink anywhere on the way."""
        try:
            return open_directory(self.base)
        except LinkInPath as exc:
            try:
                where = f" (to {os.readlink(exc.filename)})"
            except OSError:
                where = ""
            raise SourceError(
                f"source {self.name}: {exc.filename}{where} is a symlink in the glob's fixed "
                f"prefix {self.base}; it is never followed",
                "write the pattern with the real path (or back the tree up as a directory source)",
            ) from None
        except FileNotFoundError:
            raise SourceError(
                f"source {self.name}: {self.base} does not exist", "check the glob's directory"
            ) from None
        except NotADirectoryError as exc:
            raise SourceError(
                f"source {self.name}: {exc.filename} is not a directory", "check the glob"
            ) from None
        except OSError as exc:
            raise SourceError(
                f"source {self.name}: cannot open {exc.filename}: {exc.strerror}",
                "run as a user who can read it",
            ) from None

    def check(self) -> str:
        os.close(self._open_base())
        return f"glob {self.pattern} under {self.base}"

    def entries(self, ctx: SourceContext) -> Entries:
        fd = self._open_base()
        try:
            yield from walk_tree(
                self.base, ctx, select=lambda rel: bool(self.regex.fullmatch(rel)), root_fd=fd
            )
        finally:
            os.close(fd)
        return {}
