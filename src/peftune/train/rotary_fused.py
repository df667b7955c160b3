"""The rotary position embedding of the queries and keys as one autograd function.

transformers' `apply_rotary_pos_emb` computes `q * cos + rotate_half(q) * sin`, with `rotate_half` a slice, a
negation and a cat: per layer and micro-batch some ten tensors of the queries' and keys' size, each recorded by
autograd; its backward pass adds the slices' zero-filled gradients, the casts of both products' gradients back to
the projections' bf16 (under autocast the products are fp32: cos and sin are) and a copy of the query's gradient into
the projection's layout. Here, with the two halves of the head dimension:

    forward:  out1 = q1 * cos1 - q2 * sin1      out2 = q2 * cos2 + q1 * sin2            (the same values, bit for bit)
    backward: dq1 = g1 * cos1 + g2 * sin2       dq2 = g2 * cos2 - g1 * sin1             (rounded once, in q's layout)

The forward values are transformers' (the same products and sums; tested bit-equal); the gradient is computed in the
products' dtype and rounded once to q's, where autograd rounds both products' gradients to bf16 and adds them there:
more precise, other rounding (tests state the tolerance).

Put in place for LlamaAttention (LLaMA 1-3, SmolLM, TinyLlama): the module's class becomes a subclass whose forward is
transformers' with this function in place of `apply_rotary_pos_emb`; a call with a KV cache (generation) takes
transformers' own forward. Each swapped module is first checked on a probe input against its own forward (outputs
bit-equal), so a transformers release whose attention differs keeps its forward. Why by hand: torch has no fused
rotary embedding on CPUs, and the kernels-hub versions are GPU kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .swap import mixed

ATTENTION_CLASSES = ("LlamaAttention",)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [batch, heads, tokens, dim] (any layout); cos, sin: [batch, 1, tokens, dim]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        out = torch.empty_like(x, dtype=torch.result_type(x, cos))  # x's layout: the transposes stay views
        torch.mul(x1, c1, out=out[..., :half]).sub_(x2 * s1)
        torch.mul(x2, c2, out=out[..., half:]).add_(x1 * s2)
        ctx.save_for_backward(cos, sin)
        ctx.layout = (x.shape, x.stride(), x.dtype)  # x itself is not kept for the backward pass
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        shape, stride, dtype = ctx.layout
        dx = torch.empty_strided(shape, stride, dtype=dtype, device=grad.device)
        torch.add(g1 * c1, g2 * s2, out=dx[..., :half])  # the sum rounded once into x's dtype
        torch.sub(g2 * c2, g1 * s1, out=dx[..., half:])
        return dx, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rotary.apply(x, cos.unsqueeze(1), sin.unsqueeze(1))


class FusedRotaryAttentionMixin:
    """transformers' LlamaAttention.forward with `rotate` in place of apply_rotary_pos_emb; with a KV cache (or
    without position embeddings) the class's own forward."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is not None or position_embeddings is None or kwargs.get("past_key_values") is not None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def _agrees(module: nn.Module, fused: type) -> bool:
    """Whether the fused forward gives this module's own forward's output, bit for bit, on a probe input (in eval
    mode, so that no dropout draws random numbers; the modules' modes and the module's class are restored)."""
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None or weight.device.type == "meta":
        return False
    width, dim = module.config.hidden_size, module.head_dim
    device, dtype = weight.device, weight.dtype  # the dtype the model computes in without autocast
    hidden = torch.linspace(-2.0, 2.0, 5 * width, device=device).reshape(1, 5, width).to(dtype)
    angles = torch.linspace(0.0, 3.0, 5 * dim, device=device).reshape(1, 5, dim)
    embeddings = (angles.cos().to(dtype), angles.sin().to(dtype))
    modes, cls = [(m, m.training) for m in module.modules()], type(module)
    module.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            own = module(hidden, embeddings, None)[0]
            module.__class__ = fused
            ours = module(hidden, embeddings, None)[0]
    except (RuntimeError, TypeError, ValueError):  # a module this probe cannot run (e.g. quantized layers): left as is
        return False
    finally:
        module.__class__ = cls
        for m, mode in modes:
            m.training = mode
    return own.dtype == ours.dtype and torch.equal(own, ours)


def use_fused_rotary(model: nn.Module) -> int:
    """Gives every attention module of the classes above the fused rotary embedding; returns how many modules."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ not in ATTENTION_CLASSES:
            continue
        fused = mixed(FusedRotaryAttentionMixin, cls, "FusedRotary")
        if _agrees(module, fused):
            module.__class__ = fused
            count += 1
    return count
