"""The house of data_prep (issue 31): short flat modules that read top to bottom. No file over 400 lines, no class
or function over 150, no import circle among its modules (imports inside functions included), and no import of
pretrain anywhere in it, so pretrain may import data_prep and never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_FILE_LINES = 400
MAX_DEFINITION_LINES = 150


def modules(repo_root: Path) -> dict[str, Path]:
    found = {f"data_prep.{p.stem}": p for p in sorted((repo_root / "data_prep").glob("*.py"))}
    assert len(found) > 10 and "data_prep.shards" in found, "the package is read"
    return found


def imported(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of its code, `if TYPE_CHECKING:` blocks left out;
    `from . import x` counts as data_prep.x, `from .x import y` as data_prep.x."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("data_prep" + (f".{node.module}" if node.module else "")) if node.level else node.module or ""
            found |= {f"{base}.{a.name}" for a in node.names} if base == "data_prep" else {base}
    return found


def test_no_data_prep_file_is_over_400_lines(repo_root: Path) -> None:
    sizes = {name: path.read_text().count("\n") for name, path in modules(repo_root).items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_FILE_LINES}, (
        f"split these where a reader would (at most {MAX_FILE_LINES} lines): "
        f"{ {n: s for n, s in sizes.items() if s > MAX_FILE_LINES} }")


def test_no_data_prep_definition_is_over_150_lines(repo_root: Path) -> None:
    """Every class and function, methods and nested ones included, decorators counted."""
    long = {}
    for name, path in modules(repo_root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (span := node.end_lineno - first + 1) > MAX_DEFINITION_LINES:
                    long[f"{name}.{node.name}"] = span
    assert not long, f"definitions over {MAX_DEFINITION_LINES} lines: {long}"


def test_data_prep_modules_import_no_circle(repo_root: Path) -> None:
    found = modules(repo_root)
    graph = {name: sorted(m for m in imported(path) if m in found and m != name) for name, path in found.items()}
    assert "data_prep.manifest" in graph["data_prep.shards"], "the graph is read"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in graph[module]:
            assert state.get(dep) != 1, f"import circle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_data_prep_never_imports_pretrain(repo_root: Path) -> None:
    found = {name: sorted(m for m in imported(path) if m.split(".")[0] == "pretrain")
             for name, path in modules(repo_root).items()}
    offenders = {n: m for n, m in found.items() if m}
    assert not offenders, f"data_prep imports pretrain (pretrain is the layer above): {offenders}"
