"""Fixtures of the training tests on several processes."""

import json

import pytest

from tiny import ROWS


@pytest.fixture
def uneven_data(tmp_path):
    """25 rows of very different lengths: 21 train, so each epoch's last step has 1 sample (process 1 only stands
    in), and the processes' labelled tokens differ a lot from micro-batch to micro-batch."""
    rows = [dict(ROWS[i % len(ROWS)]) for i in range(25)]
    for i, row in enumerate(rows):
        row["output"] = row["output"] + " more" * (i * 7 % 40)
    path = tmp_path / "uneven.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)
