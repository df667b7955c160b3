"""Attention for packed batches that computes only the block-diagonal part.

transformers handles packed rows (restarting `position_ids`, no attention mask) by building a block-diagonal
mask and running SDPA over the whole row: the cost grows with the square of the row length, though only the
diagonal blocks count. On a CPU that was 44 % of a LoRA step (SmolLM2-135M, 4 samples of ~160 tokens). This
function runs causal SDPA once per sample instead (the varlen idea of flash-attention, which has no CPU kernel).
It is registered through transformers' public AttentionInterface, and falls back to plain SDPA for anything
that is not a packed row (padded batches, generation with a cache). A layer with a sliding window (Mistral, Qwen2's
`use_sliding_window`) keeps it: a sample longer than the window gets transformers' sliding-window mask.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

NAME = "peftune_packed_sdpa"
NAMES = {"sdpa": NAME, "matmul": "peftune_packed_matmul"}
FP32 = "_fp32"  # the suffix of the names whose CPU attention runs in fp32 (attention_fp32)


# out of torch.compile's graph (compiled.py): the number of samples in a row changes from batch to batch
@torch.compiler.disable
def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, kernel: str = "sdpa",
                fp32: bool = False, **kwargs):
    """`fp32`: on a CPU, under bf16/fp16 autocast, each packed sample's attention is computed in fp32 (inputs cast
    up, autocast off inside) and its output stays fp32 (the output projection's autocast casts it down). Why: torch's
    CPU flash-attention backward is slower in bf16 than in fp32 (measured: 4 samples of 120-200 tokens, one layer,
    forward + backward 12.2 ms in bf16, 7.5 ms in fp32), and after the rotary embedding the queries and keys are
    fp32 already, so only the values are cast. More precise than the bf16 kernel; other numbers than it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
              and position_ids.shape[-1] == query.shape[2])
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [query.shape[2]]
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    upcast = fp32 and query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    window = kwargs.get("sliding_window")  # transformers passes it for the layers that have one
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            query, key, value = query.float(), key.float(), value.float()
        outs = []
        # split, not one slice per sample: autograd's backward of a slice is a zero-filled tensor of the whole row
        # added to the others (samples x row per tensor, 0.2 s of a 2,777-token step), split's is one cat
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2)):
            # a sample longer than the model's sliding window (Mistral, Qwen2) gets the window's mask, else causal
            mask = _window_mask(q.shape[2], window, q.device) if window and q.shape[2] > window else None
            if mask is None and kernel == "matmul" and not p and q.shape[2] <= MATMUL_MAX_LEN:
                out = _matmul_attention(q, k, v, scaling)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p,
                                                     scale=scaling, enable_gqa=gqa)
            outs.append(out.transpose(1, 2))
        # [1, tokens, heads, dim] as the caller wants it, in one copy (cat of the transposed views)
        return torch.cat(outs, dim=1), None


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal with a sliding window, as transformers' `sliding_window_overlay`: query i sees keys j with
    i - window < j <= i (True = attend)."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


# Samples up to this many tokens take the matmul path: its scores (heads x L x L, kept for backward) grow with the
# square of the length, SDPA's do not.
MATMUL_MAX_LEN = 512


def _matmul_attention(q, k, v, scaling=None):
    """Causal attention of one sample as matmul, softmax (fp32), matmul. Why by hand: on CPUs the flash-attention
    kernel behind SDPA is slow for short samples in bf16 (docs/speed.md: 15-23 ms against 9-12 ms for one layer's
    micro-batch of four ~170-token samples, forward and backward), while bf16 matmuls run near the peak. Grouped-query
    attention without copying the keys: the query heads that share a key head are stacked along the rows."""
    _, heads, length, dim = q.shape
    groups = k.shape[1]
    rows = q.reshape(groups, heads // groups * length, dim)
    scores = torch.matmul(rows, k.reshape(groups, length, dim).transpose(1, 2))
    scores = scores.float() * (dim ** -0.5 if scaling is None else scaling)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.view(groups, heads // groups, length, length).masked_fill(future, float("-inf"))
    weights = scores.softmax(-1).to(v.dtype)  # v's: bf16 under autocast, as SDPA's output (fp32 with attention_fp32)
    out = torch.matmul(weights.view(groups, heads // groups * length, length), v.reshape(groups, length, dim))
    return out.view(1, heads, length, dim)


def register(kernel: str = "sdpa", fp32: bool = False) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = NAMES[kernel] + (FP32 if fp32 else "")
    AttentionInterface.register(name, functools.partial(packed_sdpa, kernel=kernel, fp32=fp32))
    AttentionMaskInterface.register(name, sdpa_mask)  # the fallback path gets the usual SDPA mask
    return name


def use_packed_attention(model, kernel: str = "sdpa", fp32: bool = False) -> bool:
    """Switch a model whose attention is SDPA to the packed variant; returns whether it did. `kernel` "matmul":
    samples of up to MATMUL_MAX_LEN tokens are computed by _matmul_attention (attention dropout: SDPA). `fp32`: on a
    CPU under autocast, the packed samples' attention runs in fp32 (packed_sdpa)."""
    ours = (*NAMES.values(), *(n + FP32 for n in NAMES.values()))
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", *ours):
        return False
    model.set_attn_implementation(register(kernel, fp32))
    return True
