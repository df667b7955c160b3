"""Speed comparison: the alpaca-lora recipe vs peftune, same model, same rows, one invocation.

    .venv/bin/python benchmarks/speed.py            # 39 minutes for the three runs on a 2-core AVX2 CPU
    .venv/bin/python benchmarks/speed.py --train_rows 64 --val_rows 16   # a quicker look
    .venv/bin/python benchmarks/speed.py --set torch_compile=true        # a TrainConfig field for peftune's arm

Three runs: (1) the recipe's own settings (train_on_inputs true) and (2) peftune's default masking
(train_on_inputs false), each with the recipe's LoRA (r=8, alpha=16, dropout 0.05 on q_proj,v_proj),
cutoff 256, micro batch 4, batch 16; (3) the demo's LoRA (r=16, alpha=32, all linear layers, cutoff 384,
micro batch 4, batch 8, response only) for both arms. Each is one epoch over the same rows. Each arm runs in its own process; it
reports real (non-padding) tokens/s, the padding share, its peak RSS, and the validation loss on the same
held-out rows, computed by one shared evaluator (fp32, token-weighted). Also: peftune's model FLOPs
utilisation against the matmul peak measured in this run (4 x parameters FLOPs per token for a LoRA step), the
speed those FLOPs allow at that peak with nothing else (bound), and the MFU that 3x the recipe's speed asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATE = os.path.join(ROOT, "src", "peftune", "data", "templates", "alpaca.json")


def finish_arm(model, spec: dict, result: dict) -> None:
    """Shared by both arms: peak RSS of the training, validation loss on the held-out rows (fp32), result file."""
    import torch

    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    from peftune import models
    from peftune.data.batching import collate_packed
    from peftune.data.render import Renderer, get_template
    from peftune.data.sources import load_rows
    from peftune.train.recipe import evaluate

    tok = models.load_tokenizer(spec["model_dir"])
    renderer = Renderer(tok, get_template("alpaca", tok), spec["cutoff_len"], spec["train_on_inputs"])
    val = renderer.render_all(load_rows([spec["val_data"]]), warn=lambda m: None)
    model = model.float()
    with torch.autocast("cpu", enabled=False):
        result["val_loss"] = evaluate(model, val, 4, collate_packed)
    with open(spec["result"], "w") as fh:
        json.dump(result, fh)


def peftune_arm(spec: dict) -> None:
    from peftune.config import TrainConfig
    from peftune.train import recipe

    fields = dict(base_model=spec["model_dir"], data_path=[spec["data"]], output_dir=spec["output_dir"],
                  overwrite_output_dir=True, prompt_template="alpaca", cutoff_len=spec["cutoff_len"],
                  train_on_inputs=spec["train_on_inputs"], val_set_size=0, batch_size=spec["batch_size"],
                  micro_batch_size=spec["micro_batch_size"], num_epochs=1, learning_rate=spec["learning_rate"],
                  lr_scheduler="linear", warmup_steps=spec["warmup_steps"], lora_r=spec["lora"]["r"],
                  lora_alpha=spec["lora"]["alpha"], lora_dropout=0.05, lora_target_modules=spec["lora"]["targets"],
                  seed=spec["seed"], logging_steps=1000)
    cfg = TrainConfig(**{**fields, **spec["settings"]})  # --set overrides these (e.g. logging_steps=1)
    out = recipe.train(cfg, say=lambda m: None)
    result = {"real_tokens": out["tokens"], "padded_tokens": out["tokens"], "train_time_s": out["train_time_s"],
              "precision": out["precision"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    from peft import PeftModel

    from peftune import models

    model = PeftModel.from_pretrained(models.load_model(spec["model_dir"]), spec["output_dir"])
    finish_arm(model, spec, result)


def matmul_peak(dtype_name: str, seconds: float = 3.0) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def run_arm(arm: str, spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([HERE, os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    path = os.path.join(spec["workdir"], f"{arm}-{spec['run']}.json")
    with open(path, "w") as fh:
        json.dump(spec, fh)
    script = os.path.join(HERE, "alpaca_lora_recipe.py") if arm == "recipe" else os.path.abspath(__file__)
    cmd = [sys.executable, script, path] if arm == "recipe" else [sys.executable, script, "--arm", path]
    log = os.path.join(spec["workdir"], f"{arm}-{spec['run']}.log")
    with open(log, "w") as fh:
        if subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"the {arm} arm failed; its output is in {log}")
    with open(spec["result"]) as fh:
        return json.load(fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "alpaca_en_demo.json"))
    p.add_argument("--train_rows", type=int, default=128)
    p.add_argument("--val_rows", type=int, default=48)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--runs", default="1,2,3", help="which runs, e.g. 3 for the demo's settings alone")
    p.add_argument("--set", action="append", default=[],
                   help="KEY=VALUE: a TrainConfig field for peftune's arm (a lever; its cost, e.g. compiling, counts)")
    args = p.parse_args()
    if args.arm:
        with open(args.arm) as fh:
            peftune_arm(json.load(fh))
        return

    sys.path.insert(0, os.path.join(ROOT, "src"))
    import torch

    from profile_step import parse_settings  # this folder is on sys.path when the script runs

    settings = parse_settings(args.set)

    from peftune import models

    model_dir = models.resolve_model_path(args.model)
    rows = json.load(open(args.data, encoding="utf-8"))
    work = tempfile.mkdtemp(prefix="peftune-bench-")
    train_path, val_path = os.path.join(work, "train.json"), os.path.join(work, "val.json")
    json.dump(rows[: args.train_rows], open(train_path, "w"), ensure_ascii=False)
    json.dump(rows[-args.val_rows:], open(val_path, "w"), ensure_ascii=False)
    peak = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16")}
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak fp32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bfloat16']:.0f} GFLOP/s")
    print(f"model: {args.model} ({params / 1e6:.1f} M parameters); {args.train_rows} training rows, "
          f"{args.val_rows} held-out rows of {os.path.basename(args.data)}; peftune's settings: "
          f"{' '.join(args.set) or 'defaults'}\n")
    header = f"{'run':<34}{'arm':<10}{'real tok/s':>11}{'padding':>9}{'peak RSS':>11}{'val loss':>10}"
    print(header)
    print("-" * len(header))
    recipe_lora = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
    runs = {1: ("1 recipe (train_on_inputs)", True, recipe_lora, 256, 16),
            2: ("2 response-only loss", False, recipe_lora, 256, 16),
            3: ("3 demo LoRA (r16 all-lin, 384)", False,
                {"r": 16, "alpha": 32, "targets": ["all-linear"]}, 384, 8)}
    for run in [int(r) for r in args.runs.split(",")]:
        label, train_on_inputs, lora, cutoff, batch = runs[run]
        results = {}
        for arm in ("recipe", "peftune"):
            spec = {"model_dir": model_dir, "data": train_path, "val_data": val_path, "template": TEMPLATE,
                    "cutoff_len": cutoff, "micro_batch_size": 4, "batch_size": batch, "learning_rate": 3e-4,
                    "warmup_steps": 2, "seed": 42, "train_on_inputs": train_on_inputs, "workdir": work,
                    "lora": lora, "run": run, "output_dir": os.path.join(work, f"out-{arm}-{run}"),
                    "result": os.path.join(work, f"result-{arm}-{run}.json"), "settings": settings}
            r = run_arm(arm, spec)
            r["tok_s"] = r["real_tokens"] / r["train_time_s"]
            r["padding"] = 1 - r["real_tokens"] / r["padded_tokens"]
            results[arm] = r
            print(f"{label:<34}{arm:<10}{r['tok_s']:>11.1f}{100 * r['padding']:>8.1f}%{r['peak_rss_mb']:>8.0f} MB"
                  f"{r['val_loss']:>10.4f}", flush=True)
        base, ours = results["recipe"], results["peftune"]
        flops = 4 * params * ours["tok_s"]
        used_peak = peak["bfloat16"] if ours.get("precision") == "bf16" else peak["float32"]
        print(f"{'':<34}{'ratio':<10}{ours['tok_s'] / base['tok_s']:>10.2f}x{'':>9}"
              f"{ours['peak_rss_mb'] / base['peak_rss_mb']:>10.2f}x{ours['val_loss'] / base['val_loss']:>9.4f}x")
        print(f"{'':<34}peftune ({ours.get('precision')}): {flops / 1e9:.0f} GFLOP/s = MFU "
              f"{100 * flops / 1e9 / used_peak:.0f} % of the {'bf16' if used_peak == peak['bfloat16'] else 'fp32'}"
              f" matmul peak", flush=True)
        # what a target ratio asks of this machine: the matmuls alone at the measured peak bound the speed
        bound = used_peak * 1e9 / (4 * params)
        print(f"{'':<34}bound: {bound:.0f} tok/s with nothing but the matmuls at that peak "
              f"({bound / base['tok_s']:.2f}x the recipe); 3x the recipe needs MFU "
              f"{100 * 3 * base['tok_s'] / bound:.0f} %\n", flush=True)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


if __name__ == "__main__":
    main()
