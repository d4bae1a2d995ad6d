"""Imports run one way: protocol <- transport <- worker / scheduler / client <- cli.

Read from the source with ``ast`` (nothing is imported), so a late import
inside a function counts as much as one at the top. Each layer names the
parts of the package it must not reach. Taking a name from the package root
(``from vaccelray import __version__``) counts as reaching the top: the root
re-exports the client API.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vaccelray"

UPPER = ("vaccelray.cli", "vaccelray.client", "vaccelray.scheduler", "vaccelray.worker")
FORBIDDEN = {
    "protocol": (*UPPER, "vaccelray.transport", "vaccelray.auth"),
    "transport": (*UPPER, "vaccelray.auth"),
    "worker": ("vaccelray.cli", "vaccelray.client", "vaccelray.scheduler"),
    "scheduler": ("vaccelray.cli", "vaccelray.client", "vaccelray.worker"),
}


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, name) of every import in *path*; ``from vaccelray import x`` gives ``vaccelray.x``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vaccelray":
                for alias in node.names:
                    yield node.lineno, f"vaccelray.{alias.name}"
            else:
                yield node.lineno, node.module


def is_module(package: Path, name: str) -> bool:
    path = package.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def violations(package: Path, layer: str) -> list[str]:
    found = []
    for path in sorted((package / layer).rglob("*.py")):
        if "_pb" in path.parts:
            continue
        where = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for line, name in imported(path):
            if not name.startswith("vaccelray"):
                continue
            wrong_way = any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer])
            if wrong_way or not is_module(package, name):
                found.append(f"{where}:{line} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_one_way(layer: str) -> None:
    assert violations(PACKAGE, layer) == []


def test_the_check_sees_wrong_way_imports(tmp_path: Path) -> None:
    """A positive control: the same walk over a tree with wrong-way imports finds each."""
    package = tmp_path / "vaccelray"
    for layer in ("protocol", "worker", "scheduler"):
        (package / layer).mkdir(parents=True)
    (package / "protocol" / "x.py").write_text(
        "def f():\n"
        "    from vaccelray.worker.agent import Agent\n"
        "    from vaccelray import __version__\n"
        "    from vaccelray.scheduler import proxy\n"
    )
    (package / "worker" / "y.py").write_text("import vaccelray.scheduler.proxy\nimport os\n")
    (package / "scheduler" / "z.py").write_text("from vaccelray.protocol import x\n")
    assert violations(package, "protocol") == [
        "vaccelray.protocol.x:2 imports vaccelray.worker.agent",
        "vaccelray.protocol.x:3 imports vaccelray.__version__",
        "vaccelray.protocol.x:4 imports vaccelray.scheduler",
    ]
    assert violations(package, "worker") == [
        "vaccelray.worker.y:1 imports vaccelray.scheduler.proxy"
    ]
    assert violations(package, "scheduler") == []
