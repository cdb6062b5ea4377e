"""The command line: Click commands over the use cases; ``main`` maps errors to exit codes."""

from cloudbackup.cli.commands import cli, main

__all__ = ["cli", "main"]
