"""Typed dataclasses from parsed YAML and dotted command-line overrides: the machinery under `config.py`.

`from_mapping` builds a dataclass tree from a mapping, checking every key (unknown keys are named with the known
ones), every value against its annotation (ints accepted for floats, a single value for a one-element list,
"6e-4" read as a float, NaN and infinity refused in every float) and against the range its `option` declares
(`ge`, `le`), so a bad config is one `ConfigError` line naming the key, before any work starts. `apply_overrides`
applies `--section.key=value` arguments, values read as YAML. It knows nothing of this project's sections.
It lives in `data_prep`, beside `config.py`, because both halves of the pipeline read their config through it
and `data_prep` must never import `pretrain`.

YAML is read by `Loader`, PyYAML's safe loader with three of YAML 1.1's silent surprises closed:
- base-60 numbers: 1.1 reads an unquoted `1:00:00:00` as the int 216000 and `30:00` as 1800, which cannot be told
  from a real number of seconds afterwards; here they stay the strings they look like (a duration parses them);
- leading-zero octal: 1.1 reads `0123` as 83; here it stays the string "0123" (an int key then refuses it);
- duplicate keys: 1.1 keeps the last silently (a second `trainer:` section drops the first); here the file is
  refused, naming the line and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A problem with the user's config: the message names the key or file and the fix, on one line."""


def option(default: Any, help: str,  # noqa: A002 - `help` reads best at the call sites
           *, ge: float | None = None, le: float | None = None, why: str = "") -> Any:
    """A dataclass field with its documentation (`python -m pretrain --help`, docs/configuration.md) and, for a
    number, its range: `ge` <= value <= `le`, checked by `from_mapping` (an int or float in a union too), with
    `why` (what the bounds protect) in the message."""
    metadata = {"help": help, "ge": ge, "le": le, "why": why}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"  # 4194304, not 4.1943e+06; 1e+18, 1 for floats


def range_text(f: dataclasses.Field) -> str | None:
    """`f`'s declared range as "in [lo, hi]", ">= lo" or "<= hi"; None when it declares none."""
    ge, le = f.metadata.get("ge"), f.metadata.get("le")
    if ge is None and le is None:
        return None
    if ge is None or le is None:
        return f">= {_number(ge)}" if le is None else f"<= {_number(le)}"
    return f"in [{_number(ge)}, {_number(le)}]"


def _out_of_range(key: str, value: Any, f: dataclasses.Field) -> str | None:
    """The problem with `value` against `f`'s declared range, or None."""
    ge, le = f.metadata.get("ge"), f.metadata.get("le")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if (ge is None or value >= ge) and (le is None or value <= le):
        return None
    why = f.metadata.get("why")
    return f"{key}={value!r} must be {range_text(f)}" + (f" ({why})" if why else "")


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints accepted for floats). Raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if isinstance(value, dict) and (mapped := [a for a in arms if dataclasses.is_dataclass(a)]):
            return _coerce(key, value, mapped[0])  # a mapping is meant for the dataclass arm: its own error
        for arm in arms:
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_mapping(tp, value, key + ".")
        raise ConfigError(f"{key}: expected a mapping ({', '.join(f.name for f in dataclasses.fields(tp))}), "
                          f"got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single path is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "6e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # NaN passes every comparison a range check makes, and inf is no setting: both refused for every key
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")


def from_mapping(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds a config dataclass from parsed YAML, checking every key and type (errors name `prefix` + key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(prefix + u for u in unknown)} (known in {prefix.rstrip('.') or 'top level'}: "
            f"{', '.join(names)})"
        )
    kwargs, problems = {}, []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_mapping(tp, data.get(f.name) or {}, key + ".")
        elif f.name in data:
            kwargs[f.name] = _coerce(key, data[f.name], tp)
            if problem := _out_of_range(key, kwargs[f.name], f):
                problems.append(problem)
    if problems:  # before __post_init__, whose checks across keys may divide by one of them
        raise ConfigError("; ".join(problems))
    return cls(**kwargs)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names a key twice (YAML 1.1 would keep the last one silently)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} (first on line {first}): YAML would silently keep only the last "
                         "one; merge them into one")
        self.line = line


class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """`yaml.SafeLoader` without base-60 and leading-zero octal numbers, refusing duplicate keys (module docstring).
    Every YAML the project reads goes through it: experiment, task and ablation files and override values. The
    parser is libyaml's where PyYAML was built with it (8x faster; the same documents, the same values: the
    resolvers and constructors are these Python ones either way)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden: that is their use
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                pass
        return super().construct_mapping(node, deep)


# PyYAML's int and float resolvers (yaml/resolver.py) without the base-60 forms, and the int one without octal.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                                                 |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                                                 |[-+]?\.(?:inf|Inf|INF)
                                                 |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
                                               |[-+]?(?:0|[1-9][0-9_]*)
                                               |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """`text` read by `Loader`: what every config file and override value goes through."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


def read_yaml_mapping(path: Path, kind: str, top_level: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or one ConfigError naming the file (and the line of a syntax
    error or a duplicate key). `kind` names the file in "... does not exist", `top_level` what its top level
    must be."""
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} does not exist")
    try:
        data = load_yaml(path.read_text()) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {top_level}")
    return data


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`--optim.peak_lr=1e-3` -> (["optim", "peak_lr"], 0.001). Values are read as YAML."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, _, raw = arg[2:].partition("=")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {arg!r}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for arg in overrides:
        path, value = parse_override(arg)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {arg!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data
