"""Weight-only int8 linear layers for CPU inference (`--dtype int8`): int8 weights with one scale per output
channel, bf16 activations, multiplied by PyTorch's own `aten._weight_int8pack_mm` kernel.

Decoding reads every weight once per step, so on a CPU its speed follows the bytes read: int8 weights are half of
bf16's. Measured on the embedded model (2-core AVX2 CPU, one decode step): see docs/serve.md. Activations are not
quantized (torch's dynamic int8 quantization, which quantizes them too, raised the embedded model's validation loss
from 2.37 to 3.50 here); weight-only int8 keeps it near bf16's. transformers' quantizers need packages that are not
installed (torchao, optimum-quanto), hence this small module.
"""

from __future__ import annotations

import torch

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


def quantize_int8(model) -> int:
    """Replaces the model's linear layers (the decoder's and the output head; embeddings stay) in place; returns
    how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    return len(targets)
