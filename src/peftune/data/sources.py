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
            fields = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise PeftuneError(f"{path}:{number}: cannot recognise the data format (fields: {fields}); expected "
                               f"one of {', '.join(FORMATS)}: set `format:` (and `columns:`) for this source")
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
    return rows, report


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


def apply_weights(rows: list[dict], seed: int) -> list[dict]:
    """Repeats each row `weight` times: the whole part always, the fractional part as a seeded random share."""
    rng = random.Random(f"{seed}/weights")
    out = []
    for r in rows:
        w = r.get("weight", 1.0)
        out += [r] * (int(w) + (rng.random() < w - int(w)))
    return out
