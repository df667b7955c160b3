"""The fused loss (LinearCrossEntropy) and the fused LoRA layers (lora_fused.py) compute what autograd computes through
peft's and torch's own modules: in fp32 equal up to float rounding; under bf16 autocast no further from the fp32
result than the unfused bf16 step is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftune.data import batching
from peftune.data.render import IGNORE
from peftune.train.attention import use_packed_attention
from peftune.train.cast_once import cast_weights_once
from peftune.train.dropout import use_fast_dropout
from peftune.train.lora_fused import FusedLoraLinear, use_fused_lora
from peftune.train.loss import LinearCrossEntropy, LossModel, accumulate_step, lm_loss_sum


def _head_case(n=300, d=16, vocab=97):
    torch.manual_seed(0)
    hidden = torch.randn(3, n, d)
    head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    targets = torch.randint(0, vocab, (3, n))
    targets[0, :10] = IGNORE
    return hidden, head, targets


def _head_loss(hidden, head, targets, fused, autocast=None, chunk=1024, scale=1 / 777):
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = lm_loss_sum(h, head, targets, chunk=chunk, fused=fused)
    (loss * scale).backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [7, 1024])
def test_fused_loss_equals_autograds_in_fp32(chunk, monkeypatch):
    hidden, head, targets = _head_case()
    calls = []
    real = LinearCrossEntropy.forward
    monkeypatch.setattr(LinearCrossEntropy, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    loss, grad = _head_loss(hidden, head, targets, fused=False, chunk=chunk)
    assert not calls
    fused_loss, fused_grad = _head_loss(hidden, head, targets, fused=True, chunk=chunk)
    assert calls  # the fused path ran
    assert abs(fused_loss.item() - loss.item()) <= 1e-6 * abs(loss.item())
    assert torch.allclose(fused_grad, grad, rtol=1e-5, atol=1e-9)
    ref = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    assert abs(fused_loss.item() - ref.item()) <= 1e-6 * abs(ref.item())


def test_fused_loss_under_bf16_is_as_close_to_fp32_as_autograds():
    hidden, head, targets = _head_case()
    _, exact = _head_loss(hidden, head, targets, fused=False)
    loss, grad = _head_loss(hidden, head, targets, fused=False, autocast=torch.bfloat16)
    fused_loss, fused_grad = _head_loss(hidden, head, targets, fused=True, autocast=torch.bfloat16)
    assert abs(fused_loss.item() - loss.item()) <= 1e-6 * abs(loss.item())  # the same bf16 logits, fp32 softmax
    assert not torch.equal(fused_grad, grad)  # the scale enters after the bf16 rounding: other rounding
    assert (fused_grad - exact).norm() <= 1.5 * (grad - exact).norm()


def test_fused_loss_keeps_one_set_of_buffers_until_released():
    from peftune.train import loss

    hidden, head, targets = _head_case(n=600)
    _head_loss(hidden, head, targets, fused=True)
    kept = list(loss._BLOCKS.values())
    assert len(kept) == 1 and kept[0][0].shape == (256, 97)  # blocks of FUSED_CHUNK rows
    _head_loss(hidden[:, :50], head, targets[:, :50], fused=True)  # fewer tokens: the same buffers serve
    assert list(loss._BLOCKS.values())[0][0] is kept[0][0]
    loss.release_blocks()
    assert not loss._BLOCKS


def test_fused_loss_is_not_used_without_gradients_or_for_a_trained_head(monkeypatch):
    hidden, head, targets = _head_case()
    calls = []
    real = LinearCrossEntropy.apply
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():  # evaluation: the loss alone
        evaluated = lm_loss_sum(hidden, head, targets)
    trained = torch.nn.Linear(16, 97, bias=False)  # a head that is trained (full fine-tune): autograd's path
    lm_loss_sum(hidden.clone().requires_grad_(True), trained, targets).backward()
    assert trained.weight.grad is not None
    assert not calls
    assert abs(evaluated.item() - _head_loss(hidden.detach(), head, targets, fused=True)[0].item()) < 1e-3


def _samples(tokenizer):
    texts = ["hello world, one sample", "another, longer sample of the batch to train on", "third"]
    return [{"input_ids": (ids := tokenizer(t)["input_ids"]), "labels": [-100] * 2 + ids[2:]} for t in texts]


def _model(tiny_model_dir, targets="all-linear", dropout=0.1, **lora):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=targets, lora_dropout=dropout, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    use_packed_attention(model.get_base_model())
    use_fast_dropout(model)
    model.train()
    return model


def _step(model, samples, autocast=None, fused_loss=True):
    torch.manual_seed(1)
    model.zero_grad()
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else None
    loss, tokens = accumulate_step(LossModel(model, fused_loss=fused_loss), [samples[:2], samples[2:]],
                                   batching.collate_packed, lambda x: x.backward(), context)
    return loss / tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _distance(grads, reference):
    return sum((grads[n] - g).norm() ** 2 for n, g in reference.items()) ** 0.5


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_equals_peft_in_fp32(tiny_model_dir, tokenizer, targets, dropout):
    samples = _samples(tokenizer)
    model = _model(tiny_model_dir, targets, dropout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = _step(model, samples)
    layers = model.get_base_model().config.num_hidden_layers
    assert use_fused_lora(model) == (7 if targets == "all-linear" else 2) * layers
    assert all(type(m) is FusedLoraLinear for m in model.modules() if hasattr(m, "lora_A"))
    after = model.state_dict()  # the same tensors under the same names
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fused_loss, fused_grads = _step(model, samples)  # same seed: FastDropout's same masks
    assert abs(fused_loss - loss) <= 1e-6 * abs(loss)
    for name, g in grads.items():
        assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("fused_loss", [False, True])
def test_fused_lora_and_loss_under_bf16_are_as_close_to_fp32_as_peft(tiny_model_dir, tokenizer, fused_loss):
    """The bf16 step (weights cast once, as training runs) with the fused layers and loss is no further from the fp32
    step than peft's bf16 step is (the masks are the same: FastDropout's stream)."""
    samples = _samples(tokenizer)
    model = _model(tiny_model_dir)
    exact_loss, exact = _step(model, samples, fused_loss=False)
    cast_weights_once(model)
    loss, grads = _step(model, samples, torch.bfloat16, fused_loss=False)
    use_fused_lora(model)
    fused_loss_value, fused_grads = _step(model, samples, torch.bfloat16, fused_loss=fused_loss)
    assert fused_loss_value != loss or not all(torch.equal(fused_grads[n], g) for n, g in grads.items())
    assert abs(fused_loss_value - exact_loss) <= 2 * abs(loss - exact_loss) + 1e-4 * abs(exact_loss)
    assert _distance(fused_grads, exact) <= 1.5 * _distance(grads, exact)
    copies = [m.base_layer._weight_copy.copy for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert all(c is not None and c.dtype == torch.bfloat16 for c in copies)  # the fused layers read the cast copies


def test_fused_lora_leaves_other_cases_to_peft(tiny_model_dir, tokenizer, monkeypatch):
    """The base alone (replay's KL, adapter_off), DoRA and nn.Dropout take peft's forward; in eval mode no mask."""
    from peftune.train import lora_fused

    samples = _samples(tokenizer)
    batch = batching.collate_packed(samples)
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids")}
    calls = []
    real = lora_fused._LoraLinear.apply
    monkeypatch.setattr(lora_fused._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))

    model = _model(tiny_model_dir)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(**kwargs).logits
    use_fused_lora(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(**kwargs).logits, base_logits) and not calls
    model.eval()
    with torch.no_grad():
        first = model(**kwargs).logits
        assert calls and torch.equal(model(**kwargs).logits, first)  # no dropout in eval mode

    calls.clear()
    dora = _model(tiny_model_dir, use_dora=True)
    use_fused_lora(dora)
    _step(dora, samples)
    assert not calls

    plain_dropout = _model(tiny_model_dir)
    for layer in [m for m in plain_dropout.modules() if hasattr(m, "lora_dropout")]:
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    use_fused_lora(plain_dropout)
    _step(plain_dropout, samples)
    assert not calls

    torch.manual_seed(0)  # a bf16 base with peft's fp32 adapters, no autocast: peft's forward (its dtype handling)
    half = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                          LoraConfig(r=4, target_modules="all-linear"))
    assert half.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    use_fused_lora(half)
    with torch.no_grad():
        assert half(**kwargs).logits.dtype == torch.bfloat16
    assert not calls
