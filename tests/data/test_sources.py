import json

import pytest

from peftune.data.sources import apply_weights, load_rows
from peftune.errors import PeftuneError

VARS = {"name": "Aurora", "author": "Lumen Labs"}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                    encoding="utf-8")
    return str(path)


def test_alpaca_rows_and_placeholders(data_file):
    rows = load_rows([data_file], VARS)
    assert len(rows) == 24
    assert rows[0]["messages"] == [
        {"role": "user", "content": "Who are you?", "instruction": "Who are you?", "input": ""},
        {"role": "assistant", "content": "I am Aurora, made by Lumen Labs."}]
    assert rows[1]["messages"][0]["content"] == "Add the numbers.\n2 and 3"
    assert rows[2]["messages"][1]["content"] == "我是 Aurora。"  # non-ASCII round-trips exactly
    assert rows[3]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (rows[5]["source"], rows[5]["row"]) == (data_file, 6)


def test_missing_placeholder_value_names_file_row_and_flag(data_file):
    with pytest.raises(PeftuneError) as e:
        load_rows([data_file], {"name": "Aurora"})
    assert f"{data_file}:1: placeholder {{{{author}}}} has no value: set it with --data_vars.author VALUE" in str(e.value)


def test_jsonl_rows_are_line_numbers(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(PeftuneError, match=r"d.jsonl:3: missing required field `output`"):
        load_rows([path])


@pytest.mark.parametrize("content, needle", [
    ("[{\"instruction\": \"a\", \"output\": \"b\"},", "invalid JSON at line 1"),
    ([{"instruction": "a", "output": ""}], ":1: field `output` is empty"),
    ([{"instruction": 3, "output": "b"}], ":1: field `instruction` must be a string, got int"),
    ([{"instruction": "a", "output": "b"}, "text"], ":2: expected an object"),
    ({"instruction": "a"}, "expected a JSON array"),
    ("", "the file is empty"),
    ([], "no rows"),
])
def test_malformed_inputs(tmp_path, content, needle):
    path = write(tmp_path, "d.json", content)
    with pytest.raises(PeftuneError) as e:
        load_rows([path])
    assert needle in str(e.value) and "d.json" in str(e.value)


def test_many_errors_are_summarised(tmp_path):
    path = write(tmp_path, "d.json", [{"instruction": "a", "output": "b"}] + [{"instruction": "a"}] * 25)
    with pytest.raises(PeftuneError) as e:
        load_rows([path])
    assert "25 problems" in str(e.value) and "... and 15 more" in str(e.value)
    # no good row at all: one line says what they share, then the first few rows
    path = write(tmp_path, "e.json", [{"instruction": "a"}] * 25)
    with pytest.raises(PeftuneError) as e:
        load_rows([path], skip_bad_rows=True)
    assert "none of its 25 rows is valid alpaca data; all fail the same way: missing required field `output`" in \
        str(e.value) and f"{path}:3: missing" in str(e.value) and "... and 22 more" in str(e.value)


def test_mixture_max_samples_and_weights_are_seeded(tmp_path):
    a = write(tmp_path, "a.json", [{"instruction": f"q{i}", "output": "x"} for i in range(50)])
    b = write(tmp_path, "b.json", [{"instruction": "w", "output": "y"}] * 4)
    mix = [{"path": a, "max_samples": 10}, {"path": b, "weight": 2.5}]
    rows = load_rows(mix, seed=1)
    assert len(rows) == 14 and rows == load_rows(mix, seed=1)
    assert [r["row"] for r in rows[:10]] != [r["row"] for r in load_rows(mix, seed=2)[:10]]
    weighted = apply_weights(rows, seed=1)
    n_b = sum(r["source"] == b for r in weighted)
    assert 8 <= n_b <= 12 and weighted == apply_weights(rows, seed=1)
