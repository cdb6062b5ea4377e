"""Options that several commands share, declared once: one name, one meaning everywhere. A
command's own options stay beside it.

``--host`` has two meanings, so two decorators: :data:`backups_of_host` (read another
host's backups: list, verify, restore, prune, forget) and :data:`act_as_host` (write as
that host: an explicit claim, allowed under another machine's claim: upload, run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])



class Where(click.Choice):
    """``local|remote|all``; ``both`` (the word ``list`` shows) is taken for ``all``."""

    def __init__(self) -> None:
        super().__init__(["local", "remote", "all"])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "both":
            value = "all"
        return super().convert(value, param, ctx)


WHERE = Where()

#: ``--json``: one JSON document on stdout, nothing else there (the command's ``as_json``).
as_json = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
_SOURCE_HELP = "Only the source of this name."
#: ``--source NAME``: only this source's backups.
only_source = click.option("--source", metavar="NAME", help=_SOURCE_HELP)
#: ``--source NAME``, repeatable: only these configured sources (``backup``, ``run``).
sources = click.option("--source", "sources", multiple=True, metavar="NAME", help=_SOURCE_HELP)
#: ``--host H``: the backups of another host (this machine's by default).
backups_of_host = click.option("--host", help="Backups of this host (default: this machine's).")
#: ``--host H``: act as that host, an explicit claim (allowed under another machine's claim).
act_as_host = click.option(
    "--host", help="Act as this host (explicit: allowed under another machine's claim)."
)
#: ``--all-hosts``: every host sharing the bucket (a central pruner or monitor).
all_hosts = click.option("--all-hosts", is_flag=True, help="Every host sharing the bucket.")
#: ``--dry-run``: build the plan and print it; change nothing.
dry_run = click.option("--dry-run", is_flag=True, help="Print the plan; write or delete nothing.")
#: ``--allow-shrink``: let a source the shrink guard would stop through, once.
allow_shrink = click.option(
    "--allow-shrink", is_flag=True, help="Accept a source the shrink guard would stop, once."
)

#: ``--full``: every directory and glob source backed up in full (a new chain starts).
full = click.option(
    "--full", is_flag=True, help="Back up directory and glob sources in full (a new chain)."
)


def where(default: str) -> Callable[[F], F]:
    """``--where local|remote|all``: which copies."""
    return click.option("--where", type=WHERE, default=default, show_default=True)
