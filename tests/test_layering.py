"""The package's layers import downwards only: the library never reaches up into the command line, the data
layer never into the trainers, and the benchmarks use the library rather than the CLI's internals.

Checked on the source (every ``import`` statement, lazy ones inside functions included), so a forbidden import
fails here even if no test happens to execute the function that holds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement in ``source`` names, as absolute dotted
    names (relative imports resolved against ``package``, the dotted package the source lives in)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def offending(files: list[Path], forbidden: str) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(
            m
            for m in imported_modules(path.read_text(), package_of(path))
            if m == forbidden or m.startswith(forbidden + ".")
        )
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


LAYERS = [
    ("dalle/train", "dalle.cli"),
    ("dalle/data", "dalle.cli"),
    ("dalle/data", "dalle.train"),
    ("benchmarks", "dalle.cli"),
]


@pytest.mark.parametrize(("folder", "forbidden"), LAYERS, ids=[f"{f}-not-{m}" for f, m in LAYERS])
def test_a_layer_does_not_import_the_one_above(folder: str, forbidden: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    assert offending(files, forbidden) == {}


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    # the check above is only worth something if it catches an import inside a function, a relative one and
    # a plain ``import a.b``
    source = (
        "def main():\n    from ..cli import main as m\n    import dalle.cli.train\n    from . import dvae\n"
    )
    names = imported_modules(source, "dalle.train")
    assert {"dalle.cli", "dalle.cli.main", "dalle.cli.train", "dalle.train.dvae"} <= names
