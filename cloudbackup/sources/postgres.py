"""PostgreSQL sources: ``pg_dump -Fc`` plus ``pg_dumpall --globals-only`` (the client tools
are driven by ``cloudbackup.sources.pgtools``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from cloudbackup.core import childenv
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources.base import Source, SourceContext, SourceSpec


class PostgresSource(Source):
    """``pg_dump -Fc`` plus ``pg_dumpall --globals-only``; see ``cloudbackup.sources.pgtools``."""

    kind = "postgresql"

    def __init__(self, spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> None:
        super().__init__(spec)
        self.env = env  # the base environment of pg_dump, pg_dumpall and psql
        self.dump_facts: dict[str, Any] = {}  # filled by the dump, recorded in the manifest

    def manifest_members(self) -> dict[str, Any]:
        return dict(self.dump_facts)

    def check(self) -> str:
        from cloudbackup.sources import pgtools as postgres

        return postgres.check_source(self)

    def entries(self, ctx: SourceContext) -> Iterator[FileEntry]:
        from cloudbackup.sources import pgtools as postgres

        yield from postgres.dump_entries(self, ctx)
