"""The source kinds by name, and the one function that makes a source of a spec."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cloudbackup.core import childenv
from cloudbackup.sources.base import Source, SourceSpec
from cloudbackup.sources.command import CommandSource
from cloudbackup.sources.directory import DirectorySource
from cloudbackup.sources.glob import GlobSource
from cloudbackup.sources.postgres import PostgresSource
from cloudbackup.sources.sqlite import SQLiteSource


def make_source(spec: SourceSpec, *, env: Mapping[str, str] = childenv.NO_ENV) -> Source:
    """The source a spec names. ``env`` is the base environment of the programs a source
    runs (``Settings.child_env``); sources that run none do not get it."""
    factories: dict[str, Callable[[SourceSpec], Source]] = {
        "directory": DirectorySource,
        "glob": GlobSource,
        "sqlite": SQLiteSource,
        "postgresql": lambda s: PostgresSource(s, env=env),
        "command": lambda s: CommandSource(s, env=env),
    }
    return factories[spec.kind](spec)
