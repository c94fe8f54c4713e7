"""The configuration reference (``docs/configuration.md``), generated from the config models.

Every key of every section comes from ``ray_lt.config``: its type and bounds from the field's
annotation, its default from the field (default factories evaluated), its description from the
attribute docstring under it. Regenerate the page with

    python -m ray_lt.reference > docs/configuration.md

``tests/test_reference.py`` fails when the page and this output differ.
"""

from __future__ import annotations

import inspect
import json
import types
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ray_lt.config import KINDED_SECTIONS, Config, section_model

COMMAND = "python -m ray_lt.reference > docs/configuration.md"

INTRO = (
    "A run's config is a YAML file made of the sections below, plus `--set key.path=value` "
    "overrides on the command line (each value read as YAML, e.g. "
    "`--set train.epochs=90 synthesis.criteria='{entropy: 1.0}'`). A key that is not listed "
    "here is refused, naming its full path, before anything runs; a key left out takes its "
    "default. Types: `int >= 1` and `float in (0, 1]` give the accepted range, `\"a\" | \"b\"` "
    "the accepted values, `null` is YAML's null; `(required)` keys have no default. This file "
    f"is generated from `ray_lt/config.py` by `{COMMAND}`, and a test fails when it is stale."
)


def _text(doc: str | None) -> str:
    """A docstring or description as one line of Markdown (its ``code`` as `code`)."""
    return " ".join(inspect.cleandoc(doc or "").split()).replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# The bound constraints pydantic keeps in a field's metadata (annotated_types' classes), by
# class name: (which side, interval bracket, operator, attribute).
BOUNDS = {"Ge": ("low", "[", ">="), "Gt": ("low", "(", ">"),
          "Le": ("high", "]", "<="), "Lt": ("high", ")", "<")}

Bound = tuple[str, str, str]  # (interval bracket, operator, value)


def _bounds(metadata: list[Any]) -> dict[str, Bound]:
    """The lower and upper bounds that Ge/Gt/Le/Lt metadata (also inside a nested ``Field``)
    set: ``{"low": ("[", ">=", "0"), ...}``."""
    found: dict[str, Bound] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.update(_bounds(item.metadata))
        elif type(item).__name__ in BOUNDS:
            side, bracket, op = BOUNDS[type(item).__name__]
            value = getattr(item, type(item).__name__.lower())
            found[side] = (bracket, op, _number(value))
    return found


def _bounded(name: str, metadata: list[Any]) -> str:
    bounds = _bounds(metadata)
    low, high = bounds.get("low"), bounds.get("high")
    if low and high:
        return f"{name} in {low[0]}{low[2]}, {high[2]}{high[0]}"
    if low or high:
        _, op, value = low or high
        return f"{name} {op} {value}"
    return name


def _min_items(metadata: list[Any]) -> int | None:
    for item in metadata:
        if isinstance(item, FieldInfo):
            found = _min_items(item.metadata)
            if found is not None:
                return found
        elif type(item).__name__ == "MinLen":
            return item.min_length
    return None


PLAIN = {int: "int", float: "float", str: "str", bool: "bool", Path: "path"}


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A readable form of a field's type: ``int >= 1``, ``"sgd" | "adamw"``, ``list[float] |
    null``. ``metadata`` (the field's own Ge/Gt/Le/Lt, MinLen) applies to the non-null part."""
    metadata = list(metadata or [])
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return type_text(inner, [*extra, *metadata])
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        parts = [type_text(a, metadata) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        text = f"list[{type_text(item)}]"
        least = _min_items(metadata)
        return f"{text}, at least {least}" if least else text
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in get_args(annotation)) + "]"
    if origin is dict:
        key, value = get_args(annotation)
        return f"dict[{type_text(key)}, {type_text(value)}]"
    if annotation in PLAIN:
        name = PLAIN[annotation]
        return _bounded(name, metadata) if annotation in (int, float) else name
    return getattr(annotation, "__name__", str(annotation))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def default_text(field: FieldInfo) -> str:
    """The field's default as a YAML literal (null, true, lists), or ``(required)``."""
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True, validated_data={})
    return f"`{_cell(json.dumps(_plain(value), ensure_ascii=False))}`"


def _row(key: str, field: FieldInfo, kind: str | None = None) -> str:
    """One key's table row; ``kind``: the value a ``kind`` key has in this table."""
    if kind is not None:
        shown = json.dumps(kind)
        default = "(required)" if field.is_required() else f"`{_cell(shown)}`"
    else:
        shown, default = type_text(field.annotation, field.metadata), default_text(field)
    return f"| `{key}` | `{_cell(shown)}` | {default} | {_cell(_text(field.description))} |"


def _rows(model: type[BaseModel], prefix: str, kind: str | None = None) -> list[str]:
    """Table rows of ``model``'s keys under ``prefix``, nested sections flattened in place.
    ``kind``: the kind this table is for (its ``kind`` row shows that value alone)."""
    rows = []
    fields = model.model_fields
    for name in sorted(fields, key=lambda n: n != "kind"):  # the kind first, then field order
        field = fields[name]
        nested = section_model(field.annotation)
        if nested is not None:
            rows += _rows(nested, f"{prefix}{name}.")
        else:
            rows.append(_row(f"{prefix}{name}", field, kind if name == "kind" else None))
    return rows


HEADER = ["| key | type | default | description |", "|---|---|---|---|"]


def config_reference() -> str:
    """The Markdown text of ``docs/configuration.md``."""
    out = ["# Configuration reference", "", INTRO, ""]
    plain = [n for n, f in Config.model_fields.items()
             if n not in KINDED_SECTIONS and section_model(f.annotation) is None]
    placed = False
    for name, field in Config.model_fields.items():
        if name in plain:
            if not placed:
                out += ["## Top level", "", _text(Config.__doc__), "", *HEADER,
                        *(_row(n, Config.model_fields[n]) for n in plain), ""]
                placed = True
            continue
        out += [f"## {name}", ""]
        if name in KINDED_SECTIONS:
            kinds = KINDED_SECTIONS[name]
            listed = ", ".join(f"`{k}`" for k in kinds)
            out += [f"{_text(field.description)} The kinds: {listed}; each has the keys of its "
                    f"own table.", ""]
            for kind, cls in kinds.items():
                out += [f"### {name}.kind: {kind}", "", _text(cls.__doc__), "",
                        *HEADER, *_rows(cls, f"{name}.", kind), ""]
        else:
            cls = section_model(field.annotation)
            out += [_text(cls.__doc__), "", *HEADER, *_rows(cls, f"{name}."), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference(), end="")
