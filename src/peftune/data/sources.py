"""Read data files into uniform conversation rows, validating every row (errors name FILE:ROW and the field).

A conversation row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
"source": path, "row": n}` with rows numbered from 1 (the JSON array element, or the JSONL line).

JSON is parsed with the standard library rather than `datasets`: Arrow's JSON reader reports neither the row
of a bad value nor the line of a syntax error, and coerces mixed types silently; exact errors matter more here.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Iterable, Iterator

from ..errors import PeftuneError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
MAX_REPORTED = 10


class RowErrors:
    """Collects `FILE:ROW: message` problems; raises one PeftuneError listing the first few and the count."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, row: int, message: str) -> None:
        self.items.append(f"{path}:{row}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n".join(self.items[:MAX_REPORTED])
            more = f"\n... and {len(self.items) - MAX_REPORTED} more" if len(self.items) > MAX_REPORTED else ""
            raise PeftuneError(f"invalid data ({len(self.items)} problem{'s' * (len(self.items) > 1)}):\n{shown}{more}")


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    """(row number, parsed record) for a .json array or a .jsonl file."""
    if not os.path.isfile(path):
        raise PeftuneError(f"{path}: data file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise PeftuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise PeftuneError(f"{path}: the file is empty")
    if ext == ".jsonl" or (ext != ".json" and not text.lstrip().startswith("[")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PeftuneError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PeftuneError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise PeftuneError(f"{path}: expected a JSON array of rows (or a .jsonl file with one row per line)")
    yield from enumerate(data, start=1)


def fill_placeholders(text: str, variables: dict[str, str], missing: set[str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) in variables:
            return variables[m.group(1)]
        missing.add(m.group(1))
        return m.group(0)

    return PLACEHOLDER.sub(sub, text)


def _string_field(rec: dict, key: str, required: bool, path: str, row: int, errors: RowErrors) -> str | None:
    value = rec.get(key)
    if value is None:
        if required:
            errors.add(path, row, f"missing required field `{key}`")
        return None
    if not isinstance(value, str):
        errors.add(path, row, f"field `{key}` must be a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        errors.add(path, row, f"field `{key}` is empty")
        return None
    return value


def alpaca_to_messages(rec: Any, path: str, row: int, errors: RowErrors) -> list[dict] | None:
    """alpaca: instruction, input, output, optional system and history ([[user, assistant], ...])."""
    if not isinstance(rec, dict):
        errors.add(path, row, f"expected an object with `instruction` and `output`, got {type(rec).__name__}")
        return None
    before = len(errors.items)
    instruction = _string_field(rec, "instruction", True, path, row, errors)
    output = _string_field(rec, "output", True, path, row, errors)
    extra = _string_field(rec, "input", False, path, row, errors)
    system = _string_field(rec, "system", False, path, row, errors)
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        errors.add(path, row, "field `history` must be a list of [user, assistant] string pairs")
    if len(errors.items) > before:
        return None
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    # instruction/input stay separate too, for templates that place them apart (alpaca-lora's)
    messages += [{"role": "user", "content": prompt, "instruction": instruction, "input": extra or ""},
                 {"role": "assistant", "content": output}]
    return messages


def source_spec(entry) -> dict:
    return {"path": entry} if isinstance(entry, str) else dict(entry)


def load_rows(sources: Iterable, variables: dict[str, str] | None = None, seed: int = 0) -> list[dict]:
    """Reads and validates every source; raises one PeftuneError naming each bad FILE:ROW (first few + count).

    A source is a path or a mapping {path, max_samples, weight}: `max_samples` keeps a seeded random choice of
    rows (in file order); `weight` is carried on each row and applied by `apply_weights` after the validation
    split, so a repeated row never lands in both the training and the validation set.
    """
    variables = variables or {}
    errors = RowErrors()
    rows: list[dict] = []
    for index, entry in enumerate(sources):
        spec = source_spec(entry)
        path = spec["path"]
        found: list[dict] = []
        for row, rec in read_records(path):
            messages = alpaca_to_messages(rec, path, row, errors)
            if messages is None:
                continue
            missing: set[str] = set()
            for m in messages:
                for key in ("content", "instruction", "input"):
                    if key in m:
                        m[key] = fill_placeholders(m[key], variables, missing)
            if missing:
                names = ", ".join(sorted(missing))
                errors.add(path, row, f"placeholder {{{{{names}}}}} has no value: set it with "
                           + " ".join(f"--data_vars.{n} VALUE" for n in sorted(missing)))
                continue
            found.append({"messages": messages, "source": path, "row": row, "weight": spec.get("weight", 1.0)})
        if not found and not errors.items:
            raise PeftuneError(f"{path}: no rows")
        if spec.get("max_samples") and spec["max_samples"] < len(found):
            keep = sorted(random.Random(f"{seed}/{index}").sample(range(len(found)), spec["max_samples"]))
            found = [found[i] for i in keep]
        rows += found
    errors.raise_if_any()
    return rows


def apply_weights(rows: list[dict], seed: int) -> list[dict]:
    """Repeats each row `weight` times: the whole part always, the fractional part as a seeded random share."""
    rng = random.Random(f"{seed}/weights")
    out = []
    for r in rows:
        w = r.get("weight", 1.0)
        out += [r] * (int(w) + (rng.random() < w - int(w)))
    return out
