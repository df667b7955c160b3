"""One packed sample's causal attention, forward and backward, by sample length: the kernels peftune can choose from
on a CPU (packed_attention, attention_fp32), timed alone.

    .venv/bin/python benchmarks/attention_kernels.py        # SmolLM2-135M: 9 query, 3 key/value heads, 64 dims
    .venv/bin/python benchmarks/attention_kernels.py --lengths 128,512 --reps 50

Kernels: torch's SDPA (its CPU flash-attention kernel) in fp32 (`attention_fp32`, the default) and in bf16, and
peftune's matmul path (`packed_attention: matmul`: matmul, fp32 softmax, matmul) in bf16. Each line also gives the
attention's FLOPs per second, counting the causal half only (4 · L² · heads · dim / 2 forward, twice that backward:
the flash kernel skips the masked blocks, the matmul path computes them and masks them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def timed(fn, q, k, v, grad, reps: int) -> tuple[float, float]:
    """Median forward and backward milliseconds over `reps` runs, after three warm-up runs."""
    import statistics

    for _ in range(3):
        fn(q, k, v).backward(grad)
    fwd, bwd = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn(q, k, v)
        mid = time.perf_counter()
        out.backward(grad)
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,128,192,256,384,512")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    from peftune.train.attention import _matmul_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    kernels = [("SDPA fp32", sdpa, torch.float32), ("SDPA bf16", sdpa, torch.bfloat16),
               ("matmul bf16", _matmul_attention, torch.bfloat16)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.heads} query heads, {args.kv_heads} "
          f"key/value heads, {args.dim} dims; median of {args.reps}; ms forward / backward (GFLOP/s forward / "
          f"backward, causal half)")
    print(f"{'length':>7}" + "".join(f"{name:>30}" for name, _, _ in kernels))
    torch.manual_seed(0)
    for length in (int(x) for x in args.lengths.split(",")):
        flops = 4 * length * length * args.heads * args.dim / 2
        cells = []
        for _, fn, dtype in kernels:
            q = torch.randn(1, args.heads, length, args.dim, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, args.kv_heads, length, args.dim, dtype=dtype, requires_grad=True) for _ in "kv")
            grad = torch.randn(1, args.heads, length, args.dim, dtype=dtype)
            fwd, bwd = timed(fn, q, k, v, grad, args.reps)
            cells.append(f"{fwd:6.2f} / {bwd:6.2f} ({flops / fwd / 1e6:3.0f} / {2 * flops / bwd / 1e6:3.0f})")
        print(f"{length:>7}" + "".join(f"{c:>30}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
