"""The fused RMSNorm (norm_fused.py) and the fused rotary embedding (rotary_fused.py): the same forward values as
transformers' modules, bit for bit; gradients equal up to float rounding in fp32 and, under bf16 autocast, no further
from the fp32 gradients than transformers' own bf16 step. Also FastDropout's mask in the matmul dtype."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from peftune.data import batching
from peftune.train.attention import use_packed_attention
from peftune.train.dropout import FastDropout, use_fast_dropout
from peftune.train.lora_fused import use_fused_lora
from peftune.train.loss import LossModel, accumulate_step
from peftune.train.norm_fused import FusedRMSNormMixin, use_fused_norms
from peftune.train.rotary_fused import FusedRotaryAttentionMixin, rotate, use_fused_rotary


def _norm(width=48):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width))
    return norm


def _norm_grads(norm, x, grad, autocast=False):
    """Gradients for x and the weight with three consumers of the norm's output, as q, k and v are: under autocast
    each casts it to bf16 (a no-op for the fused norm's bf16 output)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(x)
    dtype = torch.bfloat16 if autocast else torch.float32
    sum((out.to(dtype).float() * g).sum() for g in grad.unbind(0)).backward()
    return x.grad, norm.weight.grad


def test_fused_norm_has_transformers_forward_and_gradient_in_fp32():
    norm, fused = _norm(), _norm()
    assert use_fused_norms(fused) == 1 and isinstance(fused, LlamaRMSNorm) and isinstance(fused, FusedRMSNormMixin)
    x, grad = torch.randn(2, 37, 48), torch.randn(3, 2, 37, 48)
    assert torch.equal(fused(x), norm(x))
    for ours, theirs in zip(_norm_grads(fused, x, grad), _norm_grads(norm, x, grad)):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fused_norm_under_bf16_writes_the_cast_once_and_its_gradient_is_as_close_to_fp32():
    norm, fused = _norm(), _norm()
    use_fused_norms(fused)
    x, grad = torch.randn(2, 37, 48), torch.randn(3, 2, 37, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = fused(x), norm(x)
    assert ours.dtype == torch.bfloat16 and theirs.dtype == torch.float32
    assert torch.equal(ours, theirs.to(torch.bfloat16))  # the consumers' cast, made once
    exact = _norm_grads(norm, x, grad)[0]
    bf16 = _norm_grads(norm, x, grad, autocast=True)[0]
    ours = _norm_grads(fused, x, grad, autocast=True)[0]
    assert not torch.equal(ours, bf16)  # in effect: the consumers' gradients summed in bf16
    assert (ours - exact).norm() <= 2 * (bf16 - exact).norm()


def test_fused_norm_leaves_other_inputs_and_other_formulas_alone():
    fused = _norm()
    use_fused_norms(fused)
    half = torch.randn(5, 48).to(torch.bfloat16)  # as Qwen3's per-head norms get under autocast: transformers' forward
    assert torch.equal(fused(half), LlamaRMSNorm.forward(fused, half))

    class GemmaLike(nn.Module):  # the name of a fused class, another formula (1 + weight): not swapped
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.randn(48)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    GemmaLike.__name__ = "LlamaRMSNorm"
    other = GemmaLike()
    assert use_fused_norms(other) == 0 and type(other) is GemmaLike


def _rotary_case(dtype):
    torch.manual_seed(0)
    n = 41
    angles = torch.arange(n)[None, :, None].float() * (1.0 / 10000 ** (torch.arange(0, 16, 2) / 16.0))
    emb = torch.cat((angles, angles), -1)
    q = torch.randn(1, n, 4 * 16, dtype=dtype).requires_grad_(True)  # a projection's output, viewed per head
    return q, emb.cos(), emb.sin(), torch.randn(1, 4, n, 16)


def _rotary_grad(q, cos, sin, g, fused):
    heads = q.view(1, q.shape[1], 4, 16).transpose(1, 2)
    out = rotate(heads, cos, sin) if fused else apply_rotary_pos_emb(heads, heads, cos, sin)[0]
    (grad,) = torch.autograd.grad((out * g).sum(), q)
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_has_transformers_values_and_a_gradient_rounded_once(dtype):
    q, cos, sin, g = _rotary_case(dtype)
    out, grad = _rotary_grad(q, cos, sin, g, fused=True)
    ref, ref_grad = _rotary_grad(q, cos, sin, g, fused=False)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
    assert out.stride() == ref.stride() and grad.is_contiguous()  # q's layout: no copy to view it back
    if dtype == torch.float32:
        assert torch.equal(grad, ref_grad)
    else:
        exact = _rotary_grad(q.detach().float().requires_grad_(True), cos, sin, g, fused=False)[1]
        assert not torch.equal(grad, ref_grad)
        assert (grad.float() - exact).norm() < (ref_grad.float() - exact).norm()  # rounded once, not twice


def _model(tiny_model_dir, dropout=0.1):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    use_packed_attention(model.get_base_model(), "sdpa", True)
    use_fast_dropout(model)
    model.train()
    return model


def _samples(tokenizer):
    texts = ["the quick brown fox", "jumps over the lazy dog and runs", "hello", "a b c d e f g"]
    return [{"input_ids": ids, "labels": ids} for ids in (tokenizer(t)["input_ids"] for t in texts)]


def _step(model, samples, autocast=None):
    torch.manual_seed(1)
    model.zero_grad()
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else None
    loss, tokens = accumulate_step(LossModel(model), [samples[:2], samples[2:]], batching.collate_packed,
                                   lambda x: x.backward(), context)
    return loss / tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _distance(grads, reference):
    return sum((grads[n] - g).norm() ** 2 for n, g in reference.items()) ** 0.5


def test_fused_norms_and_rotary_in_a_model(tiny_model_dir, tokenizer):
    """Swapped in a LoRA model with the fused LoRA layers (as training runs): fp32 step equal up to rounding; the bf16
    step has the same loss (the forward values are transformers') and gradients no further from fp32's than
    transformers' bf16 step; the state dict unchanged. (peft's own LoRA forward would see other numbers: it casts
    its input to fp32 and scales it by the dropout's 1/(1-p) before autocast casts it down again.)"""
    samples = _samples(tokenizer)
    model = _model(tiny_model_dir)
    use_fused_lora(model)
    layers = model.get_base_model().config.num_hidden_layers
    exact_loss, exact = _step(model, samples)
    bf16_loss, bf16 = _step(model, samples, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fused_norms(model) == 2 * layers + 1 and use_fused_rotary(model) == layers
    assert all(isinstance(layer.self_attn, FusedRotaryAttentionMixin)
               for layer in model.get_base_model().model.layers)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    loss, grads = _step(model, samples)
    assert abs(loss - exact_loss) <= 1e-6 * abs(exact_loss)
    for name, g in exact.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name
    fused_loss, fused = _step(model, samples, torch.bfloat16)
    assert fused_loss == bf16_loss  # the same forward values, bit for bit
    assert not all(torch.equal(fused[n], g) for n, g in bf16.items())
    assert _distance(fused, exact) <= 1.5 * _distance(bf16, exact)


def test_fused_rotary_generates_as_transformers_and_is_not_swapped_where_the_forward_differs(tiny_model_dir):
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt = torch.tensor([[5, 9, 2, 7, 3]])
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert use_fused_rotary(model) > 0
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)  # the cache: transformers'

    class Other(LlamaAttention):  # a release whose attention differs (here: scaled output) keeps its forward
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return out * 2, weights

    Other.__name__ = "LlamaAttention"
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    layer = fresh.model.layers[0]
    layer.self_attn.__class__ = Other
    use_fused_rotary(fresh)
    assert type(layer.self_attn) is Other
    assert all(isinstance(l.self_attn, FusedRotaryAttentionMixin) for l in fresh.model.layers[1:])
    assert all(m.training for m in fresh.modules())  # the probe's eval mode was undone

    half = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)  # probed in the model's dtype
    assert use_fused_rotary(half) == half.config.num_hidden_layers


def test_fast_dropout_mask_in_the_matmul_dtype_is_the_bool_mask():
    drop = FastDropout(0.1)
    torch.manual_seed(3)
    as_bool = drop.keep_mask(torch.Size((7, 33)), "cpu")
    torch.manual_seed(3)
    as_bf16 = drop.keep_mask(torch.Size((7, 33)), "cpu", torch.bfloat16)
    assert as_bool.dtype == torch.bool and as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16, as_bool.to(torch.bfloat16)) and 0 < as_bool.float().mean() < 1
