"""The baselines on the tiny LLaMA: `full` trains every weight, `freeze` only the last N decoder layers; both go
through the same loop, save a whole model (safetensors + tokenizer) that transformers loads and `peftune chat
--base_model` runs, and resume bit-exactly after kill -9."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tiny import train_process

from peftune import cli
from peftune.io import sha256_files

BASE = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
        "--micro_batch_size", "2", "--num_epochs", "1", "--val_set_size", "4", "--eval_steps", "2",
        "--save_steps", "2", "--learning_rate", "1e-3"]


def _train(tiny_model_dir, data_file, out, *extra):
    return cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     *BASE, *extra])


def _changed(tiny_model_dir, out) -> dict[str, bool]:
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert set(after) <= set(before)
    return {k: not torch.equal(before[k], after[k]) for k in after}


def test_full_trains_every_weight_and_saves_a_whole_model(tiny_model_dir, data_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert _train(tiny_model_dir, data_file, out, "--peft_method", "full") == 0
    printed = capsys.readouterr().out
    assert "full: trainable parameters: 90,624 of 90,624 (100.00 %)" in printed
    assert f"a whole model: use it as --base_model {out}" in printed
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "config.yaml", "metrics.jsonl"} <= files
    assert "adapter_model.safetensors" not in files and "README.md" not in files
    assert all(_changed(tiny_model_dir, out).values())  # every tensor, embeddings and norms included
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape[1] == 5
    assert cli.main(["chat", "--base_model", str(out), "--prompt", "Who are you?", "--max_new_tokens", "3",
                     "--json"]) == 0
    capsys.readouterr()
    assert cli.main(["chat", "--adapter", str(out), "--prompt", "Hi"]) == 2
    assert f"a whole model, not an adapter (peft_method full or freeze): use --base_model {out}" in \
        capsys.readouterr().err


def test_freeze_trains_only_the_last_layers(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "freeze"
    assert _train(tiny_model_dir, data_file, out, "--peft_method", "freeze", "--freeze_trainable_layers", "1") == 0
    changed = _changed(tiny_model_dir, out)
    last = [k for k in changed if k.startswith("model.layers.1.")]
    assert last and all(changed[k] for k in last)
    assert not any(v for k, v in changed.items() if k not in last)  # the first layer, embeddings, norm: untouched
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir",
                     str(tmp_path / "x"), *BASE, "--peft_method", "freeze", "--freeze_trainable_layers", "3"]) == 2
    assert "freeze_trainable_layers 3: the model has 2 decoder layers" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--peft_method", "full", "--load_in_4bit", "true"], "cannot be quantized"),
    (["--peft_method", "full", "--replay", "2", "--replay_beta", "0.1"], "peft_method full has no adapter"),
    (["--peft_method", "lora", "--freeze_trainable_layers", "1"], "freeze_trainable_layers: not used by"),
])
def test_refused(extra, message, tiny_model_dir, data_file, tmp_path, capsys):
    assert _train(tiny_model_dir, data_file, tmp_path / "run", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _run(tiny_model_dir, data_file, out, extra, fault=None):
    return train_process(tiny_model_dir, data_file, out, *BASE, "--num_epochs", "2", "--logging_steps", "1", *extra,
                         fault=fault)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_kill_9_then_resume_is_bit_identical(method, tiny_model_dir, data_file, tmp_path):
    extra = ["--peft_method", method]
    ref, out = tmp_path / "reference", tmp_path / "run"
    done = _run(tiny_model_dir, data_file, ref, extra)
    assert done.returncode == 0, done.stderr
    killed = _run(tiny_model_dir, data_file, out, extra, fault="after_step:5")
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(tiny_model_dir, data_file, out, extra + ["--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert sha256_files(out / "model.safetensors") == sha256_files(ref / "model.safetensors")
