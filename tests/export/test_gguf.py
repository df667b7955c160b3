"""`peftune export --format gguf` on the tiny LLaMA (grouped-query attention, so the q/k permutation with the key/value
head count is exercised): the file loads back in transformers and in llama.cpp and computes what the merged model
computes, within each format's own floor; the Modelfile; refusals."""

import os

import numpy as np
import pytest
import torch

from peftune import cli
from peftune.config import TrainConfig

from tiny import MERGES
from tiny import make_adapter as _adapter

PROMPTS = ["Who are you?", "Hello, 世界", "Write a haiku about the sea."]


def _export(adapter, out, outtype, *extra):
    return cli.main(["export", str(adapter), "--format", "gguf", "--output_dir", str(out), "--outtype", outtype,
                     *extra])


def _gguf_logits(folder, name, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[0]




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An adapter, its merged model's logits, and exports of it (and of the untouched base) in every format. The
    base's tokenizer has BPE merges, as real ones do (llama.cpp refuses a BPE vocabulary without them)."""
    from tiny import make_model, make_tokenizer
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("gguf")
    tokenizer = make_tokenizer(merges=MERGES)
    tiny_model_dir = str(tmp / "base-model")
    make_model(tokenizer).save_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tiny_model_dir)
    peft_model = _adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4, lora_alpha=8), tmp / "adapter", seed=3)
    _adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4, lora_alpha=8), tmp / "zero", seed=4)
    zero = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the base's own export: the format's floor
    ids = [torch.tensor([tokenizer(p)["input_ids"]]) for p in PROMPTS]
    with torch.no_grad():
        adapted = [peft_model(input_ids=i).logits[0] for i in ids]
        base = [zero(input_ids=i).logits[0] for i in ids]
    from peftune.export.gguf import write_model

    for outtype in ("f32", "f16", "q8_0", "q4_0"):
        assert _export(tmp / "adapter", tmp / "out", outtype, "--base_model", tiny_model_dir) == 0
        write_model(zero, tokenizer, str(tmp / "out" / f"base-{outtype}.gguf"), outtype)
    return {"dir": tmp / "out", "ids": ids, "adapted": adapted, "base": base, "tokenizer": tokenizer,
            "base_dir": tiny_model_dir}


def test_f32_gguf_loads_in_transformers_as_the_merged_model(exported):
    for ids, expected in zip(exported["ids"], exported["adapted"]):
        torch.testing.assert_close(_gguf_logits(exported["dir"], "adapter-f32.gguf", ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("outtype,margin", [("f16", 20), ("q8_0", 20), ("q4_0", 2)])
def test_quantized_gguf_is_within_the_formats_own_floor(exported, outtype, margin):
    """The rounding error of the merged model's export stays within a few times that of the untouched base's
    export (the merged weights are larger, so their rounding is too: 2-7x measured), the adapter's effect is
    `margin` times larger than the error (4-bit rounding of a 64-wide random model is coarse: 2), and (f16,
    q8_0) the greedy tokens are the merged model's where the top two logits are further apart than the error."""
    for ids, expected, base in zip(exported["ids"], exported["adapted"], exported["base"]):
        logits = _gguf_logits(exported["dir"], f"adapter-{outtype}.gguf", ids)
        error = float((logits - expected).abs().max())
        floor = float((_gguf_logits(exported["dir"], f"base-{outtype}.gguf", ids) - base).abs().max())
        effect = float((expected - base).abs().max())
        assert error <= 8 * floor + 1e-4, (error, floor)
        assert effect > margin * error, (effect, error)  # the fine-tune is not lost in the rounding
        if outtype != "q4_0":  # greedy tokens agree wherever the top two are further apart than the error
            top = expected.topk(2, dim=-1).values
            clear = (top[:, 0] - top[:, 1]) > 2 * error
            assert torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_the_tokenizer_and_chat_template_travel_in_the_file(exported):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(exported["dir"], gguf_file="adapter-f32.gguf")
    for text in PROMPTS:
        assert loaded(text)["input_ids"] == exported["tokenizer"](text)["input_ids"]
    assert loaded.chat_template == exported["tokenizer"].chat_template


def test_llama_cpp_runs_the_file_and_computes_the_same(exported):
    """llama.cpp itself (llama-cpp-python) on the exported file: the same logits as the merged model, fed the same
    token ids, and the same greedy continuation."""
    from llama_cpp import Llama

    for outtype, atol in (("f32", 1e-3), ("q8_0", None)):
        llm = Llama(model_path=str(exported["dir"] / f"adapter-{outtype}.gguf"), n_ctx=256, n_threads=2,
                    logits_all=True, verbose=False)
        for ids, expected in zip(exported["ids"], exported["adapted"]):
            llm.reset()
            llm.eval(ids[0].tolist())
            logits = torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))
            error = float((logits - expected).abs().max())
            if atol is not None:
                assert error <= atol
            top = expected.topk(2, dim=-1).values
            clear = (top[:, 0] - top[:, 1]) > 2 * error
            assert torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_modelfile_and_refusals(exported, tmp_path, capsys):
    tiny_model_dir = exported["base_dir"]
    text = (exported["dir"] / "Modelfile").read_text()
    assert "FROM ./adapter-q4_0.gguf" in text and "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert _export(exported["dir"].parent / "adapter", exported["dir"], "f32", "--base_model", tiny_model_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    from tiny import make_tokenizer

    _adapter(tiny_model_dir, make_tokenizer(), TrainConfig(peft_method="prompt_tuning", num_virtual_tokens=4),
             tmp_path / "prompt")
    assert _export(tmp_path / "prompt", tmp_path / "out", "f16", "--base_model", tiny_model_dir) == 2
    assert "virtual tokens" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith((".gguf", ".tmp"))]


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_holds_peft_s_update_and_llama_cpp_applies_it(exported, tmp_path, rslora):
    """--adapter_only: A, B and alpha read back give peft's delta weights (q/k rows permuted as the base's), and
    llama.cpp with the base's GGUF and this adapter computes the adapter-on-base logits."""
    import gguf
    from llama_cpp import Llama

    from peftune.export.gguf import permute_rows

    base_dir, tokenizer = exported["base_dir"], exported["tokenizer"]
    cfg = TrainConfig(lora_r=4, lora_alpha=8, use_rslora=rslora)
    peft_model = _adapter(base_dir, tokenizer, cfg, tmp_path / "adapter", seed=5)
    assert _export(tmp_path / "adapter", tmp_path / "out", "f32", "--adapter_only", "--base_model", base_dir) == 0
    reader = gguf.GGUFReader(str(tmp_path / "out" / "adapter-lora-f32.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    stored = {t.name: torch.from_numpy(np.array(t.data)).reshape(*reversed(t.shape.tolist())) for t in reader.tensors}
    config = peft_model.get_base_model().config
    for i in range(config.num_hidden_layers):
        for ours, theirs, heads in (("self_attn.q_proj", "attn_q", config.num_attention_heads),
                                    ("self_attn.k_proj", "attn_k", config.num_key_value_heads),
                                    ("mlp.down_proj", "ffn_down", None)):
            layer = peft_model.get_submodule(f"base_model.model.model.layers.{i}.{ours}")
            expected = layer.get_delta_weight("default")
            if heads:
                expected = permute_rows(expected, heads)
            A, B = stored[f"blk.{i}.{theirs}.weight.lora_a"], stored[f"blk.{i}.{theirs}.weight.lora_b"]
            torch.testing.assert_close(B @ A * (alpha / A.shape[0]), expected, atol=1e-6, rtol=1e-5)
    base_gguf = [f for f in os.listdir(tmp_path / "out") if f.endswith(".gguf") and "lora" not in f]
    assert len(base_gguf) == 1  # the HF base, written beside it for llama.cpp and Ollama
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM ./{base_gguf[0]}" in text and "ADAPTER ./adapter-lora-f32.gguf" in text
    llm = Llama(model_path=str(tmp_path / "out" / base_gguf[0]), lora_path=str(tmp_path / "out" /
                "adapter-lora-f32.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    for ids in exported["ids"]:
        with torch.no_grad():
            expected = peft_model(input_ids=ids).logits[0]
        llm.reset()
        llm.eval(ids[0].tolist())
        logits = torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))
        assert float((logits - expected).abs().max()) <= 1e-3


def test_what_the_lora_format_cannot_hold_is_refused(exported, tmp_path, capsys):
    base_dir, tokenizer = exported["base_dir"], exported["tokenizer"]
    for name, cfg, message in (
            ("dora", TrainConfig(lora_r=4, use_dora=True), "use_dora"),
            ("ia3", TrainConfig(peft_method="ia3"), "IA3"),
            ("head", TrainConfig(lora_r=4, lora_target_modules=["q_proj", "lm_head"]), "lm_head")):
        _adapter(base_dir, tokenizer, cfg, tmp_path / name)
        assert _export(tmp_path / name, tmp_path / "out", "f32", "--adapter_only", "--base_model", base_dir) == 2
        err = capsys.readouterr().err
        assert message in err and "merged model" in err, err
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith((".gguf", ".tmp"))]


def test_bf16_gguf_and_an_unwritable_output(exported, tmp_path, capsys):
    assert _export(exported["dir"].parent / "adapter", tmp_path / "bf16", "bf16", "--base_model",
                   exported["base_dir"]) == 0
    for ids, expected in zip(exported["ids"], exported["adapted"]):
        logits = _gguf_logits(tmp_path / "bf16", "adapter-bf16.gguf", ids)
        assert float((logits - expected).abs().max()) < 0.05
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _export(exported["dir"].parent / "adapter", blocker / "sub", "f16", "--base_model",
                   exported["base_dir"]) == 2
    assert "cannot create it" in capsys.readouterr().err
    assert cli.main(["merge", str(exported["dir"].parent / "adapter"), "--output_dir", str(blocker / "sub"),
                     "--base_model", exported["base_dir"]]) == 2
    assert "cannot write there" in capsys.readouterr().err
