import json

from peftune import cli


def test_inspect_json_on_a_known_file(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.json"
    rows = [{"instruction": "ab", "output": "cd"}, {"instruction": "ab", "output": "cd"},
            {"instruction": "ab", "output": "y" * 100}]
    path.write_text(json.dumps(rows))
    plot = tmp_path / "len.png"
    assert cli.main(["data", "inspect", str(path), "--base_model", tiny_model_dir, "--cutoff_len", "100", "--json",
                     "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    # byte-level tiny tokenizer: the chat template's system + user + assistant frame is 54 tokens, plus one
    # token per byte of text and the EOS
    frame = 54
    assert result["format"] == "alpaca" and result["rows"] == 3 and result["bad_rows"] == 0
    assert result["tokens"] == {"p50": frame + 5, "p90": frame + 103, "p99": frame + 103, "max": frame + 103}
    assert result["truncated"] == 1 and result["duplicates"] == 1
    # trained: "cd" + EOS in each short row, and the long answer up to the cut (no EOS), over all kept tokens
    assert result["trained_token_fraction"] == round((3 + 3 + (100 - frame - 2)) / (2 * (frame + 5) + 100), 4)
    assert result["sources"][0]["path"] == str(path) and result["sources"][0]["rows"] == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_show_marks_the_trained_span(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "completion": "A!"}) + "\n")
    assert cli.main(["data", "inspect", str(path), "--base_model", tiny_model_dir, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "user\nQ?<|im_end|>\n<|im_start|>assistant\n«A!<|im_end|>»" in out
    assert "format prompt_completion, 1 rows" in out


def test_inspect_invalid_data_exits_2(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a"}]')
    assert cli.main(["data", "inspect", str(path), "--base_model", tiny_model_dir]) == 2
    assert f"{path}:1: missing required field `output`" in capsys.readouterr().err
