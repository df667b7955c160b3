"""`peftune merge` on the tiny LLaMA (grouped-query attention, tied embeddings): every method that can merge gives a
model whose logits are the adapter-on-base ones, reloaded from disk exactly; what cannot merge, or is not an
adapter, is refused with nothing written."""

import json
import os

import pytest
import torch

from tiny import make_adapter

from peftune import cli
from peftune.config import TrainConfig

METHODS = {
    "lora": TrainConfig(lora_r=4),
    "dora": TrainConfig(lora_r=4, use_dora=True),
    "rslora": TrainConfig(lora_r=4, use_rslora=True),
    "lora_on_tied_head": TrainConfig(lora_r=4, lora_target_modules=["q_proj", "v_proj", "lm_head"]),
    "adalora": TrainConfig(peft_method="adalora", adalora_init_r=6, adalora_target_r=2),
    "ia3": TrainConfig(peft_method="ia3"),
    "loha": TrainConfig(peft_method="loha", lora_r=4),
    "lokr": TrainConfig(peft_method="lokr", lora_r=4),
}


def _adapter(tiny_model_dir, tokenizer, cfg, path, seed=0):
    return make_adapter(tiny_model_dir, tokenizer, cfg, path, seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_merged_model_computes_what_the_adapter_on_its_base_computes(name, tiny_model_dir, tokenizer, tmp_path,
                                                                       capsys):
    from transformers import AutoModelForCausalLM

    peft_model = _adapter(tiny_model_dir, tokenizer, METHODS[name], tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tmp_path / "adapter"), "--output_dir", str(out), "--base_model",
                     tiny_model_dir]) == 0
    assert "self-check" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone, no peft
    assert not any(hasattr(m, "base_layer") for m in merged.modules())
    ids = torch.tensor([tokenizer("Who are you? 你是谁？")["input_ids"]])
    expected = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    assert float((expected - base).abs().max()) > 0.02  # the adapter does something
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=0)
    if name == "lora_on_tied_head":  # the head changed, the input embeddings did not
        assert not merged.config.tie_word_embeddings
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert torch.equal(merged.get_input_embeddings().weight, original.get_input_embeddings().weight)
        assert not torch.equal(merged.get_output_embeddings().weight, original.get_output_embeddings().weight)
    note = json.loads((out / "peftune_merge.json").read_text())
    assert note["self_check"]["max_abs_logit_diff_fp32"] <= 1e-4 and note["dtype"] == "fp32"
    assert (out / "tokenizer_config.json").exists() and merged.generation_config is not None
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_bf16_merge_is_the_fp32_merge_rounded(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    _adapter(tiny_model_dir, tokenizer, METHODS["lora"], tmp_path / "adapter")
    for dtype in ("fp32", "bf16"):
        assert cli.main(["merge", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / dtype), "--dtype", dtype,
                         "--base_model", tiny_model_dir]) == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(full.state_dict().items(), half.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_what_cannot_merge_is_refused_and_nothing_is_written(tiny_model_dir, tokenizer, tmp_path, capsys):
    _adapter(tiny_model_dir, tokenizer, TrainConfig(peft_method="prefix_tuning", num_virtual_tokens=4),
             tmp_path / "prefix")
    out = tmp_path / "out"
    assert cli.main(["merge", str(tmp_path / "prefix"), "--output_dir", str(out), "--base_model",
                     tiny_model_dir]) == 2
    assert "virtual tokens" in capsys.readouterr().err and not out.exists()

    assert cli.main(["merge", str(tmp_path / "nothing"), "--output_dir", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err

    broken = tmp_path / "broken"
    _adapter(tiny_model_dir, tokenizer, METHODS["lora"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert cli.main(["merge", str(broken), "--output_dir", str(out), "--base_model", tiny_model_dir]) == 2
    assert "cannot load it" in capsys.readouterr().err and not out.exists()

    os.remove(broken / "adapter_model.safetensors")
    assert cli.main(["merge", str(broken), "--output_dir", str(out), "--base_model", tiny_model_dir]) == 2
    assert "only from safetensors" in capsys.readouterr().err

    _adapter(tiny_model_dir, tokenizer, METHODS["lora"], tmp_path / "ok")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("the user's file")
    assert cli.main(["merge", str(tmp_path / "ok"), "--output_dir", str(taken), "--base_model", tiny_model_dir]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "the user's file"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_a_qlora_adapter_merges_into_the_full_precision_base_with_a_note(tiny_model_dir, tokenizer, tmp_path,
                                                                           capsys):
    from transformers import AutoModelForCausalLM

    peft_model = _adapter(tiny_model_dir, tokenizer, METHODS["lora"], tmp_path / "adapter")
    (tmp_path / "adapter" / "config.yaml").write_text(f"base_model: {tiny_model_dir}\nload_in_4bit: true\n")
    assert cli.main(["merge", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "merged")]) == 0
    assert "full-precision base" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), atol=1e-4, rtol=0)
    assert "full-precision" in json.loads((tmp_path / "merged" / "peftune_merge.json").read_text())["notes"][0]
