"""Typed configs: dataclasses <-> dicts/YAML, ``key=value`` overrides and argparse flags.

Every stage keeps its settings in a plain dataclass with defaults (the "config"); presets are small
YAML files holding only the fields that differ. The CLI builds its flags from the same dataclass
(``add_config_args``), so every flag is a config field and every run can be written back out as
YAML/JSON (``to_dict``) and rerun from it.

Errors are one line naming the key, e.g. ``unknown config key 'optim.lrr' (known: lr, ...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from openpluto.errors import ConfigError

T = TypeVar("T")

_NONE_WORDS = {"none", "null", "~", ""}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """Return (allows None, the type without None)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])  # noqa: UP007
    return False, tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp``, or raise ConfigError."""
    optional, tp = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional or tp is Any:
            return None
        raise ConfigError(f"config key '{key}' may not be empty")
    if tp is Any:
        return value
    origin = get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
            return from_dict(tp, value, prefix=f"{key}.")
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                # Allow "16" for Literal[8, 16, 32].
                for c in choices:
                    if str(c) == str(value):
                        return c
                raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
            return value
        if origin in (tuple, list):
            args = get_args(tp)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                value = [value]
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if origin in (typing.Union, types.UnionType):
            for arg in get_args(tp):
                try:
                    return coerce(value, arg, key)
                except (ConfigError, ValueError, TypeError):
                    continue
            raise ConfigError(f"config key '{key}' has a bad value {value!r}")
        return tp(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key '{key}' has a bad value {value!r} ({e})") from None


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and bad values raise ConfigError."""
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(names)})")
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict of YAML/JSON-friendly values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in ``update`` win; nested dicts merge."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model.depth=6"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def list_presets(presets_dir: Path) -> list[str]:
    """Names of the YAML presets in a folder (file stems)."""
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def load_config(
    cls: type[T],
    name_or_file: str | Path | None,
    presets_dir: Path | None = None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
) -> T:
    """Defaults of ``cls`` <- preset YAML (a name in ``presets_dir`` or a file path) <- overrides."""
    data: dict[str, Any] = {}
    if name_or_file:
        path = Path(name_or_file)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            data = load_yaml(path)
        elif presets_dir is not None and (Path(presets_dir) / f"{name_or_file}.yaml").is_file():
            data = load_yaml(Path(presets_dir) / f"{name_or_file}.yaml")
        else:
            known = ", ".join(list_presets(presets_dir)) if presets_dir else ""
            raise ConfigError(f"unknown preset '{name_or_file}' (presets: {known}; or give a .yaml file)")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    return from_dict(cls, merge_dicts(data, extra))


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a config (dataclass or dict) as YAML, atomically."""
    from openpluto.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


# ----------------------------------------------------------------------------- argparse bridge


def _flag_type(tp: Any) -> tuple[dict[str, Any], Any]:
    """argparse kwargs for a field type, and the element type used for coercion."""
    optional, tp = _is_optional(tp)
    origin = get_origin(tp)
    if origin in (tuple, list):
        return {"nargs": "+"}, tp
    if origin is Literal:
        return {"choices": [str(c) for c in get_args(tp)]}, tp
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}, tp
    return {}, tp


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    include: list[str] | None = None,
    exclude: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
) -> None:
    """Add one ``--flag`` per dataclass field (``snake_case`` -> ``--kebab-case``).

    Field ``metadata`` may hold ``help`` and ``flag`` (a custom flag name). Defaults shown in
    ``--help`` are the dataclass defaults; unset flags keep them (argparse default is SUPPRESS).
    ``positional`` fields become positional arguments (``nargs='+'`` for sequences).
    """
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or (include is not None and f.name not in include):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        kwargs, _ = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default not in (None, "", (), []):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})".strip()
        if f.name in positional:
            parser.add_argument(f.name, help=help_text, **({"nargs": "+"} if "nargs" in kwargs else {}))
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        parser.add_argument(flag, dest=f.name, help=help_text, default=argparse.SUPPRESS, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from ``base`` (e.g. a preset) updated by the flags the user actually gave."""
    data = dict(base or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in vars(args).items():
        if k in names:
            data[k] = v
    return from_dict(cls, data)
