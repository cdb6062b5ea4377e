"""Glob sources: the files under a pattern's fixed prefix that match it, with their parent
directories."""

from __future__ import annotations

import os
from collections.abc import Mapping

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.core.patterns import compile_glob, has_wildcard, split_glob
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
            return os.stat(os.path.realpath(self.base)).st_dev
        except OSError:
            return None

    def check(self) -> str:
        if not os.path.isdir(self.base):
            raise SourceError(
                f"source {self.name}: {self.base} does not exist", "check the glob's directory"
            )
        return f"glob {self.pattern} under {self.base}"

    def entries(self, ctx: SourceContext) -> Entries:
        yield from walk_tree(
            os.path.realpath(self.base), ctx, select=lambda rel: bool(self.regex.fullmatch(rel))
        )
        return {}
