"""Every command is documented in the README and answers --help."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cloudbackup.cli.commands import cli
from tests.test_cli_backup import _command_paths as command_paths

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_command_is_in_the_readme_and_has_help() -> None:
    commands = [" ".join(path) for path in command_paths(cli) if path]
    assert {
        "backup",
        "upload",
        "list",
        "verify",
        "restore",
        "prune",
        "run",
        "status",
        "check",
        "iam render",
    } <= set(commands)
    runner = CliRunner()
    for name in commands:
        assert f"`{name}" in README, f"README does not document `{name}`"
        result = runner.invoke(cli, [*name.split(), "--help"])
        assert result.exit_code == 0, name
        assert "Usage:" in result.output


def test_every_variable_is_in_the_readme_and_env_example() -> None:
    from cloudbackup.config import EXTRA_VARIABLES, KNOWN_VARIABLES

    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    for var in KNOWN_VARIABLES:
        assert f"`{var}`" in README, var
        assert var in example, var
    for var in EXTRA_VARIABLES:  # tuning knobs: documented in README, not in the example
        assert f"`{var}`" in README, var
