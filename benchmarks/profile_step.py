"""Where a training step's time goes: torch.profiler over peftune's own step (accumulate_step), split into matmuls,
attention, loss, casts/copies, elementwise, optimizer, and what no operator accounts for (Python, dispatch).

    .venv/bin/python benchmarks/profile_step.py                     # the demo's LoRA (r=16, all linear, cutoff 384)
    .venv/bin/python benchmarks/profile_step.py --recipe            # the alpaca-lora recipe's LoRA (r=8, q_proj,v_proj)
    .venv/bin/python benchmarks/profile_step.py --set fuse_projections=true   # a TrainConfig field, for a lever
    .venv/bin/python benchmarks/profile_step.py --precision bf16    # under bf16 autocast, as training runs there
    python benchmarks/profile_step.py --device cuda --random_weights --model DIR --precision bf16   # on a GPU

`--random_weights` builds the model from its config alone (same shapes and operators, so the same speed): for a
machine the weights cannot be carried to. DIR is then a folder with config.json and the tokenizer's files.

The rows are the first micro-batch's worth of the demo data (alpaca_en_demo.json), rendered as training renders
them; the step is one optimizer step (forward, backward, AdamW) timed after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

CATEGORIES = (  # (category, substrings of aten op names); first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("loss/softmax", ("softmax", "nll_loss", "cross_entropy", "kl_div")),
    ("casts/copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat",
                      "aten::index", "aten::masked", "aten::slice_backward", "aten::empty", "aten::zeros",
                      "aten::fill_", "aten::zero_", "aten::new_", "aten::resize")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::rsqrt",
                     "aten::mean", "aten::neg", "aten::sum", "dropout", "bernoulli", "aten::embedding", "aten::sqrt",
                     "aten::where", "aten::threshold", "aten::sigmoid", "aten::exp", "aten::log")),
)


OPTIMIZER = "peftune: optimizer step"


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other ops"


def parse_settings(items: list[str]) -> dict:
    """`--set KEY=VALUE` items as TrainConfig fields: JSON for numbers, booleans and lists, else the string
    (benchmarks/speed.py reads its `--set` the same way)."""
    fields = {}
    for item in items:
        key, value = item.split("=", 1)
        fields[key] = json.loads(value) if value[:1] in "[{0123456789-tf" and value not in ("-",) else value
    return fields


def build(args):
    import torch

    from peftune import models
    from peftune.config import TrainConfig
    from peftune.data.batching import collate_packed
    from peftune.data.render import Renderer, get_template
    from peftune.data.sources import load_rows
    from peftune import methods
    from peftune.train.attention import use_packed_attention
    from peftune.train.loss import LossModel
    from peftune.train.recipe import apply_speedups

    fields = dict(base_model=args.model, data_path=[args.data], prompt_template="alpaca", lora_dropout=0.05)
    if args.recipe:
        fields.update(lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], cutoff_len=256,
                      train_on_inputs=True)
    else:
        fields.update(lora_r=16, lora_alpha=32, lora_target_modules=["all-linear"], cutoff_len=384)
    fields.update(parse_settings(args.set))
    cfg = TrainConfig(**fields)
    cfg.validate()
    if cfg.release_memory:  # as recipe.train does on a CPU
        from peftune.train.guards import return_large_buffers_to_os

        return_large_buffers_to_os()
    torch.manual_seed(0)
    tok = models.load_tokenizer(cfg.base_model)
    renderer = Renderer(tok, get_template(cfg.prompt_template, tok), cfg.cutoff_len, cfg.train_on_inputs)
    samples = renderer.render_all(load_rows([args.data])[: args.rows], warn=lambda m: None)
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(models.resolve_model_path(cfg.base_model))
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        base = models.load_model(cfg.base_model)
    base.to(args.device)
    use_packed_attention(base, cfg.packed_attention, cfg.attention_fp32)
    adapter = methods.Adapter(cfg, 100, models.resolve_model_path(cfg.base_model), tok)
    model = adapter.attach(base)
    apply_speedups(cfg, model, args.device, args.precision)
    model.train()
    optimizer = adapter.optimizer(model, 1e-4)
    step_batches = [samples[i:i + args.micro_batch_size] for i in range(0, len(samples), args.micro_batch_size)]
    collate = lambda mb: {k: v.to(args.device) for k, v in collate_packed(mb).items()}  # noqa: E731
    return cfg, LossModel(model, fused_loss=cfg.fused_loss), optimizer, step_batches, collate


def sync(device: str) -> None:
    """Waits for the device's queued kernels, so that a clock read after it counts them."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def one_step(model, optimizer, step_batches, collate, beta=0.0, precision="no", device="cpu"):
    from peftune.train.loss import accumulate_step

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    context = (lambda: torch.autocast(device, dtype=dtype)) if dtype else None
    loss, tokens = accumulate_step(model, step_batches, collate, lambda x: x.backward(), context, beta=beta)
    with torch.profiler.record_function(OPTIMIZER):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "alpaca_en_demo.json"))
    p.add_argument("--recipe", action="store_true", help="the alpaca-lora recipe's LoRA and cutoff")
    p.add_argument("--rows", type=int, default=8, help="rows in the profiled optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"),
                   help="autocast dtype of the step (training's mixed_precision; bf16 is slow without AVX512-BF16)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--random_weights", action="store_true", help="the model's config with random weights")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE: a TrainConfig field (a lever to try)")
    p.add_argument("--top", type=int, default=12, help="operators listed")
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    cfg, model, optimizer, step_batches, collate = build(args)
    tokens = sum(len(s["input_ids"]) for s in sum(step_batches, []))
    step = lambda: one_step(model, optimizer, step_batches, collate, precision=args.precision,  # noqa: E731
                            device=args.device)
    warm, losses = [], []  # the first steps' times: with torch_compile, they include compiling
    for _ in range(args.warmup):
        start = time.perf_counter()
        losses.append(step())
        sync(args.device)
        warm.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    plain = (time.perf_counter() - start) / args.steps
    gpu = args.device == "cuda"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; LoRA r={cfg.lora_r} on "
          f"{','.join(cfg.lora_target_modules)}, {len(sum(step_batches, []))} rows in micro-batches of "
          f"{args.micro_batch_size}, {tokens} tokens per step; precision {args.precision}; settings: "
          f"{' '.join(args.set) or 'defaults'}")
    print(f"warm-up steps: {', '.join(f'{w:.1f}' for w in warm)} s; their losses (a lever that changes no "
          f"numbers leaves them as they are): {', '.join(f'{x:.6f}' for x in losses)}")
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if gpu else ""
    print(f"step: {plain:.3f} s unprofiled ({tokens / plain:.0f} tokens/s){peak}")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        wall = (time.perf_counter() - start) / args.steps
    # each operator's own time, by kind: on a CPU its CPU time, on a GPU the time of the kernels it launched;
    # everything under the optimizer step is "optimizer"
    # (operators only: a kernel's own event would count its time twice)
    from torch.autograd import DeviceType

    def own(ev) -> float:
        if ev.device_type != DeviceType.CPU:
            return 0.0
        return ev.self_device_time_total if gpu else ev.self_cpu_time_total

    split: dict[str, float] = {}
    for ev in prof.events():
        if own(ev) <= 0 or ev.name == OPTIMIZER:
            continue
        parent, cat = ev.cpu_parent, None
        while parent is not None:
            if parent.name == OPTIMIZER:
                cat = "optimizer (AdamW step)"
            parent = parent.cpu_parent
        cat = cat or category(ev.name)
        split[cat] = split.get(cat, 0.0) + own(ev) / 1e6 / args.steps
    ops = [(own(ev) / 1e6 / args.steps, ev.count // args.steps, ev.key)
           for ev in prof.key_averages() if own(ev) > 0 and ev.key != OPTIMIZER]
    idle = "GPU idle (launches, Python)" if gpu else "Python/dispatch (no operator)"
    split[idle] = max(wall - sum(split.values()), 0.0)
    print(f"profiled step: {wall:.3f} s\n")
    print(f"{'where (GPU kernel time)' if gpu else 'where':<32}{'s/step':>8}{'share':>8}")
    for cat, sec in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<32}{sec:>8.3f}{100 * sec / wall:>7.1f}%")
    print(f"\n{'top operators (self time)':<48}{'s/step':>8}{'calls':>7}")
    for sec, count, name in sorted(ops, reverse=True)[: args.top]:
        print(f"{name[:47]:<48}{sec:>8.3f}{count:>7}")


if __name__ == "__main__":
    main()
