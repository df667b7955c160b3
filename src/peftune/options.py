"""A config from a YAML file and `--key value` options: parsing, coercion to the schema's types (config.py), the
help text and docs/config.md. Every problem is a PeftuneError naming the file or option."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Optional, Union

import yaml

from .config import FORMATS, SOURCE_KEYS, DataSource, TrainConfig, _suggest, field_default
from .errors import PeftuneError


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say clearly why it cannot be."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, inner, value)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        out: list = []
        for item in items:  # comma lists and repeated flags both end up here
            if isinstance(item, str) and item.lstrip().startswith("{"):  # --data_path "{path: a.csv, weight: 2}"
                try:
                    out.append(yaml.safe_load(item))
                except yaml.YAMLError as e:
                    raise PeftuneError(f"{key}: {item!r} is not a valid YAML mapping ({e.problem})") from None
            elif isinstance(item, str):
                out.extend(part.strip() for part in item.split(",") if part.strip())
            else:
                out.append(item)
        return [_coerce(key, args[0], v) for v in out]
    if origin is dict:
        if not isinstance(value, dict):
            raise PeftuneError(f"{key}: expected a mapping (YAML mapping or `--{key}.NAME VALUE`), got {value!r}")
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    if typ is DataSource:
        return _coerce_source(key, value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise PeftuneError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise PeftuneError(f"{key}: expected a number, got {value!r}")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise PeftuneError(f"{key}: expected a{'n integer' if typ is int else ' number'}, got {value!r}") from None
        if typ is int:
            if num != int(num):
                raise PeftuneError(f"{key}: expected an integer, got {value!r}")
            return int(num)
        return num
    if typ is str:
        if isinstance(value, (dict, list)):
            raise PeftuneError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")  # a bug in the schema, not user input


def _coerce_source(key: str, value: Any) -> Any:
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, dict):
        raise PeftuneError(f"{key}: an entry must be a path or a mapping with {', '.join(SOURCE_KEYS)}; got {value!r}")
    for k in value:
        if k not in SOURCE_KEYS:
            raise PeftuneError(f"{key}: unknown key `{k}` in a data source" + _suggest(str(k), SOURCE_KEYS))
    if not isinstance(value.get("path"), str) or not value["path"]:
        raise PeftuneError(f"{key}: a data source mapping needs `path`, got {value!r}")
    out = {"path": value["path"]}
    if value.get("format") is not None:
        if value["format"] not in FORMATS:
            raise PeftuneError(f"{key}.format: must be one of {', '.join(FORMATS)}; got {value['format']!r}"
                               + _suggest(str(value["format"]), FORMATS))
        out["format"] = value["format"]
    if value.get("columns") is not None:
        if not isinstance(value["columns"], dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value["columns"].items()):
            raise PeftuneError(f"{key}.columns: a mapping of our field names to yours, got {value['columns']!r}")
        out["columns"] = dict(value["columns"])
    if value.get("max_samples") is not None:
        out["max_samples"] = _coerce(f"{key}.max_samples", int, value["max_samples"])
        if out["max_samples"] < 1:
            raise PeftuneError(f"{key}.max_samples: must be >= 1, got {out['max_samples']}")
    if value.get("weight") is not None:
        out["weight"] = _coerce(f"{key}.weight", float, value["weight"])
        if out["weight"] <= 0:
            raise PeftuneError(f"{key}.weight: must be > 0, got {out['weight']}")
    return out


def parse_overrides(argv: list[str], cls=TrainConfig) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--dict.name value`, repeated flags for lists, bare `--flag` for booleans."""
    types = _field_types(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise PeftuneError(f"unexpected argument {arg!r}: options look like `--key value`")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        top, _, sub = key.partition(".")
        if top not in types:
            raise PeftuneError(f"unknown option --{key}" + _suggest(top, types))
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if types[top] is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise PeftuneError(f"--{key}: needs a value")
            else:
                value, i = nxt, i + 1
        i += 1
        if sub:
            if typing.get_origin(types[top]) is not dict:
                raise PeftuneError(f"--{key}: {top} has no sub-keys")
            out.setdefault(top, {})[sub] = value
        elif typing.get_origin(types[top]) is list:
            out.setdefault(top, []).append(value)
        else:
            out[top] = value
    return out


def load_config(path: Optional[str], overrides: dict[str, Any], cls=TrainConfig, say=None):
    """YAML file (optional), then command-line overrides; unknown keys and bad values are PeftuneErrors."""
    if say is None:
        import sys

        say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise PeftuneError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise PeftuneError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise PeftuneError(f"{path}: expected a mapping of config keys at the top level")
        base = os.path.dirname(os.path.abspath(path))
        raw = dict(raw)
        for key in ("data_path", "val_data_path"):  # data paths in a YAML file are relative to that file
            if key not in raw:
                continue
            items = raw[key] if isinstance(raw[key], list) else [raw[key]]
            raw[key] = [{**p, "path": _relative_to(base, p.get("path"))} if isinstance(p, dict)
                                else _relative_to(base, p) for p in items]
    types = _field_types(cls)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}  # key -> "file" or "command line": where the user set it
    for source, values in ((path or "config", raw), ("command line", overrides)):
        for key, value in values.items():
            if key not in types:
                raise PeftuneError(f"{source}: unknown key `{key}`" + _suggest(key, types))
            if typing.get_origin(types[key]) is dict and isinstance(value, dict):
                value = {**merged.get(key, {}), **value}  # --data_vars.name adds to the YAML's data_vars
            try:
                merged[key] = _coerce(key, types[key], value)
            except PeftuneError as e:
                if source == "command line":
                    raise PeftuneError(f"--{e}" if str(e).startswith(key) else str(e)) from None
                raise PeftuneError(f"{path}: {e}") from None
            origin[key] = "command line" if source == "command line" else "file"
    _drop_foreign_keys(cls, merged, origin, path, say)
    from . import hints

    hints.set_style(path)
    return cls(**merged)


def _drop_foreign_keys(cls, merged: dict, origin: dict, path: Optional[str], say) -> None:
    """A key of another peft_method that the user set is refused, even at its default value, unless the command
    line switched peft_method away from the config file's: `peftune train lora.yaml --peft_method ia3` ignores the
    file's LoRA keys (and says so) rather than making the user edit the file."""
    method_field = next((f for f in dataclasses.fields(cls) if f.name == "peft_method"), None)
    if method_field is None:
        return
    method = merged.get("peft_method", field_default(method_field))
    foreign = [f for f in dataclasses.fields(cls) if f.name in merged and f.metadata.get("methods")
               and method not in f.metadata["methods"]]
    switched = origin.get("peft_method") == "command line"
    ignored = [f.name for f in foreign if switched and origin[f.name] == "file"]
    refused = [f for f in foreign if f.name not in ignored]
    if refused:
        owners = "; ".join(f"{f.name} is for {', '.join(f.metadata['methods'])}" for f in refused)
        raise PeftuneError(f"{', '.join(f.name for f in refused)}: not used by peft_method {method} ({owners}); "
                           f"remove {'it' if len(refused) == 1 else 'them'} or choose that method")
    for name in ignored:
        del merged[name]
    if ignored:
        say(f"note: --peft_method {method} does not use {', '.join(ignored)} from {path}; ignored")


def _relative_to(base: str, p: Any) -> Any:
    if isinstance(p, str) and not os.path.isabs(p) and not os.path.exists(p):
        candidate = os.path.join(base, p)
        if os.path.exists(candidate):
            return candidate
    return p


def save_config(cfg, path: str) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def help_text(cls=TrainConfig) -> str:
    lines = []
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = field_default(f)
        typ = getattr(types[f.name], "__name__", str(types[f.name]).replace("typing.", ""))
        lines.append(f"  --{f.name} ({typ}, default: {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)


def markdown_docs(cls=TrainConfig) -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = field_default(f)
        rows.append(f"| `{f.name}` | `{default!r}` | {f.metadata['help'].replace('|', '/')} |")
    return ("# Training configuration\n\nGenerated from `src/peftune/config.py` by `peftune docs`; every key works in a "
            "YAML config and as `--key value` on the command line.\n\n" + "\n".join(rows) + "\n")
