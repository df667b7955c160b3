"""What a new user's first hour tripped over (issue 10): inspecting data through a training config, fix-it hints
in the form the user typed, a run's own system prompt, portable adapters, and the smaller rough edges."""

import json
import os

import pytest
import yaml

from peftune import cli, hints, models
from peftune.config import TrainConfig
from peftune.options import load_config, parse_overrides
from peftune.errors import PeftuneError

QA = "question,answer\nWho are you?,I am {{name}}.\nWhat is 2+2?,4\nSay hi,Hi!\nName a colour,Blue\n"


@pytest.fixture
def qa_csv(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(QA, encoding="utf-8")
    return path


def inspect(*argv):
    return cli.main(["data", "inspect", *map(str, argv)])


# ------------------------------------------------------------------ 1. data inspect reads the training config
def test_inspect_a_training_config_with_column_maps_and_a_mixture(tiny_model_dir, qa_csv, data_file, tmp_path,
                                                                 capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": tiny_model_dir, "cutoff_len": 200, "data_vars": {"name": "Aurora", "author": "Lumen Labs"},
        "data_path": [{"path": "qa.csv", "columns": {"instruction": "question", "output": "answer"}, "weight": 2},
                      {"path": data_file, "max_samples": 5}]}))
    assert inspect(config, "--json", "--cutoff_len", "150") == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["rows"] for s in result["sources"]] == [4, 5]
    assert [s["format"] for s in result["sources"]] == ["alpaca", "alpaca"]
    assert result["cutoff_len"] == 150  # --key value overrides the config, as with train


def test_inspect_bare_file_with_columns_and_the_hint_for_it(tiny_model_dir, qa_csv, capsys):
    assert inspect(qa_csv, "--base_model", tiny_model_dir, "--data_vars.name", "A") == 2
    err = capsys.readouterr().err
    # the error says exactly what to type, in the command's own form
    assert "--columns.instruction question --columns.output answer" in err, err
    assert inspect(qa_csv, "--base_model", tiny_model_dir, "--data_vars.name", "A", "--columns.instruction",
                   "question", "--columns.output", "answer", "--json") == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 4


def test_inspect_help_lists_its_options_and_plot_says_where(tiny_model_dir, data_file, tmp_path, capsys):
    assert inspect("--help") == 0
    usage = capsys.readouterr().out
    for option in ("CONFIG.yaml", "--columns.OURS", "--format", "--json", "--show", "--plot"):
        assert option in usage
    plot = tmp_path / "lengths.png"
    assert inspect(data_file, "--base_model", tiny_model_dir, "--data_vars.name", "A", "--data_vars.author", "B",
                   "--plot", plot) == 0
    assert f"wrote the length histogram to {plot}" in capsys.readouterr().err
    assert plot.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ 2. no dead-end hint
def test_every_row_failing_the_same_way_says_what_to_change(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "half.csv"
    path.write_text("instruction,answer\nWho?,Me\nWhat?,That\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["train", "--base_model", tiny_model_dir, "--data_path", str(path), "--output_dir", str(out),
            "--skip_bad_rows", "true"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "none of its 2 rows is valid alpaca data; all fail the same way: missing required field `output`" in err
    assert f"{path}:2: missing required field `output`" in err
    assert f'`--data_path "{{path: {path}, columns: {{output: answer}}}}"`' in err, err
    assert "skip_bad_rows" not in err  # skipping cannot help when no row is good
    assert not out.exists()
    # and the suggested command-line form works as written
    assert cli.main(argv[:4] + [f"{{path: {path}, columns: {{output: answer}}}}"] + argv[5:] +
                    ["--val_set_size", "0", "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2",
                     "--learning_rate", "1e-2"]) == 0


def test_hints_use_the_form_the_user_typed(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", str(bad),
                     "--output_dir", str(tmp_path / "o")]) == 2
    assert "(`--skip_bad_rows true` skips such rows instead)" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base_model": tiny_model_dir, "data_path": [str(bad)]}))
    assert cli.main(["train", str(config), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"(`skip_bad_rows: true` in {config} skips such rows instead)" in capsys.readouterr().err
    hints.set_style(None)


# ------------------------------------------------------------------ 4. the run's own system prompt
def test_system_prompt_is_trained_saved_and_used_by_chat(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--base_model", tiny_model_dir, "--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs",
              "--system_prompt", "You are {{name}}, made by {{author}}."]
    assert inspect(data_file, *common, "--show", "1") == 0
    shown = capsys.readouterr().out
    assert "<|im_start|>system\nYou are Aurora, made by Lumen Labs.<|im_end|>" in shown
    assert "You are a test assistant." not in shown  # the template's default system prompt is replaced
    assert cli.main(["train", "--data_path", data_file, "--output_dir", str(out), *common, "--max_steps", "2",
                     "--batch_size", "4", "--micro_batch_size", "2", "--learning_rate", "1e-2",
                     "--val_set_size", "0"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["system_prompt"] == "You are Aurora, made by Lumen Labs."
    from peftune.infer.chat import Chat

    chat = Chat(str(out))
    assert chat.system_prompt == "You are Aurora, made by Lumen Labs."
    # a checkpoint directory finds its run's config
    step = sorted(os.listdir(out / "checkpoints"))[-1]
    assert Chat(str(out / "checkpoints" / step)).system_prompt == chat.system_prompt
    # a row with its own system message keeps it
    assert inspect(data_file, *common, "--show", "4", "--json") == 0
    assert "system\nBe brief." in capsys.readouterr().err


def test_system_prompt_placeholder_without_value(tiny_model_dir, data_file, capsys):
    assert inspect(data_file, "--base_model", tiny_model_dir, "--data_vars.name", "A", "--data_vars.author", "B",
                   "--system_prompt", "I am {{nick}}") == 2
    assert "system_prompt: placeholder {{nick}} has no value: set it with --data_vars.nick VALUE" in \
        capsys.readouterr().err


# ------------------------------------------------------------------ 5. portable adapters
def test_adapters_name_a_base_that_resolves_anywhere(tmp_path, monkeypatch):
    assert models.portable_ref("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert models.portable_ref("org/model") == "org/model"
    assert models.portable_ref(str(tmp_path)) == str(tmp_path)
    # an adapter written before, naming another machine's (or a wiped) cache of the embedded model
    stale = "/home/someone/.cache/peftune/models/smollm2-135m-instruct-0123456789ab"
    monkeypatch.setattr(models, "_converted_gguf", lambda path, name: f"converted:{name}")
    monkeypatch.setattr(models, "embedded_gguf", lambda: "x.gguf")
    assert models.resolve_model_path(stale) == "converted:smollm2-135m-instruct"
    assert models.resolve_model_path("smollm2-135m-instruct") == "converted:smollm2-135m-instruct"
    with pytest.raises(PeftuneError, match="no such file or directory"):
        models.resolve_model_path("/home/someone/models/other-model")


# ------------------------------------------------------------------ 7. the smaller ones
def test_yaml_type_error_names_the_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: fast\n")
    with pytest.raises(PeftuneError, match=f"^{config}: learning_rate: expected a number, got 'fast'$"):
        load_config(str(config), {})
    with pytest.raises(PeftuneError, match="^--learning_rate: expected a number, got 'fast'$"):
        load_config(None, parse_overrides(["--learning_rate", "fast"]))


def test_a_key_of_another_method_is_refused_even_at_its_default(tmp_path, capsys):
    with pytest.raises(PeftuneError, match="lora_r: not used by peft_method ia3"):
        load_config(None, parse_overrides(["--peft_method", "ia3", "--lora_r", "16"]))
    config = tmp_path / "ia3.yaml"
    config.write_text("peft_method: ia3\nlora_r: 16\n")
    with pytest.raises(PeftuneError, match="lora_r: not used by peft_method ia3"):
        load_config(str(config), {})
    # switching the method on the command line ignores the file's keys of the old method, and says so
    config.write_text("lora_r: 8\nlora_alpha: 16\nlearning_rate: 1e-3\n")
    notes = []
    cfg = load_config(str(config), parse_overrides(["--peft_method", "ia3"]), say=notes.append)
    assert cfg.peft_method == "ia3" and cfg.lora_r == TrainConfig().lora_r and cfg.learning_rate == 1e-3
    assert notes == [f"note: --peft_method ia3 does not use lora_r, lora_alpha from {config}; ignored"]


def test_missing_adapter_directory_is_named(capsys):
    assert cli.main(["chat", "--adapter", "/nonexistent/run", "--prompt", "hi"]) == 2
    assert "--adapter /nonexistent/run: no such directory" in capsys.readouterr().err


def test_resume_command_is_the_users_command():
    assert cli.resume_command(["run.yaml", "--output_dir", "out dir", "--resume_from_checkpoint", "x"]) == \
        "peftune train run.yaml --output_dir 'out dir' --resume_from_checkpoint auto"
