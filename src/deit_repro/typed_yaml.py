"""Frozen dataclasses from YAML: the generic machinery behind :mod:`deit_repro.config`.

A YAML mapping becomes a tree of frozen dataclasses (:func:`build`), every value converted to its
field's type or refused with a message naming the key; a field declared with :func:`bounded`
carries JSON-schema range keywords that the loader checks and :func:`dataclass_schema` writes,
so the loader and the schema Snakemake validates with cannot disagree. One YAML reader
(:func:`read_yaml`), one way to lay an overlay on a profile (:func:`overlay`), and the plain form
and hash of a config (:func:`to_dict`, :func:`config_hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deit_repro.errors import ConfigError


def bounded(default: Any = dataclasses.MISSING, *, expect: str, **schema: Any) -> Any:
    """A field whose value must satisfy JSON-schema keywords (``minimum``, ``exclusiveMinimum``,
    ``maximum``, ``exclusiveMaximum``, ``enum``, ``pattern``, ``minItems``, ``items``).

    The loader checks them (:func:`violates`) and :func:`dataclass_schema` writes them into
    ``workflow/schemas/params.schema.yaml``: one declaration, so the Python loader and the schema
    Snakemake validates with cannot disagree on a range. ``expect`` is the phrase of
    the error message. Checks across fields stay in ``__post_init__`` (a schema cannot say them).
    """
    meta = {"schema": schema, "expect": expect}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")  # a bug in this module
    return field(default=default, metadata=meta)


class Invalid(ValueError):
    """A value check failed inside a dataclass; re-raised with the full key path."""

    def __init__(self, key: str, value: Any, expected: str):
        super().__init__(key)
        self.key, self.value, self.expected = key, value, expected


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise Invalid(key, value, expected)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {
        type(None): "null",
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
    }.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to ``tp``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(
        f"params key '{key}' = {value!r} has the wrong type (expected {_type_name(tp)})",
        "fix its value in params.yaml",
    )
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"params key '{key}' = {value!r} is not one of "
                f"{', '.join(repr(a) for a in typing.get_args(tp))}",
                "fix its value in params.yaml",
            )
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # the right shape: the error is about a key inside it, keep its name
                continue
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"params key '{key}' = {value!r} needs exactly {len(args)} values",
                "fix its value in params.yaml",
            )
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, str) and _is_number(value):
            # YAML 1.1 (PyYAML) reads 5e-4 as a string: a float needs a dot, as in 5.0e-4.
            raise ConfigError(
                f"params key '{key}' = {value!r} is a string to YAML, not a number",
                "write the mantissa with a dot (e.g. 5.0e-4, not 5e-4)",
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    path = (prefix + ".") if prefix else ""
    # str(): YAML keys may be ints or bools (``1:``, ``on:``), which do not sort with strings.
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        close = _closest(unknown[0], fields)
        raise ConfigError(
            f"unknown params key '{path}{unknown[0]}'",
            f"did you mean '{path}{close}'?"
            if close
            else f"valid keys here: {', '.join(sorted(fields))}",
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path + name)
            spec = f.metadata.get("schema")
            if spec and kwargs[name] is not None and violates(kwargs[name], spec):
                raise ConfigError(
                    f"params key '{path}{name}' = {kwargs[name]!r} is out of range "
                    f"(expected {f.metadata['expect']})",
                    "fix its value in params.yaml",
                )
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params key '{path}{name}' is missing", "add it to params.yaml")
    try:
        return cls(**kwargs)
    except Invalid as err:
        raise ConfigError(
            f"params key '{path}{err.key}' = {err.value!r} is out of range "
            f"(expected {err.expected})",
            "fix its value in params.yaml",
        ) from None


def violates(value: Any, spec: dict[str, Any]) -> bool:
    """Whether ``value`` breaks one of the JSON-schema keywords of a :func:`bounded` field
    (the same keywords the generated schema holds; jsonschema checks them for Snakemake)."""
    import re

    for key, bound in spec.items():
        if key == "items":
            if any(violates(v, bound) for v in value):
                return True
        elif key == "minItems":
            if len(value) < bound:
                return True
        elif key == "enum":
            if value not in bound:
                return True
        elif key == "pattern":
            if re.search(bound, value) is None:
                return True
        elif not {
            "minimum": value >= bound,
            "exclusiveMinimum": value > bound,
            "maximum": value <= bound,
            "exclusiveMaximum": value < bound,
        }[key]:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# JSON schema
# --------------------------------------------------------------------------------------------------


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """A type's schema; dataclasses go to ``defs`` once and are referenced (``$ref``)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(a, defs) for a in typing.get_args(tp)]}
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _type_schema(args[0], defs)}
        return {
            "type": "array",
            "prefixItems": [_type_schema(a, defs) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if origin is dict:
        return {
            "type": "object",
            "additionalProperties": _type_schema(typing.get_args(tp)[1], defs),
        }
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: recursion-safe, keeps first-seen order
            defs[tp.__name__] = dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    return {
        "type": {
            type(None): "null",
            int: "integer",
            float: "number",
            str: "string",
            bool: "boolean",
        }[tp]
    }


def _with_bounds(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Attach range keywords to the non-null branch of a type schema."""
    if "anyOf" in schema:
        return {
            "anyOf": [
                b if b.get("type") == "null" else _with_bounds(b, spec) for b in schema["anyOf"]
            ]
        }
    out = dict(schema)
    for key, bound in spec.items():
        if key == "items":
            if "prefixItems" in out:
                out["prefixItems"] = [{**s, **bound} for s in out["prefixItems"]]
            else:
                out["items"] = {**out["items"], **bound}
        else:
            out[key] = bound
    return out


def dataclass_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name], defs)
        if f.metadata.get("schema"):
            schema = _with_bounds(schema, f.metadata["schema"])
        props[f.name] = schema
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out = {"description": " ".join(cls.__doc__.split()), **out}
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _closest(word: str, options) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def overlay(base: Any, over: Any) -> Any:
    """``base`` with ``over`` laid on it: mappings merge key by key, anything else (a number, a
    list) is replaced. Neither argument is modified, and YAML aliases of ``base`` (one recipe
    referenced by several sections) become independent copies, so an overlay of one section
    never changes another."""
    base = json.loads(json.dumps(base))
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return json.loads(json.dumps(over))
    for key, value in over.items():
        base[key] = overlay(base[key], value) if key in base else json.loads(json.dumps(value))
    return base


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file {path} not found", "pass an existing file") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"params file {path} is not valid YAML ({err})", "fix its syntax"
        ) from None


def read_yaml(
    path: Path, *, missing: str = "run from the repository root or pass --params PATH"
) -> Any:
    """The YAML document of ``path``; a missing file or bad syntax is a ConfigError naming the
    file (and the line and column of a syntax error); ``missing`` is the fix for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found", missing)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"params file {path} is not valid YAML{where} ({err.__class__.__name__}"
            f": {str(err).splitlines()[0]})",
            "fix the YAML syntax",
        ) from None


def to_dict(obj: Any) -> Any:
    """Plain (JSON/YAML-able) form of a config object: the resolved params recorded with runs."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """A stable hash of a config (checkpoints refuse to resume under different params)."""
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]
