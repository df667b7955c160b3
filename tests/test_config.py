import dataclasses
import os

import pytest
import yaml

from peftune import cli
from peftune.config import TrainConfig
from peftune.options import load_config, markdown_docs, parse_overrides
from peftune.errors import PeftuneError


def cfg_from(argv, path=None):
    return load_config(path, parse_overrides(argv))


def test_overrides_types_lists_and_dotted_keys():
    cfg = cfg_from(["--data_path", "a.json", "--data_path", "b.json,c.jsonl", "--lora_r", "4",
                    "--learning_rate=1e-3", "--train_on_inputs", "--data_vars.name", "Aurora",
                    "--data_vars.author", "Lumen Labs", "--max_steps", "none", "--lora_target_modules", "q_proj,v_proj"])
    assert cfg.data_path == ["a.json", "b.json", "c.jsonl"]
    assert cfg.lora_r == 4 and cfg.learning_rate == 1e-3 and cfg.train_on_inputs is True
    assert cfg.data_vars == {"name": "Aurora", "author": "Lumen Labs"}
    assert cfg.max_steps is None
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_yaml_then_command_line(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_path": ["d.json", {"path": "d.json", "max_samples": 3, "weight": 2}],
                                    "data_vars": {"name": "A", "author": "B"}, "lora_r": 8}))
    cfg = cfg_from(["--lora_r", "2", "--data_vars.name", "Aurora"], str(path))
    assert cfg.lora_r == 2
    assert cfg.data_vars == {"name": "Aurora", "author": "B"}  # dotted keys add to the YAML's mapping
    # data paths in a YAML file are relative to the file
    assert cfg.data_path == [str(tmp_path / "d.json"), {"path": str(tmp_path / "d.json"), "max_samples": 3,
                                                        "weight": 2.0}]


@pytest.mark.parametrize("argv, needle", [
    (["--lora_rank", "8"], "unknown option --lora_rank (did you mean `lora_r`?)"),
    (["--learning_rat", "1"], "did you mean `learning_rate`?"),
    (["--lora_r", "eight"], "lora_r: expected an integer, got 'eight'"),
    (["--lora_r", "2.5"], "lora_r: expected an integer"),
    (["--train_on_inputs", "maybe"], "train_on_inputs: expected true or false"),
    (["--batch_size"], "--batch_size: needs a value"),
    (["positional"], "unexpected argument 'positional'"),
    (["--lora_r.x", "1"], "lora_r has no sub-keys"),
])
def test_bad_options_name_the_key(argv, needle):
    with pytest.raises(PeftuneError) as e:
        cfg_from(argv)
    assert needle in str(e.value)


def test_unknown_yaml_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("micro_batchsize: 4\n")
    with pytest.raises(PeftuneError, match=r"unknown key `micro_batchsize` \(did you mean `micro_batch_size`\?\)"):
        cfg_from([], str(path))


@pytest.mark.parametrize("changes, needle", [
    ({"batch_size": 10, "micro_batch_size": 4}, "batch_size (10) must be a multiple of micro_batch_size (4)"),
    ({"data_path": []}, "data_path: give at least one data file"),
    ({"val_set_size": 2.5}, "val_set_size: a row count"),
    ({"lr_scheduler": "cosin"}, "did you mean `cosine`?"),
    ({"micro_batch_size": 0}, "micro_batch_size: must be >= 1"),
    ({"lora_dropout": 1.0}, "lora_dropout: must be in [0, 1)"),
])
def test_validation_refusals(changes, needle):
    cfg = dataclasses.replace(TrainConfig(data_path=["x.json"]), **changes)
    with pytest.raises(PeftuneError) as e:
        cfg.validate()
    assert needle in str(e.value)


def test_multiple_of_processes():
    with pytest.raises(PeftuneError, match=r"x processes \(2\) = 8"):
        TrainConfig(data_path=["x"], batch_size=12, micro_batch_size=4).validate(num_processes=2)
    TrainConfig(data_path=["x"], batch_size=16, micro_batch_size=4).validate(num_processes=2)


def test_cli_exit_status_2_and_message(capsys):
    assert cli.main(["train", "--lora_rank", "8"]) == 2
    assert "did you mean `lora_r`" in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in out


def test_docs_are_generated_from_the_schema():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "config.md"), encoding="utf-8") as fh:
        assert fh.read() == markdown_docs(), "docs/config.md is stale: run `peftune docs`"


def test_docs_help_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["docs", "--help"]) == 0 and "peftune docs [FILE]" in capsys.readouterr().out
    assert cli.main(["docs", "-o"]) == 2 and "one file name" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no file named --help or -o
    assert cli.main(["docs", "ref.md"]) == 0
    with open(tmp_path / "ref.md", encoding="utf-8") as fh:
        assert fh.read() == markdown_docs()


def test_the_examples_are_valid_configs_and_their_documented_overrides_work():
    root = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
    for name in sorted(os.listdir(root)):
        if name.endswith(".yaml"):
            cfg = load_config(os.path.join(root, name), {})
            cfg.validate()
            assert all(os.path.exists(s if isinstance(s, str) else s["path"]) for s in cfg.data_path), name
    # the demo's replay can be turned off as docs/demo.md says; turning off only replay is refused by name
    demo = os.path.join(root, "identity.yaml")
    assert load_config(demo, {}).replay_ce is False
    load_config(demo, parse_overrides(["--replay", "0", "--replay_beta", "0", "--replay_ce", "true"])).validate()
    with pytest.raises(PeftuneError, match="set replay too"):
        load_config(demo, parse_overrides(["--replay", "0"])).validate()
