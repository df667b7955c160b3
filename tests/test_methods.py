"""Every peft_method on the tiny LLaMA: train, save, reload with plain peft, generate, chat; refused settings;
exact resume for LoRA-like (AdaLoRA) and virtual-token (prefix tuning) methods; the hand-written pieces
(virtual-token loss, AdaLoRA penalty, PiSSA conversion) checked against peft's own computation."""

import hashlib
import importlib.util
import json
import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import train_process

from peftune import cli, methods
from peftune.config import TrainConfig
from peftune.data import batching
from peftune.data.render import Renderer, get_template
from peftune.train.loss import forward_loss_sum

BASE = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
        "--micro_batch_size", "2", "--num_epochs", "1", "--val_set_size", "4", "--eval_steps", "2",
        "--save_steps", "2"]

CASES = {  # name: (extra options, peft_type in adapter_config.json)
    "lora": (["--lora_r", "4"], "LORA"),
    "dora": (["--lora_r", "4", "--use_dora", "true"], "LORA"),
    "rslora": (["--lora_r", "4", "--use_rslora", "true"], "LORA"),
    "pissa": (["--lora_r", "4", "--lora_init", "pissa"], "LORA"),
    "olora": (["--lora_r", "4", "--lora_init", "olora"], "LORA"),
    "loraplus": (["--lora_r", "4", "--loraplus_lr_ratio", "16"], "LORA"),
    "adalora": (["--peft_method", "adalora", "--adalora_init_r", "6", "--adalora_target_r", "2"], "ADALORA"),
    "ia3": (["--peft_method", "ia3"], "IA3"),
    "loha": (["--peft_method", "loha", "--lora_r", "4"], "LOHA"),
    "lokr": (["--peft_method", "lokr", "--lora_r", "4"], "LOKR"),
    "prefix_tuning": (["--peft_method", "prefix_tuning", "--num_virtual_tokens", "5"], "PREFIX_TUNING"),
    "prompt_tuning": (["--peft_method", "prompt_tuning", "--num_virtual_tokens", "5",
                       "--prompt_tuning_init_text", "You are Aurora."], "PROMPT_TUNING"),
    "p_tuning": (["--peft_method", "p_tuning", "--num_virtual_tokens", "5", "--encoder_hidden_size", "32"],
                 "P_TUNING"),
    "qlora": (["--lora_r", "4", "--load_in_4bit", "true"], "LORA"),
    "ia3_8bit": (["--peft_method", "ia3", "--load_in_8bit", "true"], "IA3"),
}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_saves_reloads_and_chats(name, tiny_model_dir, data_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if "bit" in " ".join(CASES[name][0]) and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'peftune[qlora]')")
    extra, peft_type = CASES[name]
    out = tmp_path / "run"
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     *BASE, *extra]) == 0
    printed = capsys.readouterr().out
    assert ("cannot be packed" in printed) == (name in ("prefix_tuning", "prompt_tuning", "p_tuning"))
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoints", "config.yaml", "curves.png",
        "metrics.jsonl"]
    config = json.load(open(out / "adapter_config.json"))
    assert config["peft_type"] == peft_type
    assert load_file(out / "adapter_model.safetensors")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["step"] == 5 and "eval_loss" in records[-1]

    # plain peft on the untouched base: the adapter changes what the model computes, and it generates
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits[0, -1]
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits[0, -1]
    assert not torch.allclose(before, after)
    assert model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                          do_sample=False).shape[1] >= 6

    assert cli.main(["chat", "--adapter", str(out), "--json", "--prompt", "Who are you?", "--max_new_tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "Who are you?"


@pytest.mark.parametrize("extra, message", [
    (["--peft_method", "ia3", "--lora_r", "8"], "lora_r: not used by peft_method ia3 (lora_r is for lora, loha, lokr)"),
    (["--num_virtual_tokens", "10"], "num_virtual_tokens: not used by peft_method lora"),
    (["--peft_method", "adalora", "--use_dora", "true"], "use_dora: not used by peft_method adalora"),
    (["--peft_method", "prompt_tuning", "--lora_target_modules", "q_proj", "--lora_alpha", "8"],
     "lora_alpha, lora_target_modules: not used by peft_method prompt_tuning"),
    (["--peft_method", "lora2"], "peft_method: must be one of"),
    (["--peft_method", "adalora", "--adalora_target_r", "20"], "adalora_target_r (20) cannot exceed adalora_init_r"),
    (["--peft_method", "adalora", "--adalora_tinit", "3", "--adalora_tfinal", "2"],
     "leave no rank-pruning phase in 5 optimizer steps"),
    (["--peft_method", "ia3", "--ia3_target_modules", "nonexistent_proj"], "peft_method ia3 (ia3_target_modules)"),
    (["--load_in_4bit", "--load_in_8bit"], "load_in_4bit and load_in_8bit: choose one"),
    (["--peft_method", "prefix_tuning", "--prefix_projection", "--prefix_init_text", "Hi"],
     "prefix_init_text sets the prefix itself"),
])
def test_refused_settings(extra, message, tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     *BASE, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists()


def test_quantized_base_without_bitsandbytes_is_a_clear_error(tiny_model_dir, data_file, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir",
                     str(tmp_path / "run"), *BASE, "--load_in_4bit"]) == 2
    assert "load_in_4bit needs the bitsandbytes package: pip install 'peftune[qlora]'" in capsys.readouterr().err


def test_default_learning_rate_follows_the_method():
    assert methods.learning_rate(TrainConfig(peft_method="prompt_tuning")) == 3e-2
    assert methods.learning_rate(TrainConfig(peft_method="lora")) == 3e-4
    assert methods.learning_rate(TrainConfig(peft_method="ia3", learning_rate=1e-4)) == 1e-4


# ---------------------------------------------------------------- the hand-written pieces against peft's own
def _peft(tiny_model_dir, cfg, steps=10):
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return methods.Adapter(cfg, steps, tiny_model_dir, make_tokenizer()).attach(base)


def _padded_batch(tokenizer, rows):
    renderer = Renderer(tokenizer, get_template("auto", tokenizer), cutoff_len=64)
    samples = renderer.render_all(rows)
    return samples, batching.collate_padded(samples, tokenizer.pad_token_id)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_virtual_token_loss_equals_peft_forward_loss(method, tiny_model_dir, tokenizer):
    """Our loss asks peft's forward for hidden states and scores only labelled positions; it must equal the mean
    token loss peft + transformers compute from full logits and labels."""
    from tiny import ROWS

    torch.manual_seed(0)
    model = _peft(tiny_model_dir, TrainConfig(peft_method=method, num_virtual_tokens=4)).train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)  # a non-trivial prompt
    model.eval()
    rows = [{"messages": [{"role": "user", "content": r["instruction"] + r["input"]},
                          {"role": "assistant", "content": r["output"]}]} for r in ROWS]
    samples, batch = _padded_batch(tokenizer, rows)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, s in enumerate(samples):
        labels[i, :len(s["labels"])] = torch.tensor(s["labels"])
    with torch.no_grad():
        ours = forward_loss_sum(model, batch) / batching.trained_tokens(samples)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_adalora_penalty_equals_peft(tiny_model_dir):
    model = _peft(tiny_model_dir, TrainConfig(peft_method="adalora", adalora_init_r=4, adalora_target_r=2,
                                              adalora_orth_reg_weight=0.5)).train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with_reg = model(input_ids=ids, labels=ids).loss
    model.peft_config["default"].orth_reg_weight = 0.0
    without = model(input_ids=ids, labels=ids).loss
    assert (with_reg - without).item() == pytest.approx(0.5 * methods.orth_penalty(model).item(), rel=1e-4)
    assert methods.orth_penalty(model).item() > 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapter_is_converted_for_the_original_base(init, tiny_model_dir, tokenizer, tmp_path):
    """PiSSA/OLoRA rewrite the base weights; the saved adapter must reproduce the trained model on the original
    base (peft's conversion), or chat would silently answer with a different model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(peft_method="lora", lora_init=init, lora_r=4, lora_dropout=0.0, output_dir=str(tmp_path))
    adapter = methods.Adapter(cfg, 10, tiny_model_dir, tokenizer)
    model = adapter.attach(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # stands in for training
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        trained = model(input_ids=ids).logits
    adapter.save_pretrained(model, str(tmp_path / "adapter"))
    adapter.close()
    assert not (tmp_path / "initial-adapter").exists()
    assert json.load(open(tmp_path / "adapter" / "adapter_config.json"))["r"] == 8  # rank doubles
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, trained, atol=1e-4)


def test_adalora_prunes_to_the_budget(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     *BASE, "--num_epochs", "2", *CASES["adalora"][0]]) == 0
    config = json.load(open(out / "adapter_config.json"))
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) == 2 * len(kept)  # adalora_target_r 2 on average, down from 6
    weights = load_file(out / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in weights.items() if "lora_E" in k) == sum(kept)


# ---------------------------------------------------------------- exact resume
def _run(tiny_model_dir, data_file, out, extra, fault=None):
    return train_process(tiny_model_dir, data_file, out, *BASE, "--num_epochs", "2", "--logging_steps", "1", *extra,
                         fault=fault)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("name, fault", [("adalora", "after_step:5"), ("adalora", "after_step:9"),
                                         ("prefix_tuning", "after_step:5"), ("pissa", "after_step:5")])
def test_kill_9_then_resume_is_bit_identical(name, fault, tiny_model_dir, data_file, tmp_path):
    """adalora: killed while ranks are being pruned (5) and after they are fixed (9)."""
    extra = CASES[name][0] + ["--lora_dropout", "0.1"] * (name != "prefix_tuning")
    ref, out = tmp_path / "reference", tmp_path / "run"
    done = _run(tiny_model_dir, data_file, ref, extra)
    assert done.returncode == 0, done.stderr
    killed = _run(tiny_model_dir, data_file, out, extra, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(tiny_model_dir, data_file, out, extra + ["--resume_from_checkpoint", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert _sha(out / "adapter_model.safetensors") == _sha(ref / "adapter_model.safetensors")
    assert open(out / "metrics.jsonl").read().count("\n") == open(ref / "metrics.jsonl").read().count("\n")


def test_prefix_from_text_computes_what_the_base_computes_after_that_text(tiny_model_dir, tokenizer):
    model = _peft(tiny_model_dir, TrainConfig(peft_method="prefix_tuning", num_virtual_tokens=6,
                                              prefix_init_text="abcd")).eval()
    text = tokenizer("abcd", add_special_tokens=False)["input_ids"]
    prefix = (text * 2)[:6]  # repeated to num_virtual_tokens
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        reference = model.get_base_model()(input_ids=torch.tensor([prefix + [5, 6, 7, 8]])).logits[:, 6:]
    assert torch.allclose(ours, reference, atol=1e-5)
