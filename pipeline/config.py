"""One TOML file, a section per stage; CLI flags override it; every key is checked against a dataclass.

    run_dir = "runs/demo"          # top-level keys are shared by every stage that has the field
    clip = "ViT-B-16:openai"
    [train_adapter]
    noise = 0.16
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.paths import input_file
from ovml.pipeline.settings import STAGES, check_settings

SHARED_KEYS = ("run_dir", "clip", "seed", "device", "engine", "ray_address")
SECTIONS = tuple(stage.section for stage in STAGES)


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """Parse and check the file's shape (known sections and shared keys); {} when there is no file."""
    if path is None:
        return {}
    path = input_file(path, "config file", "pass a TOML file to --config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OvmlError(f"config file {path} is not valid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                hint = f" (did you mean [{key.replace('-', '_')}]?)" if key.replace("-", "_") in SECTIONS else ""
                raise OvmlError(
                    f"unknown section [{key}] in {path}{hint}; known sections: {', '.join(SECTIONS)}"
                )
        elif key not in SHARED_KEYS:
            raise OvmlError(
                f"unknown top-level key '{key}' in {path}; top-level keys: {', '.join(SHARED_KEYS)}"
                " (stage options go in their [section])"
            )
    return data


def build_config(cls, section: str, file_data: dict[str, Any], overrides: dict[str, Any] | None = None,
                 source: str = "config"):
    """Defaults <- shared top-level keys <- [section] <- CLI overrides (None means 'not given')."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # where a value from the file came from, for range errors
    for key in SHARED_KEYS:
        if key in file_data and key in fields:
            origin[key] = f"top level of {source}"
            values[key] = _check(key, file_data[key], hints[key], origin[key])
    for key, value in file_data.get(section, {}).items():
        if key not in fields:
            raise OvmlError(
                f"unknown key '{key}' in [{section}] of {source}; known keys: {', '.join(sorted(fields))}"
            )
        origin[key] = f"[{section}] of {source}"
        values[key] = _check(key, value, hints[key], origin[key])
    for key, value in (overrides or {}).items():
        if value is not None:
            origin.pop(key, None)
            values[key] = _check(key, value, hints[key], "the command line")
    cfg = cls(**values)
    check_settings(cfg, origin)
    return cfg


def _check(key: str, value: Any, hint: Any, where: str) -> Any:
    """Return `value` converted to `hint` when it fits, else raise a one-line error naming the key."""
    ok, converted = _fits(value, hint)
    if not ok:
        raise OvmlError(f"'{key}' in {where} must be {_describe(hint)}, got {value!r}")
    return converted


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = _fits(value, arm)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False, None
        items = [_fits(v, item_hint) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if hint is Path:
        ok = isinstance(value, str | Path)
        return ok, Path(value) if ok else None
    raise TypeError(f"config type {hint} is not supported")  # a programming error, not a user error


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "unset"
    return {dict: "a table", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}[hint]
