"""A LoRA linear layer's forward and backward as one autograd function (the idea of Unsloth's fused LoRA, in plain
PyTorch matmuls).

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules: under autocast
that is, per layer and micro-batch, a cast of the input for the base, a cast of it to fp32 for the adapter (peft's
`_cast_input_dtype`), the dropout's mask applied in fp32 and scaled, a cast back to bf16 for lora_A, two matmuls,
a multiplication by the scaling and an addition, each recorded by autograd; the backward pass mirrors each of them,
with the casts' gradients and two more additions. Here one function computes, with `s` = scaling / (1 - p) and the
input `x` cast once to the matmul dtype:

    forward:  a = (x * keep) @ A.T                    out = x @ W.T (+ bias) + s * (a @ B.T)   (one addmm_)
    backward: dB = s * g.T @ a    da = s * g @ B    dA = da.T @ (x * keep)    dx = g @ W + (da @ A) * keep

The dropout's 1 / (1 - p) moves from the input into the scaling (exact in real arithmetic; the mask itself, 0 or 1,
is exact in any dtype), so the input is not rescaled and is cast once. The masks are FastDropout's, drawn at the
same point with the same shape: the same random stream as the unfused layer. Other rounding under bf16/fp16 (the
scale enters after the matmuls instead of before them); in fp32 equal up to float rounding (tested).

Used only where the layer is plain LoRA: one active adapter, no variant (DoRA), no lora_bias, not merged, a plain
frozen base weight (nn.Linear or CastOnceLinear: its cast-once copy), and a FastDropout or no dropout. Anything else
(adapter_off for the replay's KL, several adapters, a fused q/k/v base, nn.Dropout) takes peft's own forward.

Why by hand: peft has no fused forward, and Unsloth's are Triton kernels for GPUs. How it is put in place: each
`lora.Linear` of the model gets this subclass as its class (`use_fused_lora`); it adds no state and overrides only
`forward`, so peft's own code (saving, merging, disable_adapter, isinstance checks) sees the layer it made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .cast_once import autocast_dtype, is_plain_linear, matmul_bias, matmul_weight
from .dropout import FastDropout


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, keep):
        """x: [..., in] in the matmul dtype; weight, bias, lora_a, lora_b: in the matmul dtype (weight and bias
        frozen); keep: the dropout's 0/1 mask of x's shape in the matmul dtype, or None."""
        rows = x.reshape(-1, x.shape[-1])
        dropped = rows if keep is None else rows * keep.reshape(rows.shape)
        a = dropped @ lora_a.t()
        out = F.linear(rows, weight, bias).addmm_(a, lora_b.t(), alpha=scale)  # in place: addmm would copy out
        ctx.save_for_backward(weight, lora_a, lora_b, dropped, a, keep)
        ctx.scale, ctx.shapes = scale, (x.shape, x.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        weight, lora_a, lora_b, dropped, a, keep = ctx.saved_tensors
        shape, dtype = ctx.shapes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
        grad_b = (g.t() @ a).mul_(ctx.scale)
        da = (g @ lora_b).mul_(ctx.scale)
        grad_a = da.t() @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora_part = da @ lora_a
            if keep is not None:
                lora_part.mul_(keep.reshape(lora_part.shape))
            grad_x = lora_part.addmm_(g, weight).view(shape).to(dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def fusable(layer) -> str | None:
    """The one adapter whose forward _LoraLinear can compute for this layer now, or None (peft's forward then)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(name):
        return None
    base = layer.base_layer
    if not is_plain_linear(base) or base.weight.requires_grad:
        return None
    if not isinstance(layer.lora_dropout[name], (FastDropout, nn.Identity)):
        return None
    return name


class FusedLoraLinear(LoraLinear):
    """peft's lora.Linear with the fused forward of _LoraLinear where it applies (fusable)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else fusable(self)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dtype = autocast_dtype(x.device.type)
        weight, bias = matmul_weight(self.base_layer), matmul_bias(self.base_layer)  # cast-once copies, or fp32
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if dtype is None and weight.dtype != lora_a.dtype:  # e.g. a bf16 base with fp32 adapters, no autocast
            return super().forward(x)
        dtype = dtype or lora_a.dtype
        drop = self.lora_dropout[name]
        keep, scale = None, self.scaling[name]
        if isinstance(drop, FastDropout) and drop.training and drop.threshold:
            keep, scale = drop.keep_mask(x.shape, x.device, dtype), scale * drop.scale
        with torch.autocast(x.device.type, enabled=False):  # every operand is in its matmul dtype already
            return _LoraLinear.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                     lora_a.to(dtype), lora_b.to(dtype), scale, keep)


def use_fused_lora(model: nn.Module) -> int:
    """Gives every peft lora.Linear of the model the fused forward; returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
