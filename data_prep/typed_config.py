"""Typed dataclasses from parsed YAML and dotted command-line overrides: the machinery under `config.py`.

`from_mapping` builds a dataclass tree from a mapping, checking every key (unknown keys are named with the known
ones) and every value against its annotation (ints accepted for floats, a single value for a one-element list,
"6e-4" read as a float), so a bad config is one `ConfigError` line naming the key. `apply_overrides` applies
`--section.key=value` arguments, values read as YAML. It knows nothing of this project's sections.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A problem with the user's config: the message names the key or file and the fix, on one line."""


def option(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best at the call sites
    """A dataclass field with its documentation (`python -m pretrain describe`, the README tables)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
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
    kwargs = {}
    for name in names:
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_mapping(tp, data.get(name) or {}, key + ".")
        elif name in data:
            kwargs[name] = _coerce(key, data[name], tp)
    return cls(**kwargs)


def read_yaml_mapping(path: Path, kind: str, top_level: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or one ConfigError naming the file (and the line of a syntax
    error). `kind` names the file in "... does not exist", `top_level` what its top level must be."""
    if not path.is_file():
        raise ConfigError(f"{kind} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
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
        value = yaml.safe_load(raw) if raw != "" else ""
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
