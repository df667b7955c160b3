"""The frozen base's linear weights cast to the autocast dtype once, instead of on every forward.

Under autocast (bf16 on CPUs with AVX512-BF16/AMX and on GPUs, fp16 on older GPUs) every `F.linear` casts its fp32
weight to the lower precision. Autocast keeps such casts only for leaf tensors that require grad, so a frozen
weight is cast again on every forward of every micro-batch (and again when the chunked loss recomputes the head in
the backward pass), and each copy stays alive until the backward pass has used it. Here each frozen linear layer
(a plain `nn.Linear`, or the `base_layer` inside an adapter's layer) keeps its low-precision copy from its first
use on: the same rounding as autocast's (`Tensor.to`), so the same numbers, bit for bit (tested).

Why by hand: autocast has no switch to cache casts of frozen weights (`torch.autocast(cache_enabled=True)` caches
only leaves that require grad), and peft/transformers offer none either.

What does not change: the fp32 parameters stay the model's (the state dict, tied weights, checkpoints and anything
that reads `.weight`, such as DoRA's norm, PiSSA's init or a merge, see fp32); outside autocast (evaluation, fp32
training) the fp32 weight is used and no copy is made. The copy is a plain attribute, not a buffer: DDP does not
broadcast it, and it is made on the weight's device at first use, after the model has been moved there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes linear layers in on this device now, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class LowPrecisionCopy:
    """A tensor's copy in one dtype, made on first use (and again if the tensor moved to another device)."""

    def __init__(self) -> None:
        self.copy: torch.Tensor | None = None

    def of(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.copy is None or self.copy.dtype != dtype or self.copy.device != tensor.device:
            with torch.no_grad():
                self.copy = tensor.detach().to(dtype)
        return self.copy


class CastOnceLinear(nn.Linear):
    """A frozen linear layer that computes under autocast with its weight cast once. It holds the very Parameters of
    the layer it replaces (ties and state-dict names unchanged)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._weight_copy, self._bias_copy = LowPrecisionCopy(), LowPrecisionCopy()

    def matmul_weight(self) -> torch.Tensor:
        """The weight as autocast would cast it for a matmul now (the fp32 weight outside autocast)."""
        dtype = autocast_dtype(self.weight.device.type)
        return self.weight if dtype is None else self._weight_copy.of(self.weight, dtype)

    def matmul_bias(self) -> torch.Tensor | None:
        """The bias as autocast would cast it now (the fp32 bias outside autocast; None without one)."""
        dtype = autocast_dtype(self.weight.device.type)
        return self.bias if self.bias is None or dtype is None else self._bias_copy.of(self.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        bias = self.matmul_bias()
        # the input cast is autocast's own (the same op, the same gradient back to fp32)
        return F.linear(x.to(dtype), self._weight_copy.of(self.weight, dtype), bias)


def matmul_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a plain or cast-once linear layer multiplies by under the current autocast state."""
    return linear.matmul_weight() if isinstance(linear, CastOnceLinear) else linear.weight


def matmul_bias(linear: nn.Module) -> torch.Tensor | None:
    """The bias a plain or cast-once linear layer adds under the current autocast state."""
    return linear.matmul_bias() if isinstance(linear, CastOnceLinear) else linear.bias


def is_plain_linear(module: nn.Module) -> bool:
    """A linear layer whose forward is exactly F.linear(x, weight, bias)."""
    return type(module) in (nn.Linear, CastOnceLinear)


def _frozen(linear: nn.Linear) -> bool:
    return not linear.weight.requires_grad and (linear.bias is None or not linear.bias.requires_grad)


def cast_weights_once(model: nn.Module) -> int:
    """Replaces every frozen plain nn.Linear of the model (adapters' base layers and the output head included) by a
    CastOnceLinear holding the same parameters, and gives fused projections (fused.py) their copy too; returns how
    many weights now cast once. Trained layers (an adapter's own, a full fine-tune's, modules_to_save) and quantized
    layers are left as they are."""
    from .fused import SliceOfFused

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _frozen(child):
                setattr(parent, name, CastOnceLinear(child))
                count += 1
            elif isinstance(child, SliceOfFused) and child._product.low_precision is None:
                child._product.low_precision = LowPrecisionCopy()
                count += 1
    return count
