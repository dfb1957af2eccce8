"""Type checks of frozen config dataclasses from their own annotations.

Values read from JSON (config.json, generation_config.json, training configs) arrive with
whatever types the file had: `"no"` where a boolean belongs, `"64"` for an integer, `NaN` for
a float. Python accepts all of them until something far away misbehaves (a string counts as
true, `"64" % 4` is string formatting). `check_fields(obj)` checks every field of a dataclass
instance against its annotation once, at construction, so a new field is covered by adding
it with a type, and the error names the field:

    bool            exactly True/False (never 0/1 or a string)
    int             an int, not a bool (JSON 4.0 is accepted as 4)
    float           an int or float, finite; stored as float
    str             a str
    tuple[T, ...]   a list or tuple of T; stored as a tuple
    T | None        None, or a T
    A | B           the first of A, B that accepts the value
    a dataclass     an instance of it (nested configs check themselves)
    Any             anything

Range checks (positive, in [0, 1), ...) stay with each config: they are about meaning.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import lru_cache
from typing import Any

from qwen25.errors import UserError


class _Mismatch(Exception):
    """Internal: the value does not fit the annotation (carries what was expected)."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any, where: str = "", error: type[UserError] = UserError) -> None:
    """Check (and normalise: int -> float, list -> tuple) every field of dataclass `obj`.

    `where` prefixes field names in messages ("rope_scaling." -> "rope_scaling.factor").
    Raises `error` (a UserError subclass) naming the first field that does not fit.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        fixed = check_value(value, hints[f.name], where + f.name, error)
        if fixed is not value:
            object.__setattr__(obj, f.name, fixed)


def check_value(value: Any, tp: Any, name: str, error: type[UserError] = UserError) -> Any:
    """`value` checked against annotation `tp` (normalised as `check_fields` does)."""
    try:
        return _coerce(value, tp)
    except _Mismatch as m:
        raise error(f"{name}={_show(value)} must be {m.expected}, not {_kind(value)}") from None


def _coerce(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        reasons = []
        for a in options:
            try:
                return _coerce(value, a)
            except _Mismatch as m:
                reasons.append(m.expected)
        expected = reasons[0] if len(options) == 1 else " or ".join(_describe(a) for a in options)
        raise _Mismatch(expected + (" or null" if type(None) in args else ""))
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # JSON writers may spell 4 as 4.0
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Mismatch("a finite number")
            return float(value)
        raise _Mismatch("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(tp))
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise _Mismatch(_describe(tp))
        try:
            return tuple(_coerce(v, t) for v, t in zip(value, item_types))
        except _Mismatch:
            raise _Mismatch(_describe(tp)) from None
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("an object")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(f"a {tp.__name__}")
    return value  # an annotation this checker does not model: accepted as is


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is dict or typing.get_origin(tp) is dict:
        return "an object"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    return {int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
