"""Training tokens/s and memory on one machine: 1 process with all threads against N processes (DDP over gloo, one
thread each on a CPU) and N processes under FSDP (examples/accelerate/fsdp2.yaml through `accelerate launch`), the
same run otherwise: the embedded model, the demo's LoRA (r=16 on all linear layers), the alpaca demo rows, batch 8 in
micro-batches of 2, fp32, the first `--max_steps` steps.

    .venv/bin/python benchmarks/distributed.py                 # about 6 minutes on a 2-core CPU
    .venv/bin/python benchmarks/distributed.py --processes 4 --max_steps 12

Prints, per arm, tokens/s as `peftune train` reports them (training alone, evaluation left out), the final
validation loss, the peak RSS of the largest process (a launcher's workers included) and the wall time of the
command (loading and launching included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# run in a fresh process per arm: its children's peak RSS is then this arm's (the largest of its processes)
MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def run(out: str, processes: int, threads: int, max_steps: int, fsdp: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    if fsdp:
        launch = ["-m", "accelerate.commands.launch", "--config_file",
                  os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml"), "--num_processes", str(processes)]
    else:
        launch = []
    cmd = [sys.executable, "-c", MEASURE, sys.executable, *launch, "-m", "peftune.cli", "train",
           "--data_path", os.path.join(ROOT, "data", "alpaca_en_demo.json"), "--output_dir", out, "--max_steps", str(max_steps), "--batch_size", "8", "--micro_batch_size", "2",
           "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all-linear", "--cutoff_len", "384",
           "--val_set_size", "16", "--eval_steps", str(max_steps), "--mixed_precision", "no",
           "--save_steps", "0", *([] if fsdp else ["--num_processes", str(processes)])]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    return {"tokens_per_s": last["tokens_per_s"], "eval_loss": last.get("eval_loss"), "wall_s": wall,
            "rss_mb": int(done.stdout.split()[-1]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max_steps", type=int, default=8)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.processes)
    arms = [("", 1, cores, False), ("DDP", args.processes, threads, False), ("FSDP", args.processes, threads, True)]
    print("| processes x threads | tokens/s | final eval_loss | peak RSS (largest process) | wall (with loading) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, processes, threads, fsdp in arms:
            r = run(os.path.join(tmp, f"{label}{processes}"), processes, threads, args.max_steps, fsdp)
            print(f"| {processes} x {threads} {label} | {r['tokens_per_s']:.1f} | {r['eval_loss']:.4f} | "
                  f"{r['rss_mb']:.0f} MB | {r['wall_s']:.0f} s |", flush=True)
    print(f"{os.uname().machine}, {cores} cores")


if __name__ == "__main__":
    main()
