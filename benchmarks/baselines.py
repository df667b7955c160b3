"""PEFT against its baselines on the same data and steps: LoRA, `full` (every weight) and `freeze` (the last decoder
layers), each trained with the demo's settings (examples/identity.yaml) and then measured by `peftune eval`, plus
replay variants of the demo. Prints the table of docs/methods.md.

    .venv/bin/python benchmarks/baselines.py --max_steps 40             # lora, full, freeze: about 50 min on 2 cores
    .venv/bin/python benchmarks/baselines.py --arms full,freeze --reuse  # only these; finished arms are kept
    .venv/bin/python benchmarks/baselines.py --arms lora,replay          # the demo with and without replay

Per arm: trainable parameters, size on disk of what the run saves, tokens/s of training (metrics.jsonl), the
training process's peak RSS, the target gain (loss per token on the run's validation rows, base - tuned, and the
share of greedy answers that contain the reference) and forgetting (probe KL(base || tuned) per token, probe
answers unchanged, multiple-choice accuracy change) from report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ARMS = {  # name: extra `peftune train` options on top of the config
    "lora": [],
    "full": ["--peft_method", "full", "--learning_rate", "5e-5"],
    "freeze": ["--peft_method", "freeze", "--freeze_trainable_layers", "2", "--learning_rate", "1e-4"],
    "replay": ["--replay", "0.25"],
    "replay_kl": ["--replay", "0.25", "--replay_beta", "0.5"],
}
BIN = os.path.dirname(sys.executable)


def peak_rss_run(cmd: list[str], log: str) -> tuple[int, float, str]:
    """(exit status, peak RSS in MB of the command's process tree's largest process, seconds), output to log."""
    start = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        # GNU time's %M: the maximum resident set size of the command, in KB
        proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    text = open(log, encoding="utf-8").read()
    found = re.findall(r"PEAK_RSS_KB (\d+)", text)
    return proc.returncode, int(found[-1]) / 1024 if found else float("nan"), time.time() - start


def weights_bytes(run: str) -> int:
    return sum(os.path.getsize(os.path.join(run, f)) for f in os.listdir(run) if f.endswith(".safetensors"))


def arm(name: str, args) -> dict:
    run = os.path.join(args.out, name)
    report_dir = os.path.join(args.out, f"{name}-eval")
    log = os.path.join(args.out, f"{name}.train.log")
    done = os.path.isfile(os.path.join(run, "metrics.jsonl")) and os.path.isfile(os.path.join(run, "curves.png"))
    if not (args.reuse and done):
        steps = ["--max_steps", str(args.max_steps)] if args.max_steps else []
        status, rss, seconds = peak_rss_run([os.path.join(BIN, "peftune"), "train", args.config, *ARMS[name], *steps,
                                             "--output_dir", run, "--overwrite_output_dir", "true"], log)
        if status:
            raise SystemExit(f"{name}: training failed, see {log}")
        with open(os.path.join(args.out, f"{name}.rss"), "w") as fh:
            fh.write(f"{rss:.0f} {seconds:.0f}\n")
    rss, seconds = map(float, open(os.path.join(args.out, f"{name}.rss")).read().split())
    if not (args.reuse and os.path.isfile(os.path.join(report_dir, "report.json"))):
        status, _, _ = peak_rss_run([os.path.join(BIN, "peftune"), "eval", "--adapter", run, "--output_dir",
                                     report_dir, "--overwrite"], os.path.join(args.out, f"{name}.eval.log"))
        if status:
            raise SystemExit(f"{name}: eval failed, see {args.out}/{name}.eval.log")
    report = json.load(open(os.path.join(report_dir, "report.json"), encoding="utf-8"))
    last = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")][-1]
    trainable = re.search(r"trainable parameters: ([\d,]+)", open(log, encoding="utf-8").read())
    return {"name": name, "trainable": trainable.group(1) if trainable else "?", "bytes": weights_bytes(run),
            "tokens_per_s": last["tokens_per_s"], "train_s": seconds, "rss_mb": rss, "report": report}


def ci(pair: list[float], pct: bool = False) -> str:
    return f"[{pair[0] * (100 if pct else 1):+.{0 if pct else 3}f}, {pair[1] * (100 if pct else 1):+.{0 if pct else 3}f}]"


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["report"]["choice"])
    head = ("| arm | trainable params | saved on disk | tokens/s | peak RSS | target loss (base → tuned) | answers "
            "contain the reference | probe KL(base ‖ tuned) | probe answers unchanged | "
            + " | ".join(tasks) + " |")
    out = [head, "|" + "---|" * (9 + len(tasks))]
    for r in rows:
        t, p, c = r["report"]["target"], r["report"]["probe"], r["report"]["choice"]
        out.append(f"| {r['name']} | {r['trainable']} | {r['bytes'] / 2**20:.1f} MB | {r['tokens_per_s']:.0f} | "
                   f"{r['rss_mb'] / 1024:.2f} GB | {t['loss_base']:.4f} → {t['loss_tuned']:.4f} "
                   f"({t['loss_change']:+.3f} {ci(t['loss_change_95'])}) | {t['contains_base']:.0%} → "
                   f"{t['contains_tuned']:.0%} | {p['kl']:.4f} [{p['kl_95'][0]:.4f}, {p['kl_95'][1]:.4f}] | "
                   f"{p['unchanged']:.0%} | "
                   + " | ".join(f"{c[k]['acc_base']:.0%} → {c[k]['acc_tuned']:.0%}" for k in tasks) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="lora,full,freeze", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--config", default="examples/identity.yaml")
    p.add_argument("--out", default="output/baselines")
    p.add_argument("--reuse", action="store_true", help="keep arms (and reports) already finished in --out")
    p.add_argument("--max_steps", type=int, help="train every arm this many optimizer steps (default: the config's)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.arms.split(","):
        if name not in ARMS:
            raise SystemExit(f"--arms {name}: expected some of {', '.join(ARMS)}")
        rows.append(arm(name, args))
        print(f"{name}: done ({rows[-1]['train_s']:.0f} s of training)", flush=True)
    print(table(rows))
    print(f"\n{os.cpu_count()} cores; settings: {args.config}" + (f", max_steps {args.max_steps}" if args.max_steps
                                                                   else "") + " with " +
          "; ".join(f"{n}: {' '.join(ARMS[n]) or 'as written'}" for n in args.arms.split(",")))


if __name__ == "__main__":
    main()
