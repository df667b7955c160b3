"""File types → (row number, record) pairs, numbered from 1 as a user counts them.

JSON, JSONL and CSV are parsed with the standard library rather than `datasets`: Arrow's readers report neither
the row of a bad value nor the line of a syntax error, and they coerce types silently (a CSV cell "5" becomes
an integer). Parquet, `save_to_disk` directories and hub datasets are read with `datasets`; their rows are
numbered by position.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Iterator

from ..errors import PeftuneError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    if os.path.isdir(path):
        yield from _read_dataset_dir(path)
        return
    if not os.path.exists(path):
        if HUB_ID.match(path) and not os.path.splitext(path)[1]:
            yield from _read_hub(path)
            return
        raise PeftuneError(f"{path}: data file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        yield from _read_parquet(path)
        return
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise PeftuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise PeftuneError(f"{path}: the file is empty")
    if ext == ".csv":
        yield from _read_csv(path, text)
    elif ext == ".jsonl" or (ext != ".json" and not text.lstrip().startswith("[")):
        yield from _read_jsonl(path, text)
    else:
        yield from _read_json(path, text)


def _read_jsonl(path: str, text: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise PeftuneError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _read_json(path: str, text: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PeftuneError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise PeftuneError(f"{path}: expected a JSON array of rows (or a .jsonl file with one row per line)")
    yield from enumerate(data, start=1)


def _read_csv(path: str, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise PeftuneError(f"{path}: no header row")
    for number, rec in enumerate(reader, start=1):
        if None in rec:  # more cells than the header names
            raise PeftuneError(f"{path}:{number}: this CSV row has more cells than the header")
        yield number, {k: v for k, v in rec.items() if v is not None}


def _rows_of(dataset) -> Iterator[tuple[int, Any]]:
    for i, rec in enumerate(dataset, start=1):
        yield i, rec


def _read_parquet(path: str) -> Iterator[tuple[int, Any]]:
    from datasets import Dataset

    try:
        dataset = Dataset.from_parquet(path)
    except Exception as e:  # pyarrow raises many types for a broken file
        raise PeftuneError(f"{path}: cannot read as parquet ({type(e).__name__}: {str(e)[:200]})") from None
    yield from _rows_of(dataset)


def _read_dataset_dir(path: str) -> Iterator[tuple[int, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise PeftuneError(f"{path}: not a `datasets` directory saved with save_to_disk ({str(e)[:200]})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise PeftuneError(f"{path}: has splits {list(dataset)}; expected a `train` split")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    yield from _rows_of(dataset)


def _read_hub(name: str) -> Iterator[tuple[int, Any]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split="train")
    except Exception as e:  # offline, unknown id, no train split ...
        hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise PeftuneError(f"{name}: not a local file, and the hub dataset could not be loaded{hint}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    yield from _rows_of(dataset)
