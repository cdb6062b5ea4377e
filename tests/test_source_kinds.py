"""Kinds of source are classes: a new kind is one module and one registry line.

A kind defined here (``notes=note:TEXT``: a one-file source) is registered the way a new
module would be, and goes through backup, list, verify and restore without any other
module knowing its name. And no module outside ``cloudbackup/sources/`` switches on a kind
name.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cloudbackup.core.errors import SourceError
from cloudbackup.core.model import Count, MemberSchema
from cloudbackup.fs.files import create_private
from cloudbackup.fs.walk import FileEntry
from cloudbackup.sources import registry
from cloudbackup.sources.base import Entries, RestoreAs, Source, SourceContext
from tests.conftest import CliResult, Env

PACKAGE = Path(__file__).resolve().parent.parent / "cloudbackup"


class NoteSource(Source):
    """``NAME=note:TEXT``: one file holding TEXT and a newline."""

    kind = "note"
    scheme_prefixes = ("note:",)
    member_schema: ClassVar[MemberSchema] = {"lines": Count()}
    restore_as = RestoreAs.FILE

    @classmethod
    def claims(cls, raw: str) -> bool:
        return raw.startswith("note:")

    @classmethod
    def parse(cls, raw: str, name: str | None) -> str:
        if name is None:
            raise ValueError("a note needs a name: NAME=note:TEXT")
        return ""

    @classmethod
    def restore_member(cls, source: str, members: Mapping[str, Any]) -> str | None:
        return f"{source}.txt"

    def check(self) -> str:
        if not self.spec.spec[len("note:") :]:
            raise SourceError(f"source {self.name}: an empty note")
        return "a note"

    def entries(self, ctx: SourceContext) -> Entries:
        spool = ctx.spool_dir / f"{ctx.backup_id}.txt.partial"
        try:
            create_private(spool)
            spool.write_text(self.spec.spec[len("note:") :] + "\n")
            yield FileEntry(str(spool), f"{self.name}.txt", os.lstat(spool))
            return {"lines": 1}
        finally:
            spool.unlink(missing_ok=True)


@pytest.fixture
def note_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the kind as its module would: one line in the registry, before the last
    kind (a spec nobody else claims is a directory)."""
    monkeypatch.setattr(registry, "KINDS", {"note": NoteSource, **registry.KINDS})


def test_a_new_kind_backs_up_lists_verifies_and_restores(
    note_kind: None, env: Env, cli: Callable[..., CliResult]
) -> None:
    backed = cli("backup", "--json", "memo=note:remember the milk")
    assert backed.exit_code == 0, backed.stderr
    (manifest_path,) = env.manifests("memo")
    manifest = registry.parse_manifest(manifest_path.read_bytes(), _ref(manifest_path))
    assert (manifest.kind, manifest.members["lines"], manifest.file_count) == ("note", 1, 1)

    listed = cli("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert "memo-" in listed.stdout
    verified = cli("verify", "--deep")
    assert verified.exit_code == 0, verified.stderr

    target = env.tmp / "restored.txt"
    restored = cli("restore", "memo", "--to", target)
    assert restored.exit_code == 0, restored.stderr
    assert target.read_text() == "remember the milk\n"
    to_stdout = cli("restore", "memo", "--to", "-")
    assert to_stdout.exit_code == 0, to_stdout.stderr
    assert to_stdout.stdout == "remember the milk\n"


def test_an_unregistered_kind_in_a_manifest_is_an_integrity_failure(
    note_kind: None, env: Env, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("backup", "memo=note:x").exit_code == 0
    kinds = dict(registry.KINDS)
    del kinds["note"]
    monkeypatch.setattr(registry, "KINDS", kinds)  # a tool that does not know the kind
    result = cli("restore", "memo", "--to", env.tmp / "x.txt")
    assert result.exit_code == 3
    result.assert_one_error("unknown source kind 'note'")


def _ref(manifest_path: Path) -> Any:
    from cloudbackup.core.model import manifest_ref

    return manifest_ref("/".join(manifest_path.parts[-3:]))


# ---------------------------------------------------------------- no kind switches elsewhere


def _kind_names() -> set[str]:
    return set(registry.KINDS)


def _compared_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are compared with ``==``/``!=``/``in`` (alone or in a tuple,
    list or set), or that key a dict lookup: the shapes a kind switch takes."""
    found: list[tuple[int, str]] = []

    def strings(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return [e.value for e in node.elts if isinstance(e, ast.Constant)]
        return []

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                found += [(node.lineno, s) for s in strings(part)]
        elif isinstance(node, ast.Subscript):
            found += [(node.lineno, s) for s in strings(node.slice)]
    return found


def test_no_module_outside_sources_switches_on_a_kind_name() -> None:
    kinds = _kind_names()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "sources") in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, text in _compared_strings(tree):
            if text in kinds:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert not offenders, "kind switches outside cloudbackup/sources/:\n" + "\n".join(offenders)


def test_the_switch_finder_finds_switches() -> None:
    code = 'if kind == "sqlite": pass\nif s.kind in ("directory", "glob"): pass\nx = t["command"]\n'
    assert [text for _line, text in _compared_strings(ast.parse(code))] == [
        "sqlite",
        "directory",
        "glob",
        "command",
    ]
