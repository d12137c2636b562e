"""Typed configuration: dataclasses loaded from YAML, validated at load time.

A config file is a YAML mapping whose top-level keys are the sections of :class:`fusedit.experiment.ExperimentConfig`
(or of any other dataclass given to :func:`load_config`). A file may name one or more ``base:`` files (paths relative
to itself, or names of configs shipped with fusedit such as ``tiny/fusedit``); they are merged first, then the file,
then ``key=value`` overrides (``model.pos_embed=1d-rope``; values are parsed as YAML).

Every key must be a field of its dataclass, every value must have the field's type, and each dataclass may
define ``validate()`` for value ranges and combinations. Violations raise :class:`ConfigError` whose message names the
dotted key, the offending value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

#: Folder of the YAML configs shipped with fusedit (``src/fusedit/configs``).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration value, key or combination is invalid. The message says which and what is allowed."""


# --------------------------------------------------------------------------------------------------------------------
# YAML files, bases and overrides
# --------------------------------------------------------------------------------------------------------------------


def resolve_config_path(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Find a config file: an existing path, a path relative to ``relative_to``, or a shipped config name."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    shipped = SHIPPED_CONFIGS / name
    candidates += [shipped, shipped.with_suffix(".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"config file {str(name)!r} not found (looked at {', '.join(str(c) for c in candidates)}); "
        f"shipped configs: {', '.join(list_shipped_configs()) or 'none'}"
    )


def list_shipped_configs() -> list[str]:
    """Names of the configs shipped with fusedit, e.g. ``['reference/baseline', 'tiny/fusedit', ...]``."""
    if not SHIPPED_CONFIGS.is_dir():
        return []
    return sorted(str(p.relative_to(SHIPPED_CONFIGS).with_suffix("")) for p in SHIPPED_CONFIGS.rglob("*.yaml"))


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml_mapping(path: Path, kind: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (an empty file reads as ``{}``); ``kind`` names the file in errors ("config")."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{kind} {path} is not valid YAML: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{kind} {path} must be a YAML mapping, got {type(data).__name__}")
    return dict(data)


def read_config_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config with its ``base:`` chain resolved into one plain dict."""
    path = resolve_config_path(path)
    if path in _seen:
        raise ConfigError(f"config {path} includes itself through 'base' ({' -> '.join(map(str, _seen + (path,)))})")
    data = read_yaml_mapping(path, "config")
    bases = data.pop("base", None)
    if bases is None:
        return dict(data)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config {path}: 'base' must be a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = resolve_config_path(base, relative_to=path.parent)
        merged = deep_merge(merged, read_config_file(base_path, _seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``'a.b.c=value'`` into (``['a', 'b', 'c']``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. model.pos_embed=2d-rope")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected dotted keys like train.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a config dict (creating intermediate mappings)."""
    result = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


# --------------------------------------------------------------------------------------------------------------------
# Dict -> typed dataclass
# --------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, Sequence, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
                if isinstance(value, Mapping) and isinstance(option, type) and dataclasses.is_dataclass(option):
                    raise  # a mapping for an optional section: the section's own message names the bad key
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: got {value!r}, expected null")
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(repr(a) for a in get_args(tp))}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        (item_type, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        args = get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, key)


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    """``value`` as a bool, int, float, str or instance of the class ``tp`` (YAML's "1e-4" string read as a float)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values.

    A dataclass may define ``upgrade_keys(data, prefix) -> data`` (a classmethod) to read keys it renamed; after
    construction the instance's ``validate()`` (if any) runs; it should raise :class:`ConfigError`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    upgrade = getattr(cls, "upgrade_keys", None)
    if callable(upgrade):  # a section that renamed keys reads the old names (with a message)
        data = upgrade(dict(data), prefix or cls.__name__)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else cls.__name__
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(f'{prefix}.{k}' if prefix else k) for k in unknown)}"
            f" in {where}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def to_dict(config: Any) -> Any:
    """Plain-Python (YAML/JSON-serialisable) form of a config dataclass."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a dataclass config from a YAML file (with ``base:`` chain) plus ``key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``validate()`` methods)."""
    if not condition:
        raise ConfigError(message)
