"""Weight-only quantized linear layers for CPU inference: int8 weights with one scale per output channel
(`--dtype int8`), or 4-bit weights in groups of 32 with a scale and a zero point each (`--dtype int4`), multiplied
by PyTorch's own kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`; both take bf16
activations, the layers convert to and from the model's dtype).

Decoding reads every weight once per step, so on a CPU its speed follows the bytes read: int8 weights are half of
bf16's, 4-bit a quarter. Activations are not quantized (torch's dynamic int8 quantization, which quantizes them too,
raised the embedded model's validation loss from 2.37 to 3.50 here); weight-only int8 keeps it near bf16's. 4-bit
rounding loses more, except where a model's weights already are 4-bit: the embedded model comes from a Q4_1 GGUF
(blocks of 32 weights, each `d*q + m` with q in 0..15), whose blocks a group-32 scale and zero point hold exactly (up
to bf16 rounding of the two), so `quantize(model, "auto")` keeps such layers at 4 bits and makes the others int8.
transformers' quantizers need packages that are not installed (torchao, optimum-quanto), hence this small module.
"""

from __future__ import annotations

import torch

GROUP = 32


class Int8Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, dtype=torch.bfloat16) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.scales.dtype).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def int4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rounds weight [out, in] to 4 bits in groups of 32 along `in`: (q [out, in] int32 in 0..15, scale and zero
    [in/32, out, 2] bf16, the largest rounding error in steps of its group's scale). The kernel computes
    (q - 8) * scale + zero."""
    out, inputs = weight.shape
    w = weight.detach().float().reshape(out, inputs // GROUP, GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)  # the two are rounded first, q chosen for the rounded ones
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    error = ((q - 8) * scale.float()[..., None] + zero.float()[..., None] - w).abs() / scale.float()[..., None]
    return (q.reshape(out, inputs).to(torch.int32), torch.stack([scale.T, zero.T], dim=-1).contiguous(),
            float(error.max()))


class Int4Linear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, blocks=None) -> None:
        super().__init__()
        q, scales, _ = blocks if blocks is not None else int4_blocks(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales", scales)  # [in/32, out, 2]: scale and zero point
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


# a layer's weights count as already 4-bit when rounding them to 4 bits moves none by more than this many steps
# (exact 4-bit blocks move by bf16 rounding of their scale and zero, ~0.03 steps; other weights by up to 0.5)
ALREADY_4BIT = 0.25


def quantize(model, mode: str = "int8") -> dict[str, int]:
    """Replaces the model's linear layers (the decoder's and the output head; embeddings stay) in place: mode
    "int8", "int4", or "auto" (4 bits for layers whose weights already are 4-bit, int8 for the others). Returns how
    many layers became which."""
    counts = {"int8": 0, "int4": 0}
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        layer = None
        if mode in ("int4", "auto") and module.in_features % GROUP == 0 and module.out_features % 16 == 0:
            blocks = int4_blocks(module.weight)
            if mode == "int4" or blocks[2] <= ALREADY_4BIT:
                layer = Int4Linear(module, blocks)
                counts["int4"] += 1
        if layer is None:
            layer = Int8Linear(module)
            counts["int8"] += 1
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return counts
