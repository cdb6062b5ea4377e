"""The shape of the package: no import cycle anywhere, every module importable alone.

The layers themselves are import-linter contracts (pyproject.toml, run by scripts/test);
these checks cover what they do not: a cycle between two modules of different packages
through imports inside functions, and a module that only imports because another one was
imported first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def _graph() -> grimp.ImportGraph:
    # Every import counts: at the top, inside functions and under TYPE_CHECKING.
    return grimp.build_graph("cloudbackup", exclude_type_checking_imports=False)


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    found = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                found.add(tuple(sorted(set(chain))))
    return sorted(found)


def test_no_import_cycle_between_any_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert _cycles(graph) == []
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [("pkg.a", "pkg.b", "pkg.c")]


def test_every_module_imports_alone() -> None:
    """Each module in a fresh import state (no other cloudbackup module loaded before it)."""
    modules = sorted(m for m in _graph().modules if m != "cloudbackup.__main__")
    script = (
        "import importlib, sys\n"
        f"failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('cloudbackup')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", out.stdout
    assert len(modules) > 50


# ---------------------------------------------------------------- function length

LONG = 80  # lines, decorators and docstring included


def _long_functions(source: str) -> list[tuple[str, int]]:
    """Functions over ``LONG`` lines without a ``# Long: <reason>`` line right above them."""
    lines = source.split("\n")
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = (node.end_lineno or start) - start + 1
            above = lines[start - 2].strip() if start >= 2 else ""
            if length > LONG and not above.startswith("# Long: "):
                found.append((node.name, length))
    return found


def test_no_function_is_long_without_a_reason() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name} ({length} lines)"
        for path in sorted((ROOT / "cloudbackup").rglob("*.py"))
        for name, length in _long_functions(path.read_text())
    ]
    assert offenders == []


def test_the_length_check_finds_long_functions() -> None:
    body = "".join(f"    x = {i}\n" for i in range(LONG))
    assert _long_functions(f"def f():\n{body}") == [("f", LONG + 1)]
    assert _long_functions(f"# Long: a table\ndef f():\n{body}") == []
    assert _long_functions("def f():\n    return 1\n") == []
