"""The house: the modules of data_prep and pretrain import each other without a cycle (module-level imports and
imports inside functions both count, `if TYPE_CHECKING:` ones not: a function-level import still runs, it only
runs later), data_prep never imports pretrain, and pretrain's files stay short: no file over 400 lines, no class or
function over 150, each room's `__init__.py` a docstring only (what the room holds, no re-exports)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("data_prep", "pretrain")
MAX_FILE_LINES = 400
MAX_DEFINITION_LINES = 150


def module_name(path: Path, repo_root: Path) -> str:
    """pretrain/training/data.py -> pretrain.training.data; a package's __init__.py -> the package."""
    parts = list(path.relative_to(repo_root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules the module `name` (at `path`) imports, at any depth of its code. `from X import y`
    counts as importing X.y where that is a module, else X."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found - {name}


def sources(repo_root: Path, package: str) -> list[Path]:
    return sorted((repo_root / package).rglob("*.py"))


def import_graph(repo_root: Path) -> dict[str, set[str]]:
    paths = {module_name(p, repo_root): p for pkg in PACKAGES for p in sources(repo_root, pkg)}
    return {name: imports(path, name, set(paths)) for name, path in paths.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return [*path, module, dep]
            if dep not in state and (found := visit(dep, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in graph:
        if module not in state and (found := visit(module, [])):
            return found
    return None


def test_no_import_cycles_and_data_prep_below_pretrain(repo_root: Path) -> None:
    graph = import_graph(repo_root)
    assert any(d.startswith("pretrain.") for d in graph["pretrain.__main__"]), "the graph is read"
    assert len([m for m in graph if m.startswith("pretrain.")]) > 20, "the graph is read, sub-packages included"
    assert not [m for m, deps in graph.items() if m.startswith("data_prep") and any(
        d.startswith("pretrain") for d in deps)], "data_prep imports pretrain"
    found = cycle(graph)
    assert found is None, f"import cycle: {' -> '.join(found)}"


def test_cycle_finder_finds_a_function_level_cycle(tmp_path: Path) -> None:
    """The checker itself: a cycle closed by an import inside a function is one; a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pretrain" / "room"
    pkg.mkdir(parents=True)
    (tmp_path / "pretrain" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text('"""A room."""\n')
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from ..room import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path)
    assert graph["pretrain.room.a"] == {"pretrain.room.b"} and graph["pretrain.room.b"] == {"pretrain.room.a"}
    assert graph["pretrain.room.c"] == set() and graph["pretrain.room.d"] == {"pretrain.room.c"}
    assert cycle(graph) == ["pretrain.room.a", "pretrain.room.b", "pretrain.room.a"]


def test_pretrain_files_and_definitions_are_short(repo_root: Path) -> None:
    long_files, long_defs = [], []
    for path in sources(repo_root, "pretrain"):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(repo_root)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if (n := node.end_lineno - node.lineno + 1) > MAX_DEFINITION_LINES:
                    long_defs.append(f"{path.relative_to(repo_root)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_defs, f"definitions over {MAX_DEFINITION_LINES} lines: {long_defs}"


def test_rooms_init_is_a_docstring_only(repo_root: Path) -> None:
    """A sub-package's __init__.py says what the room holds and imports nothing: no re-export forest."""
    rooms = [p for p in sorted((repo_root / "pretrain").glob("*/__init__.py"))]
    for init in rooms:
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), (
            f"{init.relative_to(repo_root)}: a docstring only")
