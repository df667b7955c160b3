"""End to end on a tiny random LLaMA: train -> save -> load with plain peft -> chat --json."""

import json
import os

import torch
from safetensors.torch import load_file

from peftune import cli


def train(tiny_model_dir, data_file, out, *extra):
    return cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     "--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
                     "--micro_batch_size", "2", "--num_epochs", "2", "--learning_rate", "1e-2", "--lora_r", "4",
                     "--val_set_size", "4", "--eval_steps", "3", "--logging_steps", "2", *extra])


def test_train_save_load_chat(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out) == 0
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoints", "config.yaml", "curves.png",
        "metrics.jsonl"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "trainable parameters:" in printed and "the base model is" in printed

    # metrics: one line per logging step / evaluation, with the promised keys; steps = 2 epochs of 20 rows / 4
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9, 10]
    for r in records:
        assert {"step", "epoch", "loss", "lr", "tokens", "elapsed_s", "tokens_per_s"} <= set(r)
    assert all("eval_loss" in r for r in records if r["step"] in (3, 6, 9, 10))
    assert records[-1]["epoch"] == 2.0
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[-1] > 0

    # the adapter: PEFT layout, non-trivial, loadable with plain peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.load(open(out / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] >= 4

    # chat --json: one line per prompt
    assert cli.main(["chat", "--adapter", str(out), "--json", "--prompt", "Who are you?", "--prompt", "你是谁？",
                     "--max_new_tokens", "5"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["Who are you?", "你是谁？"]
    assert all(isinstance(x["answer"], str) for x in lines)


def test_same_seed_same_adapter(tiny_model_dir, data_file, tmp_path):
    for name in ("a", "b"):
        assert train(tiny_model_dir, data_file, tmp_path / name, "--num_epochs", "1") == 0
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_write_nothing(tiny_model_dir, data_file, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    out = tmp_path / "never"
    assert train(tiny_model_dir, str(bad), out) == 2
    assert f"{bad}:2: missing required field `output`" in capsys.readouterr().err
    assert not out.exists()
    assert train(tiny_model_dir, data_file, out, "--val_set_size", "24") == 2
    assert "val_set_size (24) must be smaller than the number of rows (24)" in capsys.readouterr().err
    assert train(tiny_model_dir, data_file, out, "--cutoff_len", "8") == 2
    assert "too small to hold any response" in capsys.readouterr().err
    assert train(tiny_model_dir, data_file, out, "--batch_size", "5") == 2
    assert not out.exists()


def test_non_empty_output_dir_needs_overwrite(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out, "--max_steps", "1") == 0
    assert train(tiny_model_dir, data_file, out, "--max_steps", "1") == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert train(tiny_model_dir, data_file, out, "--max_steps", "1", "--overwrite_output_dir") == 0
    assert len(open(out / "metrics.jsonl").readlines()) == 1


def test_missing_base_model_and_adapter(tmp_path, data_file, capsys):
    assert cli.main(["train", "--base_model", str(tmp_path / "nope"), "--data_path", data_file,
                     "--data_vars.name", "A", "--data_vars.author", "B", "--output_dir", str(tmp_path / "o")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert cli.main(["chat", "--adapter", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_mixture_of_formats_trains(tiny_model_dir, tmp_path):
    share = tmp_path / "chat.jsonl"
    share.write_text("\n".join(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"},
                                                             {"from": "gpt", "value": f"a{i}"}]}) for i in range(6)))
    text = tmp_path / "c4.jsonl"
    text.write_text("\n".join(json.dumps({"text": "some plain text " * 20}) for _ in range(3)))
    config = tmp_path / "c.yaml"
    config.write_text(f"data_path:\n  - {share}\n  - {{path: {text}, max_samples: 2}}\nval_data_path: [{share}]\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(config), "--base_model", tiny_model_dir, "--output_dir", str(out),
                     "--batch_size", "4", "--micro_batch_size", "2", "--cutoff_len", "128", "--max_steps", "2"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["step"] == 2 and "eval_loss" in records[-1]


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, data_file, tmp_path):
    for name, extra in (("plain", []), ("gc", ["--gradient_checkpointing"])):
        assert train(tiny_model_dir, data_file, tmp_path / name, "--max_steps", "3", "--mixed_precision", "no",
                     *extra) == 0
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("plain", "gc"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_weights_cast_once_give_the_same_bf16_run(tiny_model_dir, data_file, tmp_path):
    """bf16 autocast with the frozen weights cast once (the default) and by autocast on every forward: the same
    losses and the same adapter, bit for bit."""
    for name, setting in (("once", "true"), ("every", "false")):
        assert train(tiny_model_dir, data_file, tmp_path / name, "--max_steps", "3", "--mixed_precision", "bf16",
                     "--cast_weights_once", setting) == 0
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("once", "every"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["loss"], r.get("eval_loss")) for r in map(json.loads, open(tmp_path / n / "metrics.jsonl"))]
              for n in ("once", "every")]
    assert losses[0] == losses[1]
    # and bf16 mattered: an fp32 run of the same steps gives another adapter
    assert train(tiny_model_dir, data_file, tmp_path / "fp32", "--max_steps", "3", "--mixed_precision", "no") == 0
    fp32 = load_file(tmp_path / "fp32" / "adapter_model.safetensors")
    assert not all(torch.equal(fp32[k], a[k]) for k in a)
