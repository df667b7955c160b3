"""torch.compile of the decoder layers, one region per layer (regional compilation).

Each decoder layer is compiled in place (`nn.Module.compile`: the module, its parameters and the state dict keep
their names), with dynamic shapes, so one graph serves every layer (their code is the same and their weights are
inputs) and every token count of a packed micro-batch. Inductor fuses what runs between the matmuls: the norms,
rotary embedding, SiLU x up, residual adds, LoRA's scaling and the casts.

Kept out of the graph (`torch.compiler.disable` where they are defined): the per-sample attention loop of packed
rows (attention.py: its number of samples changes from batch to batch, each count would be a new graph) and the
fast dropout's bit draw (dropout.py: `random_` is not traceable). peft's nn.Dropout, where it is used, is traced; its
masks are then drawn by torch's own random ops (`fallback_random`), so a compiled run draws the masks an uncompiled
run draws, and a resumed run those of the run it resumes. Inductor reorders floating-point sums: the loss and the
gradients equal the uncompiled ones up to rounding (tested).
"""

from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module) -> int:
    """Compiles every decoder layer of the model in place; returns how many."""
    import torch._inductor.config as inductor_config

    from .loss import causal_lm_parts

    inductor_config.fallback_random = True  # the same dropout masks as eager mode (see above)
    body, _ = causal_lm_parts(model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return 0
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
