"""The kinds of source, by name: the one table, and what is made from it (parsing a spec,
making a source, the member schemas manifests are checked against).

Adding a kind is one module defining a ``Source`` subclass and one line here. The order is
the order in which kinds are asked whether a spec is theirs (``Source.claims``): kinds named
by a scheme first, then globs, and directories last (a spec nobody else claims is a path).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cloudbackup.core import childenv
from cloudbackup.core.model import BackupRef, Manifest, MemberSchema, valid_name
from cloudbackup.core.model import parse_manifest as _parse_manifest
from cloudbackup.sources.base import Source, SourceSpec
from cloudbackup.sources.command import CommandSource
from cloudbackup.sources.directory import DirectorySource
from cloudbackup.sources.glob import GlobSource
from cloudbackup.sources.postgres import PostgresSource
from cloudbackup.sources.sqlite import SQLiteSource

KINDS: dict[str, type[Source]] = {
    "sqlite": SQLiteSource,
    "postgresql": PostgresSource,
    "command": CommandSource,
    "glob": GlobSource,
    "directory": DirectorySource,
}

_NAMED_RE = re.compile(r"^([A-Za-z0-9._-]+)=(.+)$", re.DOTALL)


def kind_of(name: str) -> type[Source]:
    """The class of a kind a (parsed) manifest names."""
    return KINDS[name]


def member_schemas() -> dict[str, MemberSchema]:
    """Every kind's member schema, for ``core.model.parse_manifest``."""
    return {name: cls.member_schema for name, cls in KINDS.items()}


def parse_manifest(raw: bytes | str, ref: BackupRef) -> Manifest:
    """``core.model.parse_manifest`` against the kinds known here."""
    return _parse_manifest(raw, ref, member_schemas())


def parse_spec(text: str) -> SourceSpec:
    """Parse ``[name=]spec``; raise ValueError with a reason a person can act on."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty source spec")
    name: str | None = None
    match = _NAMED_RE.match(raw)
    prefixes = tuple(p for cls in KINDS.values() for p in cls.scheme_prefixes)
    if match and not raw.startswith(prefixes):
        name, raw = match[1], match[2].strip()
    kinds = list(KINDS.values())
    cls = next((k for k in kinds[:-1] if k.claims(raw)), kinds[-1])
    default = cls.parse(raw, name)
    name = name or default
    if not valid_name(name):
        raise ValueError(
            f"source name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(give one with NAME=spec)"
        )
    return SourceSpec(name, cls.kind, raw, cls.redact(raw), cls.secrets_of(raw))


def make_source(spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> Source:
    """The source a spec names. ``env`` is the base environment of the programs a source
    runs (``Settings.child_env``)."""
    return KINDS[spec.kind](spec, env=env)
