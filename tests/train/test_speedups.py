"""Each switchable speed-up leaves the loss and the gradients equal: fused q/k/v and gate/up projections (float
rounding only: the matmul's sums are blocked differently), weights cast once for autocast (bit for bit)."""

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


def _step(model, samples, collate, seed=1, autocast=None, beta=0.0):
    torch.manual_seed(seed)
    model.zero_grad()
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else None
    loss, tokens = accumulate_step(model, [samples[:2], samples[2:]], collate, lambda x: x.backward(), context,
                                   beta=beta)
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


def _weights_cast_once(model):
    from peftune.train.cast_once import CastOnceLinear

    return [m for m in model.modules() if isinstance(m, CastOnceLinear)]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_cast_once_are_bit_exact_under_autocast(tiny_model_dir, tokenizer, targets, fused, dtype):
    from peftune.train.cast_once import cast_weights_once
    from peftune.train.dropout import use_fast_dropout

    samples = _samples(tokenizer)
    samples[1]["replay"] = True  # the KL term to the base (replay_beta) reads the base's weights and the head too
    for collate in (batching.collate_packed, lambda c: batching.collate_padded(c, 0)):
        model = _model(tiny_model_dir, targets, dropout=0.1)
        use_fast_dropout(model)
        if fused:
            fuse_projections(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss, grads = _step(model, samples, collate, autocast=dtype, beta=0.5)
        layers = model.get_base_model().config.num_hidden_layers
        lora = 7 if targets == "all-linear" else 2
        # every frozen linear layer (lora's base layers, untargeted projections, the head); fused: the q/k/v and
        # gate/up groups count one each, beside o_proj and down_proj
        expected = (4 if fused else 7) * layers + 1
        assert cast_weights_once(model) == expected
        assert sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n) == lora * layers
        after = model.state_dict()  # the same parameters under the same names; the tied head is still tied
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        base = model.get_base_model()
        assert base.lm_head.weight is base.model.embed_tokens.weight
        assert all(m._weight_copy.copy is None for m in _weights_cast_once(model))  # made at first use only
        cast_loss, cast_grads = _step(model, samples, collate, autocast=dtype, beta=0.5)
        assert cast_loss == loss
        for name, g in grads.items():
            assert torch.equal(cast_grads[name], g), name
        copies = [m._weight_copy.copy for m in _weights_cast_once(model)]
        assert all(c is not None and c.dtype == dtype for c in copies)
        assert all(c.data_ptr() == d.data_ptr() for c, d in  # cast once: a second step reuses the same copies
                   zip(copies, [m._weight_copy.copy for m in _weights_cast_once(model)]))
        _step(model, samples, collate, autocast=dtype, beta=0.5)
        assert all(m._weight_copy.copy is c for m, c in zip(_weights_cast_once(model), copies))


def test_weights_cast_once_change_nothing_outside_autocast(tiny_model_dir, tokenizer):
    from peftune.train.cast_once import cast_weights_once

    samples = _samples(tokenizer)
    model = _model(tiny_model_dir, "all-linear", dropout=0.1)
    loss, grads = _step(model, samples, batching.collate_packed)
    cast_weights_once(model)
    fp32_loss, fp32_grads = _step(model, samples, batching.collate_packed)  # fp32 training, or evaluation
    assert fp32_loss == loss and all(torch.equal(fp32_grads[n], g) for n, g in grads.items())
    assert all(m._weight_copy.copy is None for m in _weights_cast_once(model))  # no copy made in fp32


def test_the_chunked_head_reads_the_cast_once_copy(tiny_model_dir):
    """Many labelled tokens: the head's chunks are recomputed in the backward pass, with the same copy."""
    from peftune.train.cast_once import CastOnceLinear
    from peftune.train.loss import lm_loss_sum

    head = AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.requires_grad_(False)
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, head.in_features)
    targets = torch.randint(0, head.out_features, (3, 40))
    targets[0, :5] = -100
    results = []
    for module in (head, CastOnceLinear(head)):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss_sum(h, module, targets, chunk=16)  # 8 chunks, each recomputed in backward
        loss.backward()
        results.append((loss.detach(), h.grad))
    (plain_loss, plain_grad), (cast_loss, cast_grad) = results
    assert torch.equal(plain_loss, cast_loss) and torch.equal(plain_grad, cast_grad)


def test_trained_layers_are_not_cast_once(tiny_model_dir):
    from peftune.train.cast_once import cast_weights_once

    assert cast_weights_once(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == 0  # a full fine-tune


@pytest.mark.parametrize("fast_dropout", [True, False])
def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model_dir, tokenizer, fast_dropout):
    from peftune.train.compiled import compile_layers
    from peftune.train.dropout import use_fast_dropout

    samples = _samples(tokenizer)
    eager, compiled = (_model(tiny_model_dir, "all-linear", dropout=0.1) for _ in range(2))
    if fast_dropout:  # its bit draw runs eagerly; peft's nn.Dropout is traced, drawing with torch's own ops
        use_fast_dropout(eager), use_fast_dropout(compiled)
    keys = compiled.state_dict().keys()
    assert compile_layers(compiled) == compiled.get_base_model().config.num_hidden_layers
    assert compiled.state_dict().keys() == keys  # compiled in place: the same names
    for collate in (batching.collate_packed, lambda c: batching.collate_padded(c, 0)):
        for seed in (1, 2):  # the same seed draws the same dropout masks, compiled or not
            loss, grads = _step(eager, samples, collate, seed=seed)
            compiled_loss, compiled_grads = _step(compiled, samples, collate, seed=seed)
            assert abs(compiled_loss - loss) <= 1e-5 * abs(loss)
            for name, g in grads.items():
                assert torch.allclose(compiled_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_compiled_layers_keep_the_weights_cast_once_under_bf16(tiny_model_dir, tokenizer):
    """Compiled and cast once together, as a bf16 run with torch_compile has them: the copies are made once and the
    compiled graphs reuse them (not cast again inside the graph), and the loss stays that of eager bf16 up to bf16
    rounding (inductor keeps some intermediates in fp32 that eager rounds to bf16)."""
    from peftune.train.cast_once import cast_weights_once
    from peftune.train.compiled import compile_layers

    samples = _samples(tokenizer)
    eager, compiled = (_model(tiny_model_dir, "all-linear") for _ in range(2))
    for model in (eager, compiled):
        cast_weights_once(model)
    compile_layers(compiled)
    losses = []
    for model in (eager, compiled):
        loss, grads = _step(model, samples, batching.collate_packed, autocast=torch.bfloat16)
        copies = [m._weight_copy.copy for m in _weights_cast_once(model)]
        _step(model, samples, batching.collate_packed, autocast=torch.bfloat16)
        assert all(c is not None and m._weight_copy.copy is c for m, c in zip(_weights_cast_once(model), copies))
        losses.append((loss, grads))
    (loss, grads), (compiled_loss, compiled_grads) = losses
    assert abs(compiled_loss - loss) <= 2e-2 * abs(loss)
    for name, g in grads.items():
        assert torch.allclose(compiled_grads[name], g, rtol=0.1, atol=0.02 * g.abs().max().item()), name


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_matmul_attention_gives_the_loss_and_gradients_of_sdpa(tiny_model_dir, tokenizer, monkeypatch, autocast):
    """packed_attention: matmul computes each short packed sample's attention as matmul, softmax, matmul: the loss
    and gradients of SDPA up to rounding (fp32: 1e-5; bf16: bf16's); a sample longer than MATMUL_MAX_LEN takes SDPA."""
    from peftune.train import attention

    samples = _samples(tokenizer)
    sdpa, matmul = (_model(tiny_model_dir, "all-linear") for _ in range(2))
    assert use_packed_attention(matmul.get_base_model(), "matmul")
    assert matmul.get_base_model().config._attn_implementation == attention.NAMES["matmul"]
    calls = []
    real = attention._matmul_attention
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, grads = _step(sdpa, samples, batching.collate_packed, autocast=autocast)
    matmul_loss, matmul_grads = _step(matmul, samples, batching.collate_packed, autocast=autocast)
    layers = matmul.get_base_model().config.num_hidden_layers
    assert len(calls) == 3 * layers  # every sample of both micro-batches, every layer (forward)
    rtol = 1e-5 if autocast is None else 2e-2
    assert abs(matmul_loss - loss) <= rtol * abs(loss)
    for name, g in grads.items():
        if autocast is None:
            assert torch.allclose(matmul_grads[name], g, rtol=1e-4, atol=1e-6), name
        else:
            assert torch.allclose(matmul_grads[name], g, rtol=0.1, atol=0.02 * g.abs().max().item()), name
    if autocast is None:  # beyond the length limit: SDPA itself, the same numbers to the bit
        monkeypatch.setattr(attention, "MATMUL_MAX_LEN", 2)
        calls.clear()
        long_loss, long_grads = _step(matmul, samples, batching.collate_packed)
        assert not calls and long_loss == loss
        assert all(torch.equal(long_grads[n], g) for n, g in grads.items())


def test_attention_fp32_computes_packed_attention_in_fp32_under_autocast(tiny_model_dir, tokenizer, monkeypatch):
    """attention_fp32: under bf16 autocast on a CPU, every packed sample's attention gets fp32 queries, keys and
    values (without it autocast casts them to bf16 inside the operator); the loss and gradients are the bf16 kernel's up to bf16 rounding, and not the same
    numbers (the switch is in effect); outside autocast nothing changes, bit for bit."""
    from peftune.train import attention

    samples = _samples(tokenizer)
    plain, fp32 = (_model(tiny_model_dir, "all-linear") for _ in range(2))
    assert use_packed_attention(fp32.get_base_model(), "sdpa", fp32=True)
    assert fp32.get_base_model().config._attn_implementation == attention.NAME + attention.FP32
    dtypes = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: dtypes.append((torch.is_autocast_enabled("cpu"), q.dtype, k.dtype,
                                                             v.dtype)) or real(q, k, v, **kw))
    layers = fp32.get_base_model().config.num_hidden_layers
    loss, grads = _step(plain, samples, batching.collate_packed, autocast=torch.bfloat16)
    # autocast casts them to bf16 inside the operator (the values come from the bf16 projection)
    assert len(dtypes) == 3 * layers and all(d[0] and d[3] == torch.bfloat16 for d in dtypes)
    dtypes.clear()
    fp32_loss, fp32_grads = _step(fp32, samples, batching.collate_packed, autocast=torch.bfloat16)
    assert len(dtypes) == 3 * layers and all(d == (False, *(torch.float32,) * 3) for d in dtypes)
    assert fp32_loss != loss and abs(fp32_loss - loss) <= 2e-2 * abs(loss)
    for name, g in grads.items():
        assert torch.allclose(fp32_grads[name], g, rtol=0.1, atol=0.02 * g.abs().max().item()), name
    # fp32 training: the switch changes nothing
    (loss, grads), (fp32_loss, fp32_grads) = (_step(m, samples, batching.collate_packed) for m in (plain, fp32))
    assert fp32_loss == loss and all(torch.equal(fp32_grads[n], g) for n, g in grads.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_is_per_sample_sdpa_bit_for_bit(dtype):
    """The row split into its samples (`split`, one output cat) computes exactly what causal SDPA over each sample's
    slice computes: the same output, [1, tokens, heads, dim] and contiguous, and the same gradients, bit for bit."""
    import types

    import torch.nn.functional as F

    from peftune.train.attention import packed_sdpa

    torch.manual_seed(0)
    lengths = [23, 5, 40]
    n = sum(lengths)
    q, k, v = (torch.randn(1, h, n, 16, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    out, _ = packed_sdpa(types.SimpleNamespace(training=True), q, k, v, None, position_ids=positions)
    grad = torch.randn(out.shape, dtype=dtype)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    starts = [0, 23, 28, n]
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
             for s, e in zip(starts[:-1], starts[1:])]
    reference = torch.cat(parts, dim=2).transpose(1, 2).contiguous()
    assert out.shape == (1, n, 4, 16) and out.is_contiguous() and torch.equal(out, reference)
    for mine, theirs in zip(ours, torch.autograd.grad(reference, (q, k, v), grad)):
        assert torch.equal(mine, theirs)
