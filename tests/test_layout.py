"""The house: the modules of data_prep and pretrain import each other without a cycle (imports inside functions
included, `if TYPE_CHECKING:` ones not), and data_prep never imports pretrain."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("data_prep", "pretrain")


def imports(path: Path, package: str) -> set[str]:
    """The project modules `path` imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = (package + (f".{node.module}" if node.module else "")) if node.level else node.module or ""
            if base == package:  # from . import name
                found |= {f"{package}.{a.name}" for a in node.names}
            elif base.split(".")[0] in PACKAGES:
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found - {f"{package}.{path.stem}"}


def test_no_import_cycles_and_data_prep_below_pretrain(repo_root: Path) -> None:
    graph = {f"{pkg}.{p.stem}": imports(p, pkg) for pkg in PACKAGES for p in sorted((repo_root / pkg).glob("*.py"))}
    assert graph["pretrain.hf"] and "pretrain.export" in graph["pretrain.__main__"], "the graph is read"
    assert not [m for m, deps in graph.items() if m.startswith("data_prep.") and any(
        d.startswith("pretrain") for d in deps)], "data_prep imports pretrain"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
