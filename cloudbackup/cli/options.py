"""Options that several commands share, declared once (the same name means the same thing
everywhere); a command's own options stay beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

WHERE = click.Choice(["local", "remote", "all"])

#: ``--json``: one JSON document on stdout, nothing else there (the command's ``as_json``).
as_json = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
#: ``--source NAME``: only this source's backups.
only_source = click.option("--source", help="Only this source.")
#: ``--host H``: the backups of another host (read: list, verify, prune, forget).
backups_of_host = click.option("--host", help="Backups of this host.")


def where(default: str) -> Callable[[F], F]:
    """``--where local|remote|all``: which copies."""
    return click.option("--where", type=WHERE, default=default, show_default=True)
