"""A lever on and off in one process, step after step: interleaved A/B timing of peftune's optimizer step.

    .venv/bin/python benchmarks/ab_step.py --recipe --precision bf16 --rows 16 --lever fused_norm --rounds 4

On a shared host the speed of separate runs moves by 10-30 % from one minute to the next (docs/speed.md), more than
one lever changes; here both variants run in the same process on the same batches, alternating (off, on, on, off,
...), so the host's drift falls on both. The levers that can be switched on a built model: `fused_norm`,
`fused_rotary` and `fused_lora` (each module's class swapped back and forth), `attention_fp32` (the attention function
re-registered), `matmul_attention` (the configured attention against `packed_attention: matmul` with
`attention_fp32: false`), `mmap_threshold=MB` (release_memory's 1 MB threshold as "on" against the one given as "off").
Prints each step's time, the medians and the median of the pairwise differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import profile_step  # noqa: E402  (benchmarks/profile_step.py: the same model, data and step)


def toggles(loss_model, lever: str, cfg):
    """(off, on): functions that put the lever's variant in place on the built model (profile_step.build applied the
    configured speed-ups, so the lever's modules are found whichever way it was set)."""
    peft_model = loss_model.module
    if lever in ("fused_norm", "fused_rotary"):
        from peftune.train.norm_fused import FusedRMSNormMixin, use_fused_norms
        from peftune.train.rotary_fused import FusedRotaryAttentionMixin, use_fused_rotary
        from peftune.train.swap import mixed, unmixed

        use, mixin, prefix = ((use_fused_norms, FusedRMSNormMixin, "Fused") if lever == "fused_norm" else
                              (use_fused_rotary, FusedRotaryAttentionMixin, "FusedRotary"))
        use(peft_model)  # a no-op where profile_step.build swapped them already
        plain = {m: unmixed(m, mixin) for m in peft_model.modules() if isinstance(m, mixin)}

        def set_class(on: bool):
            for m, cls in plain.items():
                m.__class__ = mixed(mixin, cls, prefix) if on else cls
    elif lever == "fused_lora":
        from peft.tuners.lora import Linear as LoraLinear

        from peftune.train.lora_fused import FusedLoraLinear

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]

        def set_class(on: bool):
            for m in layers:
                m.__class__ = FusedLoraLinear if on else LoraLinear
    elif lever == "attention_fp32":
        from peftune.train.attention import use_packed_attention

        def set_class(on: bool):
            use_packed_attention(peft_model.get_base_model(), cfg.packed_attention, on)
    elif lever == "matmul_attention":
        # off: the configured attention (packed_attention, attention_fp32); on: matmul kernel in the autocast dtype
        from peftune.train.attention import use_packed_attention

        def set_class(on: bool):
            use_packed_attention(peft_model.get_base_model(), "matmul" if on else cfg.packed_attention,
                                 False if on else cfg.attention_fp32)
    elif lever.startswith("mmap_threshold="):
        # release_memory's fixed glibc mmap threshold (1 MB) on, against the threshold given (MB), e.g. 32: glibc's
        # largest dynamic one; mallopt takes effect for the allocations after it
        from peftune.train.guards import return_large_buffers_to_os

        other = int(float(lever.split("=", 1)[1]) * 2**20)

        def set_class(on: bool):
            return_large_buffers_to_os(1 << 20 if on else other)
    else:
        raise SystemExit(f"ab_step.py: --lever {lever}: not one of fused_norm, fused_rotary, fused_lora, "
                         "attention_fp32, matmul_attention, mmap_threshold=MB")
    return (lambda: set_class(False)), (lambda: set_class(True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=os.path.join(profile_step.ROOT, "data", "alpaca_en_demo.json"))
    p.add_argument("--recipe", action="store_true", help="the alpaca-lora recipe's LoRA and cutoff")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--lever", required=True,
                   help="fused_norm, fused_rotary, fused_lora, attention_fp32, matmul_attention or mmap_threshold=MB")
    p.add_argument("--rounds", type=int, default=4, help="pairs of steps (each variant once per round)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE: a TrainConfig field")
    args = p.parse_args()
    args.device, args.random_weights = "cpu", False
    cfg, model, optimizer, step_batches, collate = profile_step.build(args)
    off, on = toggles(model, args.lever, cfg)
    tokens = sum(len(s["input_ids"]) for s in sum(step_batches, []))
    step = lambda: profile_step.one_step(model, optimizer, step_batches, collate,  # noqa: E731
                                         precision=args.precision)
    for variant in (off, on):  # one warm-up step each
        variant()
        step()
    times = {"off": [], "on": []}
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for name in order:
            (off if name == "off" else on)()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(f"{args.lever}: {tokens} tokens a step, {args.rounds} rounds (off/on alternating), s/step:")
    for name in ("off", "on"):
        print(f"  {name:>3}: {' '.join(f'{t:.3f}' for t in times[name])}  median {statistics.median(times[name]):.3f}"
              f" ({tokens / statistics.median(times[name]):.0f} tokens/s)")
    diffs = [b - a for a, b in zip(times["off"], times["on"])]
    print(f"  on - off per round: {' '.join(f'{d:+.3f}' for d in diffs)}  median {statistics.median(diffs):+.3f} s")


if __name__ == "__main__":
    main()
