"""Each switchable speed-up leaves the loss and the gradients equal: fused q/k/v and gate/up projections (float
rounding only: the matmul's sums are blocked differently)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftune.data import batching
from peftune.train.attention import use_packed_attention
from peftune.train.fused import SliceOfFused, fuse_projections
from peftune.train.loss import accumulate_step


def _samples(tokenizer):
    texts = ["hello world, one sample", "another, longer sample of the batch to train on", "third"]
    out = []
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def _model(tiny_model_dir, targets, dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=targets, lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    use_packed_attention(model.get_base_model())
    model.train()
    return model


def _step(model, samples, collate, seed=1):
    torch.manual_seed(seed)
    model.zero_grad()
    loss, tokens = accumulate_step(model, [samples[:2], samples[2:]], collate, lambda x: x.backward())
    return loss / tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_projections_leave_loss_and_gradients_equal(tiny_model_dir, tokenizer, targets, dropout):
    samples = _samples(tokenizer)
    for collate in (batching.collate_packed, lambda c: batching.collate_padded(c, 0)):
        model = _model(tiny_model_dir, targets, dropout)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss, grads = _step(model, samples, collate)
        layers = model.get_base_model().config.num_hidden_layers
        assert fuse_projections(model) == 2 * layers
        # the same tensors under the same names, now views of one weight per group
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert sum(isinstance(m, SliceOfFused) for m in model.modules()) == 5 * layers
        fused_loss, fused_grads = _step(model, samples, collate)  # same seed: the same dropout masks
        assert abs(fused_loss - loss) <= 1e-5 * abs(loss)
        for name, g in grads.items():
            assert torch.allclose(fused_grads[name], g, rtol=1e-4, atol=1e-6), name
        with torch.no_grad(), model.disable_adapter():  # the base alone (replay's KL) reads the fused weights too
            batch = collate(samples)
            kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
            assert torch.isfinite(model(**kwargs).logits).all()


def test_a_projection_called_alone_or_twice_is_still_right(tiny_model_dir):
    model = _model(tiny_model_dir, "all-linear")
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 5, attn.q_proj.in_features)
    expected_v, expected_q = attn.v_proj(x), attn.q_proj(x)
    fuse_projections(model)
    assert torch.allclose(attn.v_proj(x), expected_v, atol=1e-6)  # out of order: computes the product itself
    assert torch.allclose(attn.q_proj(x), expected_q, atol=1e-6)
    assert torch.allclose(attn.q_proj(x), expected_q, atol=1e-6)  # twice with the same input


def test_trained_or_quantized_weights_are_not_fused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # every weight trainable (peft_method full)
    assert fuse_projections(model) == 0


def test_fast_dropout_has_dropouts_law_and_gradient():
    from peftune.train.dropout import FastDropout

    drop = FastDropout(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    p = 1 - kept.float().mean().item()
    assert drop.threshold == 1638 and abs(p - 1638 / 32768) < 4 * (0.05 * 0.95 / 1e6) ** 0.5  # within 4 sigma
    assert torch.allclose(y[kept], torch.full_like(y[kept], 32768 / (32768 - 1638)))  # kept values scaled
    assert abs(y.mean().item() - 1.0) < 0.003  # the expectation is kept
    # every one of the four 15-bit lanes of a draw drops at the same rate (no lane is biased)
    lanes = (~kept).flatten()[:999_996].view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max() < 0.002
    y.sum().backward()
    assert torch.equal(x.grad, kept * drop.scale)  # the gradient passes where the value was kept
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the default generator's seed decides the mask (a resume draws the same)
    drop.eval()
    assert drop(x) is x


def test_use_fast_dropout_replaces_only_the_adapters_dropout(tiny_model_dir):
    from peftune.train.dropout import FastDropout, use_fast_dropout

    model = _model(tiny_model_dir, ["q_proj", "v_proj"], dropout=0.1)
    layers = model.get_base_model().config.num_hidden_layers
    assert use_fast_dropout(model) == 2 * layers
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 2 * layers
    assert use_fast_dropout(_model(tiny_model_dir, "all-linear", dropout=0.0)) == 0  # p = 0: nothing to draw
