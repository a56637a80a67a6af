"""The embedded default corpus: documentation strings of the Python standard library and installed packages.

Every machine with the project installed has this text offline, and it is real human-written English prose
(with some code), so `make pretrain` works on a fresh machine with no data. One document per module: the
module's docstring followed by the docstrings of its classes and functions, in source order, one line per
paragraph line, blank lines dropped (a blank line separates documents in the .txt format).

Deterministic: files are walked in sorted order and parsed with `ast` (nothing is imported), so the same
Python and package versions give byte-identical text. The file is built once into a cache directory
(`$ROBERTA_PRETRAIN_CACHE`, default `~/.cache/roberta-pretrain`) whose name includes those versions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Packages with substantial, well-written docstrings that the project itself depends on, so they are
# always installed beside it (about 9 MB with the standard library, which comes first). transformers is left
# out: its docstrings are mostly repeated argument tables.
PACKAGES = ("numpy", "torch", "datasets", "pytorch_lightning", "tokenizers")
SKIP_DIRS = {"test", "tests", "testing", "idlelib", "__pycache__", "site-packages", "_vendor", "vendored"}


def _versions() -> list[str]:
    out = [f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"]
    for name in PACKAGES:
        try:
            out.append(f"{name}-{importlib.metadata.version(name.replace('_', '-'))}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _roots() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    purelib = [Path(p) for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]
    for name in PACKAGES:
        for base in sorted(purelib):
            if (base / name).is_dir():
                roots.append(base / name)
                break
    return roots


def _python_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def module_document(source: bytes) -> list[str]:
    """Docstring lines of a module and its classes and functions, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    lines: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:  # skip one-word stubs like "Return x."
                lines.extend(line.rstrip() for line in doc.splitlines() if line.strip())
    return lines


def python_docs_path() -> Path:
    """The cached corpus file for this interpreter and these package versions, built on first use."""
    cache = Path(os.environ.get("ROBERTA_PRETRAIN_CACHE", Path.home() / ".cache" / "roberta-pretrain"))
    key = hashlib.sha256("\n".join(_versions()).encode()).hexdigest()[:12]
    path = cache / f"python-docs-{key}.txt"
    if not path.exists():
        build(path)
    return path


def build(path: Path) -> None:
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    files = [f for root in _roots() for f in _python_files(root)]
    with open(tmp, "w", encoding="utf-8") as out:
        for f in tqdm(files, desc="building builtin:python-docs", unit="file", mininterval=1.0):
            lines = module_document(f.read_bytes())
            if lines:
                out.write("\n".join(lines) + "\n\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)  # atomic: a crash never leaves a half-built corpus under the final name
