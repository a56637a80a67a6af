"""Writes docs/configuration.md, the configuration reference, from the config dataclasses themselves.

The reference used to be a hand-kept table in the README, and a key's default or meaning could drift from the
code. Here every row comes from the same fields that `python -m pretrain --help` prints (`describe_config`): the
type, the default, the declared range with its reason, and the help text. The page's hand-written intro, everything
up to the marker line, is kept as it is; the tables after the marker are replaced.

    python -m data_prep.config_doc            # rewrite docs/configuration.md (make docs)
    python -m data_prep.config_doc --check    # exit 1 when the page is stale
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, ExperimentConfig, Source, range_text, type_name  # what --help reads too

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
MARKER = "<!-- Generated below by `make docs` (python -m data_prep.config_doc) from the config's fields: edit their help, not this page. -->"
DEFAULT_INTRO = "# The config\n"
HEADER = "| key | type | default | range | meaning |\n|---|---|---|---|---|"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def yaml_value(value: Any) -> str:
    """`value` as one would write it in the YAML (and in a --section.key=value override)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def type_text(tp: Any) -> str:
    """`tp` as written in the code: `list[str | Source]`, where --help's type_name says `list`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, dict) and args:
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    return "Any" if tp is Any else "None" if tp is type(None) else type_name(tp)


def _row(key: str, f: dataclasses.Field, tp: Any) -> str:
    if f.default_factory is not dataclasses.MISSING:
        default = yaml_value(f.default_factory())
    elif f.default == "" and key.endswith(".path"):
        default = "(required)"
    else:
        default = yaml_value(f.default)
    bounds = range_text(f) or ""
    if bounds and f.metadata.get("why"):
        bounds += f" ({f.metadata['why']})"
    default = default if default == "(required)" else f"`{default}`"
    return f"| `{key}` | {_cell(type_text(tp))} | {_cell(default)} | {_cell(bounds)} | {_cell(f.metadata['help'])} |"


def _holds_sources(tp: Any) -> bool:
    return tp is Source or any(_holds_sources(arm) for arm in typing.get_args(tp))


def _rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        rows.append(_row(prefix + f.name, f, hints[f.name]))
        if _holds_sources(hints[f.name]):
            source_hints = typing.get_type_hints(Source)  # a mapping entry of a sources list: its own keys
            rows += [_row(f"{prefix}{f.name}[i].{g.name}", g, source_hints[g.name]) for g in dataclasses.fields(Source)
                     if not (f.name == "valid" and g.name == "weight")]  # refused there: validation is read once
    return rows


def render_tables() -> str:
    """The generated part of the page: one table per config section, top-level keys first."""
    parts = [f"## Top-level keys\n\n{HEADER}\n" + "\n".join(_rows(ExperimentConfig, "")) + "\n"]
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            parts.append(f"## {f.name}\n\n{f.metadata['help']}\n\n{HEADER}\n"
                         + "\n".join(_rows(hints[f.name], f.name + ".")) + "\n")
    return "\n".join(parts)


def render(current: str | None) -> str:
    """The whole page: `current`'s intro (up to the marker; a bare title for a new page), then the tables."""
    if current is not None and MARKER not in current:  # rewriting it would drop its hand-written text
        raise ConfigError(f"{PAGE}: the line {MARKER!r} is missing; put it where the generated tables begin")
    intro = current.split(MARKER)[0].rstrip("\n") + "\n" if current else DEFAULT_INTRO
    return f"{intro}\n{MARKER}\n\n{render_tables()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    current = PAGE.read_text() if PAGE.exists() else None
    try:
        page = render(current)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "--check" in argv:
        if page != current:
            print(f"{PAGE} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
