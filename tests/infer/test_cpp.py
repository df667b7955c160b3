"""The llama.cpp engine (infer/cpp.py) computes what peft computes, adapter by adapter, from the base and the adapter
written as GGUF files; it refuses what llama.cpp's LoRA format cannot hold."""

import sys

import pytest
import torch
from tiny import MERGES, make_adapter, make_tokenizer

from peftune.config import TrainConfig
from peftune.errors import PeftuneError
from peftune.infer.engine import Engine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tokenizer():
    return make_tokenizer(merges=MERGES)


def test_logits_match_peft_with_two_adapters_and_the_base(tiny_bpe_model_dir, tokenizer, tmp_path, cache):
    peft_models = {name: make_adapter(tiny_bpe_model_dir, tokenizer, TrainConfig(lora_r=4), tmp_path / name, seed=seed)
                   for seed, name in enumerate(("a", "b"))}
    engine = Engine(tiny_bpe_model_dir, {n: str(tmp_path / n) for n in peft_models}, engine="llama.cpp", max_batch=2)
    try:
        ids = engine.chat_prompt("a", [{"role": "user", "content": "Hello there"}])
        for name, model in [*peft_models.items(), (None, None)]:
            with torch.no_grad():
                if model is None:
                    with peft_models["a"].disable_adapter():
                        expected = peft_models["a"](input_ids=torch.tensor([ids])).logits[0, -1]
                else:
                    expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
            state, logits, cached = engine.cpp.prefill(name, ids)
            state.keep([])
            # the base is written as f16 (the adapters as f32): f16 rounding of the weights, nothing more
            assert (logits - expected).abs().max() < 2e-2 * expected.abs().max(), name
            assert int(logits.argmax()) == int(expected.argmax())
        # the adapters do move the logits (far beyond the rounding allowed above)
        a, b = (engine.cpp.prefill(n, ids) for n in ("a", "b"))
        assert (a[1] - b[1]).abs().max() > 0.2
        assert engine.cpp.free == []  # both sequences held
        a[0].keep([])
        b[0].keep([])
        assert sorted(engine.cpp.free) == [0, 1]
        with pytest.raises(PeftuneError, match="token ids"):  # not llama.cpp's abort
            engine.cpp.prefill("a", [1, engine.cpp.vocab])
        assert sorted(engine.cpp.free) == [0, 1]
    finally:
        engine.close()


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_adapters_llama_cpp_cannot_hold_are_refused_by_name(method, tiny_bpe_model_dir, tokenizer, tmp_path, cache):
    cfg = TrainConfig(peft_method="ia3") if method == "ia3" else TrainConfig(use_dora=True, lora_r=4)
    make_adapter(tiny_bpe_model_dir, tokenizer, cfg, tmp_path / "x")
    with pytest.raises(PeftuneError, match=r"--adapter x=.*--engine llama.cpp runs plain LoRA"):
        Engine(tiny_bpe_model_dir, {"x": str(tmp_path / "x")}, engine="llama.cpp")


def test_dtype_and_missing_llama_cpp_are_clear_errors(tiny_bpe_model_dir, cache, monkeypatch):
    with pytest.raises(PeftuneError, match="leave out --dtype"):
        Engine(tiny_bpe_model_dir, engine="llama.cpp", dtype="bf16")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(PeftuneError, match=r"pip install 'peftune\[llamacpp\]'"):
        Engine(tiny_bpe_model_dir, engine="llama.cpp")
