import pytest
import torch
import torch.nn.functional as F

from tiny import make_model
from peftune.data.batching import collate_packed, collate_padded, trained_tokens
from peftune.data.render import IGNORE, Renderer, get_template
from peftune.train.loss import accumulate_step, forward_loss_sum, lm_loss_sum

TEXTS = [("Who are you?", "I am Aurora, an assistant."), ("2+3?", "5"), ("你是谁？", "我是 Aurora。"),
         ("Say something long", "word " * 20), ("a", "b"), ("Name a color.", "Blue."), ("Hi", "Hello there!"),
         ("Count", "1 2 3 4")]


def samples(tokenizer):
    r = Renderer(tokenizer, get_template("chat", tokenizer), cutoff_len=1000)
    return [r.render({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})[0]
            for q, a in TEXTS]


def lora(tokenizer, base=None):
    """`base` (default: the tiny LLaMA) with a LoRA adapter on q_proj, v_proj."""
    from peft import LoraConfig, get_peft_model

    base = make_model(tokenizer) if base is None else base
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # non-zero B, so the LoRA gradients are all informative
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, batch):
    """The loss sum of one batch and the adapter gradients it gives (the model's gradients reset after)."""
    loss = forward_loss_sum(model, batch)
    loss.backward()
    out = grads(model)
    model.zero_grad()
    return loss.item(), out


def test_chunked_loss_equals_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 97, bias=False)
    targets = torch.randint(0, 97, (3, 50))
    targets[0, :10] = IGNORE
    ref = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    ref_grad = torch.autograd.grad(ref, hidden)[0]
    for chunk in (7, 64, 4096):
        got = lm_loss_sum(hidden, head, targets, chunk=chunk)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-6)
        assert torch.allclose(torch.autograd.grad(got, hidden)[0], ref_grad, atol=1e-6)


def test_loss_matches_transformers_own(tokenizer):
    model = make_model(tokenizer)
    batch = collate_padded(samples(tokenizer)[:3], pad_id=tokenizer.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    s = samples(tokenizer)[:3]
    for r, smp in enumerate(s):
        labels[r, : len(smp["labels"])] = torch.tensor(smp["labels"])
    n = trained_tokens(s)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    got = forward_loss_sum(model, batch) / n
    assert abs(got.item() - ref.item()) < 1e-5


def test_packed_equals_unpacked(tokenizer):
    data = samples(tokenizer)
    model = lora(tokenizer)
    packed, g_packed = loss_and_grads(model, collate_packed(data))
    padded, g_padded = loss_and_grads(model, collate_padded(data, pad_id=tokenizer.pad_token_id))
    assert abs(packed - padded) < 1e-5 * max(1.0, abs(padded))
    for n in g_packed:
        assert torch.allclose(g_packed[n], g_padded[n], atol=1e-5), n


def test_packed_attention_never_crosses_samples(tokenizer):
    data = samples(tokenizer)
    model = lora(tokenizer)
    alone = forward_loss_sum(model, collate_packed(data[1:2])).item()
    changed_neighbour = [data[0], data[1]]
    other = dict(data[0], input_ids=[5] * len(data[0]["input_ids"]))
    with_a = forward_loss_sum(model, collate_packed(changed_neighbour)).item() - forward_loss_sum(
        model, collate_packed(data[:1])).item()
    with_other = forward_loss_sum(model, collate_packed([other, data[1]])).item() - forward_loss_sum(
        model, collate_packed([other])).item()
    assert abs(with_a - alone) < 1e-4 and abs(with_other - alone) < 1e-4


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_accumulation_is_token_weighted(tokenizer, collate):
    """One optimizer step of batch 8 equals micro-batches 2 x 4 within 1e-6 (token-weighted, not per-batch means)."""
    data = samples(tokenizer)
    fn = collate_packed if collate == "packed" else (lambda b: collate_padded(b, tokenizer.pad_token_id))
    model = lora(tokenizer)
    big, n_big = accumulate_step(model, [data], fn, torch.autograd.backward)
    g_big = grads(model)
    model.zero_grad()
    small, n_small = accumulate_step(model, [data[i:i + 2] for i in range(0, 8, 2)], fn, torch.autograd.backward)
    g_small = grads(model)
    assert n_big == n_small and abs(big - small) < 1e-6 * big
    for n in g_big:
        assert torch.allclose(g_big[n], g_small[n], atol=1e-6, rtol=1e-5), n
    # the naive per-micro-batch mean (the old transformers bug) gives a different gradient on these samples
    model.zero_grad()
    for i in range(0, 8, 2):
        mb = data[i:i + 2]
        (forward_loss_sum(model, fn(mb)) / trained_tokens(mb) / 4).backward()
    naive = grads(model)
    assert any(not torch.allclose(g_big[n], naive[n], atol=1e-6) for n in g_big)


def test_packed_attention_equals_block_masked_sdpa(tokenizer):
    from peftune.train.attention import use_packed_attention

    data = samples(tokenizer)
    model = lora(tokenizer)
    ref, g_ref = loss_and_grads(model, collate_packed(data))
    assert use_packed_attention(model.get_base_model())
    got, g_got = loss_and_grads(model, collate_packed(data))
    assert abs(got - ref) < 1e-5 * abs(ref)
    for n, g in g_got.items():
        assert torch.allclose(g, g_ref[n], atol=1e-6), n
    # padded batches (an attention mask) take the plain SDPA path and still agree
    padded = forward_loss_sum(model, collate_padded(data, pad_id=tokenizer.pad_token_id))
    assert abs(padded.item() - ref) < 1e-5 * abs(ref)


def _windowed(kind, tokenizer):
    """A tiny Mistral / Qwen2 with a 4-token sliding window, as LoRA (the samples are longer than the window)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    else:  # the second layer slides, the first does not
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=1))
    return lora(tokenizer, model)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_packed_attention_keeps_the_sliding_window(tokenizer, kind):
    """peftune's per-sample attention over a packed row honours the model's sliding window: the loss and gradients
    of transformers' own padded batch (its sliding-window masks), and not those of plain causal attention."""
    from peftune.train.attention import use_packed_attention

    data = samples(tokenizer)
    assert max(len(s["input_ids"]) for s in data) > 4
    model = _windowed(kind, tokenizer)
    padded, g_padded = loss_and_grads(model, collate_padded(data, pad_id=tokenizer.pad_token_id))
    assert use_packed_attention(model.get_base_model())
    packed, g_packed = loss_and_grads(model, collate_packed(data))
    assert abs(packed - padded) < 1e-5 * max(1.0, abs(padded))
    for n in g_packed:
        assert torch.allclose(g_packed[n], g_padded[n], atol=1e-5), n
    model.get_base_model().config.sliding_window = 10_000  # and the window matters here: wider, other numbers
    for layer in model.get_base_model().model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 10_000
    unwindowed, _ = loss_and_grads(model, collate_packed(data))
    assert abs(unwindowed - padded) > 1e-3
