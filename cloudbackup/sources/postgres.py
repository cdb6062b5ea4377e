"""PostgreSQL sources: ``pg_dump -Fc`` plus ``pg_dumpall --globals-only`` (the client tools
are driven by ``cloudbackup.sources.pgtools``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import unquote

from cloudbackup.core.model import MemberSchema
from cloudbackup.sources import pgtools
from cloudbackup.sources.base import DbUrl, Entries, RestoreAs, Source, SourceContext


class PostgresSource(Source):
    """``pg_dump -Fc`` plus ``pg_dumpall --globals-only``; see ``cloudbackup.sources.pgtools``.

    The URL may hold a password: it is redacted from the parsed URL (the one value the
    connection uses too), and reaches the client programs only through a passfile."""

    kind = "postgresql"
    scheme_prefixes = ("postgres:", "postgresql:")
    member_schema: ClassVar[MemberSchema] = pgtools.POSTGRES_MEMBERS
    restore_as = RestoreAs.POSTGRESQL

    @classmethod
    def claims(cls, raw: str) -> bool:
        return raw.startswith(("postgresql://", "postgres://"))

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        if re.search(r"\s", raw):
            raise ValueError("a PostgreSQL URL cannot contain spaces (URL-encode them as %20)")
        url = DbUrl.parse(raw)  # its ValueError says what to encode, never the password
        dbname = unquote(url.path.lstrip("/"))
        if not dbname:
            raise ValueError("the URL names no database: use postgresql://user@host:5432/dbname")
        return dbname

    @classmethod
    def redact(cls, raw: str) -> str:
        return DbUrl.parse(raw).redacted

    @classmethod
    def secrets_of(cls, raw: str) -> tuple[str, ...]:
        return tuple(DbUrl.parse(raw).secrets)

    @classmethod
    def restore_member(cls, source: str, members: Mapping[str, Any]) -> str | None:
        dump = members.get("dump")
        return dump if isinstance(dump, str) else None

    def check(self) -> str:
        return pgtools.check_source(self.name, self.spec.spec, self.env)

    def entries(self, ctx: SourceContext) -> Entries:
        return (yield from pgtools.dump_entries(self.name, self.spec.spec, self.env, ctx))
