"""Command sources: a command's standard output, spooled then archived."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import Source, SourceContext, SourceSpec
from cloudbackup.sources.process import run_to_file


class CommandSource(Source):
    """A command's standard output, run without a shell, spooled then archived.

    The command gets ``env`` (the CLI's scrubbed environment), never this process's own."""

    kind = "command"

    def __init__(self, spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> None:
        super().__init__(spec)
        self.env = env

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.spec.spec[4:])

    @property
    def member_name(self) -> str:
        return f"{self.name}.out"

    def manifest_members(self) -> dict[str, Any]:
        """Tells restore which member holds the command's output."""
        return {"output": self.member_name}

    def check(self) -> str:
        program = self.argv[0]
        # The PATH the command will run with (the scrubbed environment's), not ours.
        if shutil.which(program, path=self.env.get("PATH") or os.defpath) is None:
            raise SourceError(
                f"source {self.name}: command {program!r} not found", "install it or fix PATH"
            )
        return f"command {program}"

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        spool = ctx.spool_dir / f"{ctx.backup_id}.out.partial"
        try:
            run_to_file(
                self.argv,
                spool,
                ctx,
                label=f"source {self.name}: command {self.argv[0]!r}",
                env=childenv.build(self.env),
            )
            yield FileEntry(str(spool), self.member_name, os.lstat(spool))
        finally:
            spool.unlink(missing_ok=True)
