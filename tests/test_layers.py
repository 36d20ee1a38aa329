"""Imports go one way: entry points → adapters → core → rules, never upward.

Every import of every module counts, also one inside a function or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# highest first: a package may import its own modules and those of any package below it
LAYERS = ["antifraud", "tools", "adapters", "dispatcher", "rules"]
RANK = {package: len(LAYERS) - i for i, package in enumerate(LAYERS)}

# what only adapters may use: the core and the rules do no IO of their own
IO_LIBRARIES = {"aiomqtt", "paho", "aiosqlite", "sqlite3", "aiohttp", "amqtt", "socket", "ssl"}


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward(package: str, source: str) -> list[str]:
    """The imports of ``source``, a module of ``package``, that reach a higher layer."""
    return [
        f"line {line}: {module}"
        for line, module in imported(source)
        if RANK.get(module.partition(".")[0], 0) > RANK[package]
    ]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


class TestTheCheckItself:
    def test_an_import_of_a_higher_layer_is_found_wherever_it_is(self) -> None:
        source = (
            "from dispatcher.model import Incident\n"
            "def f():\n"
            "    import adapters.store\n"
            "    from antifraud import bootstrap\n"
        )
        assert upward("dispatcher", source) == [
            "line 3: adapters.store",
            "line 4: antifraud",
        ]

    def test_an_import_of_the_same_or_a_lower_layer_is_not(self) -> None:
        source = "import rules\nfrom adapters.store import Store\nfrom dispatcher import logs\n"
        assert upward("adapters", source) == []

    def test_every_layer_has_modules(self) -> None:
        assert all(modules(package) for package in LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_no_module_imports_a_layer_above_its_own(package: str) -> None:
    found = {
        str(path.relative_to(ROOT)): bad
        for path in modules(package)
        if (bad := upward(package, path.read_text(encoding="utf-8")))
    }
    assert found == {}


@pytest.mark.parametrize("package", ["dispatcher", "rules"])
def test_the_core_and_the_rules_use_no_io_library(package: str) -> None:
    found = {
        str(path.relative_to(ROOT)): used
        for path in modules(package)
        if (
            used := sorted(
                module
                for _, module in imported(path.read_text(encoding="utf-8"))
                if module.partition(".")[0] in IO_LIBRARIES
            )
        )
    }
    assert found == {}
