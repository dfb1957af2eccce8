"""Frozen config dataclasses <-> command lines and config files, for every training verb.

- `add_config_arguments(parser, Config)`: one flag per simple field (`--batch-tokens`,
  `--compile/--no-compile`, `--data A B`), with the field's trailing `# comment` as its help;
  plus `--config FILE` (JSON, or TOML on Python 3.11+) and `--set a.b.c=VALUE` for anything
  nested (`--set stages.1.rope_theta=1e6`, `--set model_overrides.num_hidden_layers=6`).
- `config_from_args(Config, args)`: defaults <- file <- flags <- `--set`, then
  `config_from_dict`, which is strict: an unknown key or a value of the wrong type is a
  `UserError` naming the key (and the closest known one), never silently dropped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from qwen25.errors import UserError

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the class source (the --help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = _FIELD_LINE.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


# --------------------------------------------------------------------------------------
# argparse
# --------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Flags for `cls`'s simple fields, plus --config and --set (all default to "not given")."""
    comments = field_comments(cls)
    hints = _hints(cls)
    defaults = cls()
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON (or TOML) file with any of the fields below; flags override it")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="set any field, also nested ones: stages.1.rope_theta=1e6 "
                             "(VALUE is JSON, or a plain string)")
    for f in dataclasses.fields(cls):
        tp, optional = _strip_optional(hints[f.name])
        default = getattr(defaults, f.name)
        # argparse %-formats help strings: a literal "3%" in a comment must be escaped
        help_text = f"{comments.get(f.name, '')} (default: {default!r})".strip().replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=_none_or(_flag_type(tp)) if optional else _flag_type(tp),
                                metavar=tp.__name__.upper(), **kwargs)
        elif origin is tuple and typing.get_args(tp)[0] in (int, float, str):
            parser.add_argument(flag, nargs="*", type=_flag_type(typing.get_args(tp)[0]), metavar="X", **kwargs)
        # dicts and nested dataclasses: only through --config or --set


def _whole_number(text: str) -> int:
    """An int flag that also takes scientific notation for a whole number (`--tokens 2e5`),
    as token counts and step budgets are usually written; 2.5 is still refused."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # ValueError for non-numbers: argparse's "invalid int value"
        if not value.is_integer():
            raise
        return int(value)


_whole_number.__name__ = "int"  # argparse names the type in its error message


def _flag_type(tp):
    return _whole_number if tp is int else tp


def _none_or(tp):
    def parse(text: str):
        return None if text.lower() == "none" else tp(text)
    parse.__name__ = tp.__name__
    return parse


def config_from_args(cls: type, args: argparse.Namespace, defaults: Any = None) -> Any:
    """Defaults (`cls()`, or the instance `defaults`, e.g. a profile), then the --config
    file, then flags, then --set; validated into `cls`."""
    data: dict[str, Any] = {}
    if args.config:
        data = read_config_file(args.config)
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            data[f.name] = getattr(args, f.name)
    base = json.loads(json.dumps(dataclasses.asdict(cls() if defaults is None else defaults)))
    data = {**base, **data}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.1.steps=200")
        _set_path(data, key.strip().split("."), _parse_value(raw), key)
    return config_from_dict(cls, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {p} not found")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise UserError(f"config file {p}: cannot parse it ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p}: expected an object of fields at the top level")
    return data


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _set_path(data: Any, keys: list[str], value: Any, full: str) -> None:
    node = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) > len(node):
                raise UserError(f"--set {full}: index {k} is outside the {len(node)} entries")
            j = int(k)
            if j == len(node):
                node.append({})  # one past the end appends a new entry (e.g. a new stage)
            if last:
                node[j] = value
            node = node[j]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise UserError(f"--set {full}: {'.'.join(keys[:i])} is not a table or list")


# --------------------------------------------------------------------------------------
# dict -> dataclass (strict)
# --------------------------------------------------------------------------------------


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build `cls` from plain data; unknown keys and wrong types are `UserError`s."""
    if not isinstance(data, dict):
        raise UserError(f"{where or cls.__name__}: expected a table of fields, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise UserError(f"unknown config key {where + k!r}{hint}")
    kwargs = {k: _convert(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where or cls.__name__}: {e}") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"config key {where!r} may not be null")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item, *_) = typing.get_args(tp)
        return tuple(_convert(v, item, f"{where}.{i}") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {where!r}: expected a table, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 in JSON is a float
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise UserError(f"config key {where!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


# --------------------------------------------------------------------------------------
# The `--lora` shortcut of the stages with LoRA fields (lora_rank, ...)
# --------------------------------------------------------------------------------------

LORA_SHORTCUT_RANK = 16


def add_lora_shortcut(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="store_true",
                   help=f"LoRA with rank {LORA_SHORTCUT_RANK} unless --lora-rank is given "
                        f"(same as --lora-rank {LORA_SHORTCUT_RANK})")


def apply_lora_shortcut(cfg, args: argparse.Namespace):
    """`cfg` with lora_rank set when `--lora` was given without a rank."""
    if getattr(args, "lora", False) and not cfg.lora_rank:
        return dataclasses.replace(cfg, lora_rank=LORA_SHORTCUT_RANK)
    return cfg
