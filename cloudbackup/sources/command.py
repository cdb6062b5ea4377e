"""Command sources: a command's standard output, spooled then archived."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping
from typing import Any, ClassVar

from cloudbackup.core import childenv
from cloudbackup.core.errors import SourceError
from cloudbackup.core.model import Exactly, MemberSchema
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import Entries, RestoreAs, Source, SourceContext
from cloudbackup.sources.process import run_to_file


class CommandSource(Source):
    """A command's standard output, run without a shell, spooled then archived.

    The command gets ``env`` (the CLI's scrubbed environment), never this process's own."""

    kind = "command"
    scheme_prefixes = ("cmd:",)
    #: Tells restore which member holds the command's output.
    member_schema: ClassVar[MemberSchema] = {"output": Exactly("{source}.out")}
    restore_as = RestoreAs.FILE

    @classmethod
    def claims(cls, raw: str) -> bool:
        return raw.startswith("cmd:")

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        try:
            argv = shlex.split(raw[4:])
        except ValueError as exc:
            raise ValueError(f"cannot split the command: {exc}") from None
        if not argv:
            raise ValueError("cmd: needs a command, e.g. shop=cmd:mysqldump shop")
        if name is None:
            raise ValueError("a command source needs a name: NAME=cmd:...")
        return ""

    @classmethod
    def restore_member(cls, source: str, members: Mapping[str, Any]) -> str | None:
        return f"{source}.out"

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.spec.spec[4:])

    @property
    def member_name(self) -> str:
        return f"{self.name}.out"

    def check(self) -> str:
        program = self.argv[0]
        # The PATH the command will run with (the scrubbed environment's), not ours.
        if shutil.which(program, path=self.env.get("PATH") or os.defpath) is None:
            raise SourceError(
                f"source {self.name}: command {program!r} not found", "install it or fix PATH"
            )
        return f"command {program}"

    def entries(self, ctx: SourceContext) -> Entries:
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
            return {"output": self.member_name}
        finally:
            spool.unlink(missing_ok=True)
