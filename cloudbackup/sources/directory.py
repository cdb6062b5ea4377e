"""Directory sources: a path (a top-level symlink is resolved once and the real path
recorded); everything below it, as the walk finds it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.sources.base import Entries, SourceContext, SourceSpec
from cloudbackup.sources.tree import TreeSource, walk_tree


class DirectorySource(TreeSource):
    """A directory. The registry's last kind: a spec no other kind claims is a path."""

    kind = "directory"
    scheme_prefixes = ("/",)

    @classmethod
    def claims(cls, raw: str) -> bool:
        return True

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        if "://" in raw:
            raise ValueError(
                "unknown scheme; use a path, sqlite:///..., postgresql://... or cmd:..."
            )
        return os.path.basename(os.path.normpath(raw))

    def __init__(self, spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> None:
        super().__init__(spec, env=env)
        # A top-level symlink is resolved once; the real path is recorded in the manifest.
        self.root = os.path.realpath(spec.spec)

    @property
    def real_path(self) -> str:
        return self.root

    def root_device(self) -> int | None:
        try:
            return os.stat(self.root).st_dev
        except OSError:
            return None

    def check(self) -> str:
        root = self.root
        if not os.path.exists(root):
            raise SourceError(
                f"source {self.name}: {self.spec.spec} does not exist", "check the path"
            )
        if not os.path.isdir(root):
            raise SourceError(f"source {self.name}: {root} is not a directory", "give a directory")
        if not os.access(root, os.R_OK | os.X_OK):
            raise SourceError(f"source {self.name}: {root} is not readable", "fix its permissions")
        return f"directory {root}"

    def entries(self, ctx: SourceContext) -> Entries:
        yield from walk_tree(self.root, ctx)
        return {}
