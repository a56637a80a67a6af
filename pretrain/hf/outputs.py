"""Output directories the project replaces: it deletes or replaces only what it wrote.

Export (run_dir/hf or `--out DIR`) and fine-tuning's seed directories (run_dir/finetune/NAME/seed-K) are swapped
in whole: the old directory is renamed aside and removed. A path the user names (`make export OUT=~`) must never
make that remove their files, so each such directory gets a marker file, `.roberta-pretrain`, when the project
creates it, and a directory is replaced only when it

- does not exist, or is empty, or
- holds the marker, or
- was written by an older version, before markers: it holds exactly files that the same writer writes (and only
  those, so a home directory or a source tree never qualifies), e.g. an export's config.json, model.safetensors,
  tokenizer files and README.md.

Anything else (a file, a symbolic link, a directory with other contents) is refused with one line before any
work: a link is never followed to delete its target. Names that come from files (a task's `task.name`) are
names, never paths (`check_name`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".roberta-pretrain"
"""The file that says "the project wrote this directory"; its content says what wrote it (for people)."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A name that becomes one directory: no separator, not `.` or `..`, not hidden, not empty (STYLE 20)."""


class OutputDirError(ValueError):
    """An output directory the project would replace holds something it did not write."""


@dataclass(frozen=True)
class Writer:
    """What writes a kind of output directory, and how to recognise one written before markers existed."""

    what: str  # "an export": the message's word for it
    fix: str  # how the user chooses another directory ("choose another --out")
    files: frozenset[str] = frozenset()  # the names an older version wrote (files)
    dirs: dict[str, frozenset[str]] = field(default_factory=dict)  # and its subdirectories, with their files
    required: frozenset[str] = frozenset()  # names an old output always has


def check_name(name: str, key: str) -> str | None:
    """None when `name` can be one directory under its root; else what is wrong with it, for a one-line error
    that names `key`."""
    if NAME.fullmatch(name):
        return None
    return (f"{key}={name!r} is not a name (it becomes a directory: letters, digits, '.', '-' and '_', not starting "
            "with '.'; no '/', '..' or absolute path)")


def is_ours(path: Path, writer: Writer) -> bool:
    """Whether the project may replace or delete `path` (see the module docstring). A symbolic link never is."""
    if path.is_symlink():
        return False
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    if (path / MARKER).is_file() and not (path / MARKER).is_symlink():
        return True
    entries = list(path.iterdir())
    if not entries:
        return True
    return _as_written_before_markers(path, entries, writer)


def _as_written_before_markers(path: Path, entries: list[Path], writer: Writer) -> bool:
    names = {p.name for p in entries}
    if not writer.required <= names:
        return False
    for p in entries:
        if p.is_symlink():
            return False
        if p.name in writer.files and p.is_file():
            continue
        if p.name in writer.dirs and p.is_dir():
            if all(not q.is_symlink() and q.is_file() and q.name in writer.dirs[p.name] for q in p.iterdir()):
                continue
        return False
    return True


def check_replaceable(path: Path, writer: Writer) -> None:
    """Raise OutputDirError (one line) unless the project may replace `path`."""
    path = Path(path)
    if path.is_symlink():
        raise OutputDirError(f"{path} is a symbolic link, and is never followed to replace what it points to: "
                             f"{writer.fix}, or name the directory itself")
    if not is_ours(path, writer):
        raise OutputDirError(f"{path} exists and is not {writer.what} (no {MARKER}): {writer.fix} or remove it "
                             "yourself")


def mark(directory: Path, what: str) -> None:
    """Write the marker into a directory the project just created."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("roberta-pretrain")
    except PackageNotFoundError:
        v = "unknown"
    (directory / MARKER).write_text(json.dumps({"written_by": f"roberta-pretrain {v}", "what": what,
                                                "note": "the project replaces or deletes this directory only "
                                                        "because this file is here"}) + "\n")


def remove(path: Path, writer: Writer) -> None:
    """Delete a directory the project wrote (checked again here); a missing one is fine."""
    check_replaceable(path, writer)
    if path.exists():
        shutil.rmtree(path)


def replace(new: Path, out: Path, writer: Writer) -> None:
    """Swap the finished directory `new` in as `out` in two renames; the old `out` (checked to be ours) is
    removed only once `new` is in place."""
    check_replaceable(out, writer)
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    remove(old, writer)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)
