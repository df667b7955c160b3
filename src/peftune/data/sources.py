"""Data sources → validated uniform rows: reading (readers.py), format detection and conversion (formats.py),
placeholders, per-source sampling and weights. Every problem names FILE:ROW and the field.

A source is a path or a mapping {path, format, columns, max_samples, weight}.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .. import hints
from ..errors import PeftuneError
from .formats import FORMATS, RowError, RowErrors, apply_columns, convert, detect_format
from .readers import read_records

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass
class SourceReport:
    path: str
    format: str
    rows: int = 0
    bad_rows: list[int] = field(default_factory=list)


def fill_placeholders(text: str, variables: dict[str, str], missing: set[str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) in variables:
            return variables[m.group(1)]
        missing.add(m.group(1))
        return m.group(0)

    return PLACEHOLDER.sub(sub, text)


def source_spec(entry) -> dict:
    return {"path": entry} if isinstance(entry, str) else dict(entry)


def _fill_row(row: dict, variables: dict[str, str]) -> set[str]:
    missing: set[str] = set()
    if "text" in row:
        row["text"] = fill_placeholders(row["text"], variables, missing)
    for m in row.get("messages", []):
        for key in ("content", "instruction", "input"):
            if isinstance(m.get(key), str):
                m[key] = fill_placeholders(m[key], variables, missing)
    return missing


def read_source(spec: dict, variables: dict[str, str], errors: RowErrors) -> tuple[list[dict], SourceReport]:
    path, fmt = spec["path"], spec.get("format")
    records = list(read_records(path))
    if not records:
        raise PeftuneError(f"{path}: no rows")
    if fmt is None:  # the most common format among the first rows; rows of another shape are then reported
        votes = Counter(detect_format(apply_columns(rec, spec.get("columns"))) for _, rec in records[:100])
        votes.pop(None, None)
        if not votes:
            number, rec = records[0]
            if not isinstance(rec, dict):
                raise PeftuneError(f"{path}:{number}: expected an object per row, got {type(rec).__name__}")
            fields = ", ".join(sorted(rec))
            raise PeftuneError(f"{path}:{number}: cannot recognise the data format (fields: {fields}); expected "
                               f"one of {', '.join(FORMATS)}. Map your fields to ours: "
                               + hints.columns(path, *guess_columns(rec, None)))
        fmt = votes.most_common(1)[0][0]
    report = SourceReport(path, fmt)
    rows: list[dict] = []
    for number, rec in records:
        try:
            row = convert(rec, fmt, spec.get("columns"))
        except RowError as e:
            errors.add(path, number, str(e))
            report.bad_rows.append(number)
            continue
        missing = _fill_row(row, variables)
        if missing:
            names = sorted(missing)
            errors.add(path, number, f"placeholder {', '.join('{{' + n + '}}' for n in names)} has no value: set it "
                       "with " + " ".join(f"--data_vars.{n} VALUE" for n in names))
            report.bad_rows.append(number)
            continue
        row.update(source=path, row=number, weight=spec.get("weight", 1.0))
        rows.append(row)
    report.rows = len(rows) + len(report.bad_rows)
    if not rows:
        _every_row_failed(path, fmt, spec, records, errors)
    return rows, report


# Common names of our fields in other people's data, for the column-map hint.
SYNONYMS = {"instruction": ("question", "prompt", "query", "input", "q", "problem", "user", "request", "task"),
            "output": ("answer", "response", "completion", "target", "a", "solution", "assistant", "reply"),
            "text": ("content", "document", "body", "passage", "article")}


def guess_columns(rec: dict, fmt: str | None) -> tuple[dict[str, str], str]:
    """(a columns mapping, the format it implies) from a record's field names: our fields it lacks, each mapped to
    a field with a common name for it, or to YOUR_FIELD for the user to fill in."""
    lower = {k.lower(): k for k in rec if isinstance(k, str)}

    def pick(ours: str, names: tuple[str, ...], taken: set) -> str | None:
        return next((lower[n] for n in (ours, *names) if n in lower and lower[n] not in taken), None)

    if fmt == "text" or (fmt is None and pick("text", SYNONYMS["text"], set()) and not pick("output", SYNONYMS["output"], set())):
        wanted, fmt = {"text": "text"}, "text"
    elif fmt == "prompt_completion":
        wanted = {"prompt": "instruction", "completion": "output"}
    else:
        wanted, fmt = {"instruction": "instruction", "output": "output"}, "alpaca"
    mapping, taken = {}, set()
    for ours, kind in wanted.items():
        if ours in rec:
            taken.add(ours)
            continue
        theirs = pick(kind, SYNONYMS[kind], taken)
        mapping[ours] = theirs or "YOUR_FIELD"
        taken.add(theirs)
    return mapping, fmt


def _every_row_failed(path: str, fmt: str, spec: dict, records: list, errors: RowErrors) -> None:
    """Skipping bad rows cannot help when none is good: say what is wrong with all of them and what to change."""
    mine = [e for e in errors.items if e.startswith(f"{path}:")]
    reasons = Counter(e.split(": ", 1)[1] for e in mine)
    reason, count = reasons.most_common(1)[0]
    message = f"{path}: none of its {len(records)} rows is valid {fmt} data; "
    message += f"all fail the same way: {reason}" if count == len(mine) else \
        f"the most common problem ({count} rows): {reason}"
    message += "\n" + "\n".join(mine[:3]) + (f"\n... and {len(mine) - 3} more" if len(mine) > 3 else "")
    missing = re.search(r"missing required field `(\w+)`", reason)
    rec = next((r for _, r in records if isinstance(r, dict)), None)
    if missing and rec is not None:
        mapping, implied = guess_columns(rec, fmt)
        mapping = {**(spec.get("columns") or {}), **mapping}
        message += (f"\nThe file's fields are {', '.join(sorted(map(str, rec)))}: map them to ours with "
                    + hints.columns(path, mapping, implied if implied != fmt or spec.get("format") else None))
    raise PeftuneError(message)


def load_rows(sources: Iterable, variables: dict[str, str] | None = None, seed: int = 0,
              skip_bad_rows: bool = False, warn=print, reports: list | None = None) -> list[dict]:
    """Reads and validates every source; raises one PeftuneError naming each bad FILE:ROW (first few + count),
    or with skip_bad_rows leaves those rows out and says which.

    `max_samples` keeps a seeded random choice of a source's rows (in file order); `weight` is carried on each
    row and applied by `apply_weights` after the validation split, so a repeated row never lands in both the
    training and the validation set.
    """
    variables = variables or {}
    errors = RowErrors()
    rows: list[dict] = []
    for index, entry in enumerate(sources):
        spec = source_spec(entry)
        found, report = read_source(spec, variables, errors)
        if reports is not None:
            reports.append(report)
        if spec.get("max_samples") and spec["max_samples"] < len(found):
            keep = sorted(random.Random(f"{seed}/{index}").sample(range(len(found)), spec["max_samples"]))
            found = [found[i] for i in keep]
        rows += found
    if errors.items and skip_bad_rows:
        warn(f"warning: skipped {errors.summary()}")
    elif errors.items:
        errors.raise_if_any()
    if not rows:
        raise PeftuneError("no valid rows in the data")
    return rows


def system_prompt(template: str | None, variables: dict[str, str]) -> str | None:
    """The run's default system message with its `{{placeholders}}` filled; None when there is none."""
    if not template or not template.strip():
        return None
    missing: set[str] = set()
    text = fill_placeholders(template, variables, missing)
    if missing:
        names = sorted(missing)
        raise PeftuneError(f"system_prompt: placeholder {', '.join('{{' + n + '}}' for n in names)} has no value: "
                           "set it with " + " ".join(f"--data_vars.{n} VALUE" for n in names))
    return text


def add_system_prompt(rows: list[dict], system: str | None) -> list[dict]:
    """Conversation rows without a system message get the run's default one; rows with their own keep it."""
    if not system:
        return rows
    return [{**r, "messages": [{"role": "system", "content": system}] + r["messages"]}
            if "messages" in r and not any(m["role"] == "system" for m in r["messages"]) else r for r in rows]


def apply_weights(rows: list[dict], seed: int) -> list[dict]:
    """Repeats each row `weight` times: the whole part always, the fractional part as a seeded random share."""
    rng = random.Random(f"{seed}/weights")
    out = []
    for r in rows:
        w = r.get("weight", 1.0)
        out += [r] * (int(w) + (rng.random() < w - int(w)))
    return out
