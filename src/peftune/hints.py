"""Fix-it hints written in the form the user typed: a YAML key for a run read from a config file, an option on the
command line otherwise. The CLI says which form once per command (`set_style`); the data code asks for hints."""

from __future__ import annotations

import json

_style = {"file": None, "verb": "train"}


def set_style(config_file: str | None, verb: str = "train") -> None:
    """config_file: the YAML file the run came from (None: command-line options only); verb: `train` or
    `inspect` (bare data files given to `peftune data inspect`)."""
    _style.update(file=config_file, verb=verb)


def setting(key: str, value: str) -> str:
    """How to set one config key: "`skip_bad_rows: true` in run.yaml" or "`--skip_bad_rows true`"."""
    if _style["file"]:
        return f"`{key}: {value}` in {_style['file']}"
    return f"`--{key} {value}`"


def _flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in mapping.items()) + "}"


def _scalar(value) -> str:
    if isinstance(value, dict):
        return _flow(value)
    text = str(value)
    plain = text and all(c.isalnum() or c in "_-./" for c in text)
    return text if plain else json.dumps(text, ensure_ascii=False)


def columns(path: str, mapping: dict[str, str], fmt: str | None = None) -> str:
    """How to map a source's fields to ours (`columns:`), in the form the user typed."""
    if _style["verb"] == "inspect" and not _style["file"]:
        flags = " ".join(f"--columns.{ours} {_scalar(theirs)}" for ours, theirs in mapping.items())
        return f"`{flags}" + (f" --format {fmt}`" if fmt else "`")
    entry = {"path": path, **({"format": fmt} if fmt else {}), "columns": mapping}
    if _style["file"]:
        return f"the data_path entry `{_flow(entry)}` in {_style['file']}"
    return f"`--data_path \"{_flow(entry)}\"`"
