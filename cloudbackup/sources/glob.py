"""Glob sources: the files under a pattern's fixed prefix that match it, with their parent
directories."""

from __future__ import annotations

import os
from collections.abc import Iterator

from cloudbackup.core.errors import SourceError
from cloudbackup.core.patterns import compile_glob, split_glob
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import Source, SourceContext, SourceSpec
from cloudbackup.sources.directory import walk_tree


class GlobSource(Source):
    kind = "glob"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
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

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        yield from walk_tree(
            os.path.realpath(self.base), ctx, select=lambda rel: bool(self.regex.fullmatch(rel))
        )
