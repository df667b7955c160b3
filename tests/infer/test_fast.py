"""The lean decoder (fast.py) computes what transformers + peft compute: each row of a left-padded cohort, rows of
different adapters and of the base mixed, rows joining and leaving, for LLaMA (grouped-query attention) and Qwen2
(biased q/k/v projections)."""

import pytest
import torch

from peftune.infer.fast import FastDecoder, unsupported
from peftune.infer.lora import LoraBank


def _model(arch: str, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=hidden, intermediate_size=96 * hidden // 64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()


def _adapter(model, path, seed: int, targets, rank: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    peft.save_pretrained(path)
    return peft.unload()  # the base model back, without adapter layers


def _reference(base_dir, adapters: dict, name, ids: list[int]) -> torch.Tensor:
    """Logits of every position of ids, from transformers (with peft's adapter when name is set)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if name:
        model = PeftModel.from_pretrained(model, adapters[name]).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_lean_decoder_computes_what_transformers_and_peft_compute(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(arch)
    # adapters of different ranks on different layers: one everywhere, one on q/v and the MLP's up projection
    model = _adapter(model, tmp_path / "a", 1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], 4)
    model = _adapter(model, tmp_path / "b", 2, ["q_proj", "v_proj", "up_proj"], 8)
    model.save_pretrained(tmp_path / "base")
    adapters = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    decoder = FastDecoder.build(served)
    assert decoder is not None
    bank = LoraBank(served, groups=decoder.groups())
    decoder.bank = bank
    for name, path in adapters.items():
        bank.add(name, path)

    g = torch.Generator().manual_seed(3)
    prompts = {"a": torch.randint(0, 300, (7,), generator=g).tolist(), None: torch.randint(0, 300, (3,), generator=g)
               .tolist(), "b": torch.randint(0, 300, (11,), generator=g).tolist()}
    names = list(prompts)
    sequences = {n: list(p) for n, p in prompts.items()}
    with torch.no_grad():
        state = None
        for name in names:  # each prefilled alone, then merged into one left-padded cohort
            with bank.rows([name]):
                kv, logits = decoder.prefill(torch.tensor([prompts[name]]))
            expected = _reference(tmp_path / "base", adapters, name, prompts[name])[-1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            state = kv if state is None else state.merge(kv)
        for step in range(6):
            if step == 3:  # the longest row leaves (its padding columns go); the others go on
                names.remove("b")
                state = state.keep([0, 1])
                assert state.length == len(sequences["a"])
            ids = [int(torch.randint(0, 300, (1,), generator=g)) for _ in names]
            for name, token in zip(names, ids):
                sequences[name].append(token)
            with bank.rows(names):
                logits = decoder.step(state, torch.tensor(ids)[:, None],
                                      torch.tensor([[len(sequences[n]) - 1] for n in names]))
            for row, name in enumerate(names):
                expected = _reference(tmp_path / "base", adapters, name, sequences[name])[-1]
                torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4, msg=f"step {step} row {row} {name}")


def test_models_it_cannot_run_are_left_to_transformers():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    assert unsupported(MistralForCausalLM(config)) == "sliding-window attention"
    assert unsupported(_model("llama")) is None


@pytest.mark.parametrize("mode,hidden", [("int8", 64), ("int4", 64), ("int4", 256)])
def test_quantized_weights_and_the_fused_views_leave_transformers_forward_unchanged(mode, hidden):
    """Quantized weights (quant.py) run the same in both; after fusing, the model's own layers see views of the
    fused weights, so transformers' forward (used for what the lean decoder does not run) is unchanged. 4-bit
    layers fuse only in whole blocks of 64 outputs (torch packs them in blocks of 64 rows with AVX512, 32 without):
    at hidden 64 k/v have 32 outputs and run as matmuls of their own, at 256 they have 128 and are fused."""
    from peftune.infer.quant import quantize

    model = _model("qwen2", hidden)
    assert quantize(model, mode)[mode] == 2 * 7 + 1
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits[0, -1]
        decoder = FastDecoder(model)
        _, logits = decoder.prefill(ids)
        after = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(logits, before, atol=1e-3, rtol=1e-3)
    qkv = decoder.blocks[0].qkv
    if mode == "int4" and hidden == 64:
        assert qkv.kind == "mixed"
        return
    assert qkv.kind == mode
    assert model.model.layers[0].self_attn.k_proj.weight.data_ptr() == \
        qkv.weight[hidden:].data_ptr()  # a view, not a copy


def test_weights_that_already_are_4_bit_stay_4_bit_and_others_become_int8():
    """As the embedded model's (a Q4_1 GGUF: blocks of 32 weights d*q + m): `auto` keeps them at 4 bits, computing
    what the 4-bit blocks compute; weights of any other origin become int8."""
    from peftune.infer.quant import Int4Linear, Int8Linear, quantize

    torch.manual_seed(0)
    q = torch.randint(0, 16, (48, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # as llama.cpp's Q4_1 quantizer: each block spans its 16 levels
    d, m = torch.rand(48, 4, 1) * 0.01 + 0.001, torch.randn(48, 4, 1) * 0.05
    four_bit = torch.nn.Linear(128, 48, bias=False)
    four_bit.weight.data = (d * q + m).reshape(48, 128)
    model = torch.nn.Sequential(four_bit, torch.nn.Linear(48, 64, bias=True))
    x = torch.randn(3, 128)
    with torch.no_grad():
        exact = model(x)
        assert quantize(model, "auto") == {"int8": 1, "int4": 1}
        assert isinstance(model[0], Int4Linear) and isinstance(model[1], Int8Linear)
        # 4-bit layer: only bf16 rounding (of its inputs, scales and zero points) away from the exact product
        torch.testing.assert_close(model[0](x), x @ four_bit.weight.T, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(model(x), exact, atol=5e-2, rtol=5e-2)


def test_a_prompt_after_cached_keys_computes_what_the_whole_prompt_does(tmp_path):
    """Prefix caching's arithmetic: the keys/values of a prompt's first tokens, then only the rest of it."""
    model = _adapter(_model("llama"), tmp_path / "a", 1, ["q_proj", "k_proj", "v_proj", "down_proj"], 4)
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    decoder = FastDecoder(served)
    decoder.bank = LoraBank(served, groups=decoder.groups())
    decoder.bank.add("a", str(tmp_path / "a"))
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), decoder.bank.rows(["a"]):
        whole, expected = decoder.prefill(ids)
        first, _ = decoder.prefill(ids[:, :12])
        rest, logits = decoder.prefill(ids[:, 12:], first.prefix(12))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rest.kv[..., :20, :], whole.kv[..., :20, :], atol=1e-5, rtol=1e-5)
        # and decoding goes on from it alike
        step = [decoder.step(s, torch.tensor([[7]]), torch.tensor([[20]])) for s in (whole, rest)]
        torch.testing.assert_close(step[1], step[0], atol=1e-5, rtol=1e-5)


def test_prefix_cache_finds_the_longest_beginning_of_the_same_model_and_forgets_what_it_must():
    from peftune.infer.prefix import PrefixCache

    cache = PrefixCache(budget_bytes=3 * 4 * 4 * 20, min_tokens=3)  # room for 60 cached tokens of 4 x fp32 values

    def kv(n):
        return torch.arange(float(n))[None, :, None].expand(4, n, 1).clone()

    cache.store("a", [1, 2, 3, 4, 5], kv(5))
    cache.store("b", [1, 2, 3, 4, 5, 6, 7], kv(7))
    n, prefix = cache.lookup("a", [1, 2, 3, 4, 9, 9])
    assert n == 4 and prefix.shape == (4, 4, 1) and prefix[0, -1, 0] == 3
    assert cache.lookup("a", [1, 2, 3, 4, 5])[0] == 4  # the last token is always computed (its logits)
    assert cache.lookup("a", [1, 2, 9]) == (0, None)  # under min_tokens
    assert cache.lookup(None, [1, 2, 3, 4, 5, 6]) == (0, None)  # another model's keys are not this one's
    cache.store("a", [1, 2, 3, 4, 5, 6, 7, 8], kv(8))  # the next turn of a conversation replaces the one before
    assert [k[1] for k in cache.entries if k[0] == "a"] == [(1, 2, 3, 4, 5, 6, 7, 8)]
    for i in range(6):  # over the budget: least recently used go first
        cache.store("c", [10 + i] * 10, kv(10))
    assert cache.bytes <= cache.budget and ("b", (1, 2, 3, 4, 5, 6, 7)) not in cache.entries
    cache.drop("c")
    assert not any(k[0] == "c" for k in cache.entries)
