"""Recipe files: a YAML file and `key.sub=value` overrides -> a validated dataclass (engine/config.py
holds the schema), and a dataclass back to YAML.

Each value is coerced to its key's type and each section checked as it is built, so a typo or a
wrong type stops at load with one line naming the file and the key (and the nearest valid key).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from engine.config import MAX_INT, Recipe
from engine.errors import RecipeError


def load_recipe(path: str | Path | None, overrides: list[str] = (), schema: type = Recipe):
    """YAML file (or defaults when path is None) + `key.sub=value` overrides -> validated dataclass."""
    where = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{where}: cannot read recipe ({e.__class__.__name__}: {e})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML ({_one_line(e)})") from None
        except RecursionError:
            raise RecipeError(f"{where}: not valid YAML (nested too deeply)") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override '{item}': expected key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed, f"override '{item}'")
    try:
        return _build(schema, raw, "", where, schema)
    except RecursionError:  # a self-referencing YAML alias
        raise RecipeError(f"{where}: a value refers to itself") from None


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False), encoding="utf-8")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _keys(schema: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(schema).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + name + ".")
    return out


def _build(schema: type, raw: dict, prefix: str, where: str, root: type):
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            # suggestions search the whole recipe, so top-level 'lr' suggests 'train.lr'
            keys = _keys(root)
            near = [k for k in keys if k.rsplit(".", 1)[-1] == str(key)]
            near = near or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise RecipeError(f"{where}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, where, root)
    obj = schema(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _coerce(tp: Any, value: Any, key: str, where: str, root: type, optional: bool = False) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where, root, optional=type(None) in args)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a section of keys, got {value!r}")
        return _build(tp, value, key + ".", where, root)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecipeError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", where, root) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise RecipeError(f"{where}: '{key}' must be at most {MAX_INT} in size, got {value}")
            return value
        raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int past float range
                raise RecipeError(f"{where}: '{key}' must be a finite number, got {value}") from None
        elif isinstance(value, str):  # YAML 1.1 reads 2e-5 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        # NaN passes every range check (all comparisons are false) and inf overflows step counts
        if not math.isfinite(number):
            raise RecipeError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            # an empty name, path or column means "here" or "nothing" by accident (output_dir "" is
            # the working folder); a key that may be left unset takes null instead
            if not value.strip():
                raise RecipeError(f"{where}: '{key}' is empty" + (" (null leaves it unset)" if optional else ""))
            return value
        raise RecipeError(f"{where}: '{key}' must be a string, got {value!r}")
    return value
