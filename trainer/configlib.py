"""Typed configs from YAML: nested dataclasses, unknown keys rejected with file, line and closest matches.

A config class is a plain dataclass whose fields have one-line docstring comments and whose
`__post_init__` validates values. `load(cls, path, overrides)` reads YAML safely, applies
`dotted.key=value` overrides, and builds the dataclass tree, naming the file, the line and the key
for every mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from models.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not describe a valid config."""


class FieldError(UserError, ValueError):
    """Raised by a config class's `__post_init__` for a value (or a combination of values) that cannot
    work; `key` names the field to blame, so the loader can point at its line in the file."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a value came from, for error messages."""

    source: str
    lines: Mapping[tuple[str, ...], int]

    def where(self, path: tuple[str, ...]) -> str:
        for cut in range(len(path), 0, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                return f"{self.source}, line {line}, key '{'.'.join(path)}'"
        return f"{self.source}, key '{'.'.join(path)}'" if path else self.source


def _mapping_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            out[path] = key_node.start_mark.line + 1
            _mapping_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        # List items get their index as a key, so errors inside them name the item's own line.
        for index, item_node in enumerate(node.value):
            path = prefix + (str(index),)
            out[path] = item_node.start_mark.line + 1
            _mapping_lines(item_node, path, out)


def read_yaml(path: str | Path) -> tuple[Any, Located]:
    """Parse a YAML file safely, keeping the line number of every mapping key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _mapping_lines(node, (), lines)
    return ({} if data is None else data), Located(str(path), lines)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested dict copy."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. ppo.learning_rate=1e-6")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def build(cls: type[T], data: Any, located: Located | None = None, path: tuple[str, ...] = ()) -> T:
    """Build dataclass `cls` from nested dicts, checking keys and types."""
    located = located or Located("config", {})
    return _convert(cls, data, located, path)


def load(cls: type[T], config_path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    data, located = read_yaml(config_path) if config_path is not None else ({}, Located("defaults", {}))
    if not isinstance(data, dict):
        raise ConfigError(f"{located.source}: the top level must be a mapping of keys to values")
    data = apply_overrides(data, overrides)
    return build(cls, data, located)


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(tp: Any, value: Any, located: Located, path: tuple[str, ...]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, located, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{located.where(path)}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, located, path)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{located.where(path)}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{located.where(path)}: expected a list, got {value!r}")
        args = get_args(tp)
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, located, path + (str(i),)) for i, v in enumerate(value)]
        return tuple(items) if origin is not list and tp is not list else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{located.where(path)}: expected a mapping, got {value!r}")
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {k: _convert(value_type, v, located, path + (str(k),)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{located.where(path)}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{located.where(path)}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 2e-5 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{located.where(path)}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf / 1e999: no setting means that, and a NaN passes every `<` check
            raise ConfigError(f"{located.where(path)}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{located.where(path)}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{located.where(path)}: expected a path string, got {value!r}")
        return Path(value)
    return value


def _convert_dataclass(cls: type, value: Any, located: Located, path: tuple[str, ...]):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{located.where(path)}: expected a mapping for {cls.__name__}, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{located.where(path + (str(key),))}: unknown key {key!r} in {cls.__name__}{hint} "
                f"(known keys: {', '.join(fields)})"
            )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], located, path + (name,))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{located.where(path)}: missing required key '{'.'.join(path + (name,))}'")
    try:
        return cls(**kwargs)
    except FieldError as err:
        raise ConfigError(f"{located.where(path + (err.key,))}: {err}") from None
    except UserError as err:
        raise ConfigError(f"{located.where(path)}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{located.where(path)}: {err}") from None


def to_dict(config: Any) -> Any:
    """Plain YAML-serialisable dict of a config tree."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config
