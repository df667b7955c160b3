"""One matmul for the frozen q/k/v projections of a layer, and one for gate/up (the idea behind Unsloth's fused LoRA,
in plain PyTorch, for training on a frozen base).

Those projections read the same input: three (or two) small matmuls become one against their weights concatenated,
and in the backward pass the input's gradient is one matmul instead of three plus two additions. Nothing else moves:
each projection keeps its own LoRA branch (its dropout mask, A and B) around the slice it now reads, so the model
computes the same function (the matmul's sums are blocked differently: equal up to float rounding, tested).

How, without touching transformers' code: each frozen projection (a plain `nn.Linear`, or a LoRA layer's
`base_layer`) is replaced by a `SliceOfFused` linear whose weight is a view into the concatenated weight (no extra
memory; the model's state dict is unchanged). The first of the group to be called with an input computes the whole
product and keeps it until each sibling has taken its slice; a call with another input computes afresh, so a
sibling called out of order or alone is still right (it then costs the full product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cast_once import autocast_dtype

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Product:
    """The shared weight of a group and the product of its last input, kept until every member has read its slice."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]) -> None:
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.input, self.parts, self.unread = None, None, set()
        self.low_precision = None  # a cast_once.LowPrecisionCopy once cast_weights_once has run

    def matmul_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = autocast_dtype(x.device.type) if self.low_precision is not None else None
        if dtype is None:
            return self.weight, self.bias
        # the bias (rare in these projections) is left to autocast's own cast
        return self.low_precision.of(self.weight, dtype), self.bias

    def slice(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x or index not in self.unread:
            self.input, self.unread = x, set(range(len(self.sizes)))
            self.parts = F.linear(x, *self.matmul_weights(x)).split(self.sizes, dim=-1)
        out = self.parts[index]
        self.unread.discard(index)
        if not self.unread:
            self.input = self.parts = None  # nothing kept past the group's last read
        return out


class SliceOfFused(nn.Linear):
    """A frozen linear layer whose weight is rows of its group's concatenated weight."""

    def __init__(self, product: _Product, index: int, start: int, end: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = product.weight.shape[1], end - start
        self.weight = nn.Parameter(product.weight[start:end], requires_grad=False)
        self.bias = None if product.bias is None else nn.Parameter(product.bias[start:end], requires_grad=False)
        self._product, self._index = product, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product.slice(self._index, x)


def _frozen_linear(module: nn.Module) -> tuple[nn.Module, str] | None:
    """(owner, attribute) of the plain frozen nn.Linear behind a projection: the module itself, or a vanilla LoRA
    layer's base_layer. None for anything else (quantized, DoRA, trained weights, other adapters)."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        if getattr(module, "lora_variant", None) or type(module.base_layer) is not nn.Linear:
            return None
        module = module.base_layer
        owner = "base_layer"
    elif type(module) is nn.Linear:
        owner = None
    else:
        return None
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return None
    return module, owner


def fuse_projections(model: nn.Module) -> int:
    """Fuses every q/k/v and gate/up group of frozen projections in the model; returns how many groups it fused."""
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if any(m is None for m in members):
                continue
            found = [_frozen_linear(m) for m in members]
            if any(f is None for f in found):
                continue
            linears = [f[0] for f in found]
            first = linears[0].weight
            if any(l.in_features != linears[0].in_features or l.weight.dtype != first.dtype
                   or l.weight.device != first.device or (l.bias is None) != (linears[0].bias is None)
                   for l in linears):
                continue
            sizes = [l.out_features for l in linears]
            with torch.no_grad():
                weight = torch.cat([l.weight for l in linears]).contiguous()
                bias = None if linears[0].bias is None else torch.cat([l.bias for l in linears])
            product = _Product(weight, bias, sizes)
            start = 0
            for k, (name, member, (linear, owner)) in enumerate(zip(names, members, found)):
                replacement = SliceOfFused(product, k, start, start + sizes[k])
                start += sizes[k]
                if owner is None:
                    setattr(parent, name, replacement)
                else:
                    setattr(member, owner, replacement)
            fused += 1
    return fused
