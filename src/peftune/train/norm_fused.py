"""The decoder's RMSNorms as one autograd function that hands its output to the projections in their matmul dtype.

Under bf16/fp16 autocast the residual stream and the norms stay fp32 (transformers' LlamaRMSNorm computes in fp32 and
returns fp32 for an fp32 input), and each consumer casts the norm's output down by itself: q, k and v each cast the
same [tokens x d] tensor, gate and up each cast the other; in the backward pass each of the five casts' gradients is
cast back to fp32 and autograd adds them, and the norm's own backward is some ten elementwise passes (pow, mean,
rsqrt, two products, each recorded). Here one function computes, with r = 1 / sqrt(mean(x^2) + eps):

    forward:  y = w * (x * r), written once in the autocast dtype (the same values autocast's casts would make)
    backward: g = dy * w;   dx = r * g - (x * r) * (r * mean(g * x * r))   (dw likewise, if w is trained)

The forward values are bit for bit those of transformers' norm followed by the consumers' casts (tested); the
backward rounds differently: the consumers' gradients arrive summed by autograd in the autocast dtype instead of
cast to fp32 first and summed there, and the norm's gradient is computed in another order (tests state the
tolerance). Outside autocast the output is fp32, as before, with the shorter backward.

Used for the RMSNorm classes below, whose forward is transformers' `weight * (x * rsqrt(mean(x^2) + eps))` for an
fp32 input, and only when the input and the weight are fp32 (Qwen3's per-head q/k norms get bf16 inputs under
autocast: those calls keep transformers' forward). Each swapped module is checked once on a probe input against its
own forward before it is swapped. Why by hand: torch's fused `rms_norm` returns its input's dtype and saves little
(docs/speed.md: 0.67 → 0.59 ms forward and backward for 700 x 576), and transformers has no switch for the output
dtype. Put in place as LoRA's fused layer is (lora_fused.py): the module's class becomes a subclass that overrides
`forward` only.
"""

from __future__ import annotations

import torch
from torch import nn

from .cast_once import autocast_dtype
from .swap import mixed

# transformers' RMSNorm classes whose forward is weight * (x * rsqrt(mean(x^2) + eps)) in fp32
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        """x, weight: fp32. transformers' operators in its order (pow, mean, + eps, rsqrt, x * r, w * ...), so the
        same fp32 values; the last product is written straight into the output dtype."""
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * r
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        torch.mul(weight, normed, out=out)  # fp32 product, rounded once on the way out: autocast's cast
        ctx.save_for_backward(normed, r, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        normed, r, weight = ctx.saved_tensors
        g = torch.mul(grad_out, weight)  # fp32 (type promotion of a bf16 gradient)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mul(grad_out, normed).reshape(-1, normed.shape[-1]).sum(0)
        # d/dx of w * x * r: r * g - normed * r * mean(g * normed)
        dot = torch.mul(g, normed).mean(-1, keepdim=True).mul_(r)
        grad_x = g.mul_(r).sub_(normed * dot) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None, None


class FusedRMSNormMixin:
    """forward through _RMSNorm when the input and the weight are fp32; the class's own forward otherwise."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32:
            return super().forward(hidden_states)
        out_dtype = autocast_dtype(hidden_states.device.type) or torch.float32
        return _RMSNorm.apply(hidden_states, weight, self.variance_epsilon, out_dtype)


def _agrees(module: nn.Module) -> bool:
    """Whether _RMSNorm gives this module's own forward's output, bit for bit, on a probe input (no random numbers
    drawn: the training's random stream stays as it was)."""
    weight, eps = module.weight, getattr(module, "variance_epsilon", None)
    if weight.device.type == "meta" or weight.dtype != torch.float32 or not isinstance(eps, float):
        return False
    width = weight.shape[-1]
    probe = torch.linspace(-3.0, 5.0, 3 * width, device=weight.device).reshape(3, width)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        own = module.forward(probe)
        ours = _RMSNorm.apply(probe, weight, eps, torch.float32)
    return own.dtype == ours.dtype and torch.equal(own, ours)


def use_fused_norms(model: nn.Module) -> int:
    """Gives every RMSNorm of the classes above the fused forward; returns how many modules."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ not in NORM_CLASSES or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if _agrees(module):
            module.__class__ = mixed(FusedRMSNormMixin, cls, "Fused")
            count += 1
    return count
