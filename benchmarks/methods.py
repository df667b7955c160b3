"""Every peft_method on the embedded model and the identity demo data: one command, one table.

    .venv/bin/python benchmarks/methods.py                      # all rows, about 45 minutes on a 2-core CPU
    .venv/bin/python benchmarks/methods.py --only lora,ia3 --max_steps 5   # a quick look

Each method trains in its own process with examples/identity.yaml (identity rows x5 + English and Chinese
alpaca rows, name Aurora, maker Lumen Labs), the same seed, the same `--max_steps` optimizer steps of 8 samples
(so every method sees the same examples in the same order) and its own default learning rate. Reported per
method: trainable parameters, adapter size on disk, training tokens/s, validation loss on the same 16 held-out
rows, and greedy answers to one identity question and one general-knowledge question (has the method learned
the new name; has it kept what the base knew). `--write` puts the table into docs/methods.md and
docs/methods.zh-CN.md between their `<!-- table -->` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "examples", "identity.yaml")
QUESTIONS = ("Who are you?", "What is the capital of France?")

# name: (options on top of examples/identity.yaml, what it is)
METHODS = {
    "base": (None, "no adapter: the base model"),
    "lora": ([], "LoRA r=16, all linear layers"),
    "dora": (["--use_dora", "true"], "LoRA + DoRA"),
    "rslora": (["--use_rslora", "true"], "LoRA + rsLoRA"),
    "pissa": (["--lora_init", "pissa_niter_4"], "LoRA, PiSSA init (fast SVD)"),
    "loraplus": (["--loraplus_lr_ratio", "16"], "LoRA+ (B at 16x lr)"),
    "qlora": (["--load_in_4bit", "true"], "LoRA on a 4-bit NF4 base"),
    "adalora": (["--peft_method", "adalora"], "AdaLoRA, rank 12 pruned to 8"),
    "ia3": (["--peft_method", "ia3"], "IA3 on k, v, down"),
    "loha": (["--peft_method", "loha"], "LoHa r=16"),
    "lokr": (["--peft_method", "lokr"], "LoKr r=16"),
    "prefix_tuning": (["--peft_method", "prefix_tuning"], "prefix tuning, 20 tokens from text"),
    "prefix_random": (["--peft_method", "prefix_tuning", "--prefix_init_text", ""], "prefix tuning, random init"),
    "prompt_tuning": (["--peft_method", "prompt_tuning"], "prompt tuning, 20 tokens"),
    "p_tuning": (["--peft_method", "p_tuning"], "P-tuning, 20 tokens, MLP"),
}


def run_one(name: str, max_steps: int, out: str) -> dict:
    """In a fresh process: train, then answer QUESTIONS with the adapter."""
    from peftune.options import load_config, parse_overrides
    from peftune.infer.chat import Chat
    from peftune.methods import learning_rate
    from peftune.train.recipe import train

    if METHODS[name][0] is None:
        return run_base(max_steps)
    extra = list(METHODS[name][0])
    overrides = parse_overrides(["--output_dir", out, "--overwrite_output_dir", "true", "--max_steps", str(max_steps),
                                 "--eval_steps", str(max_steps), "--save_steps", "0", "--learning_rate", "none",
                                 *extra])
    cfg = load_config(CONFIG, overrides)  # its LoRA keys equal the defaults, so other methods accept them
    result = train(cfg, say=lambda *a: None)
    chat = Chat(out)
    answers = [chat.answer([{"role": "user", "content": q}], max_new_tokens=40, repetition_penalty=1.1)
               for q in QUESTIONS]
    return {"name": name, "what": METHODS[name][1], "learning_rate": learning_rate(cfg),
            "trainable": result["trainable_parameters"], "adapter_bytes": result["adapter_bytes"],
            "tokens_per_s": result["tokens_per_s"], "eval_loss": result["eval_loss"], "answers": answers,
            "examples": max_steps * cfg.batch_size}


def run_base(max_steps: int) -> dict:
    """The reference row: the base model's validation loss on the same held-out rows, and its answers."""
    from peftune import models
    from peftune.options import load_config
    from peftune.data.batching import collate_padded
    from peftune.infer.chat import Chat
    from peftune.train.recipe import evaluate, prepare_data

    cfg = load_config(CONFIG, {})
    tokenizer, _, val_set = prepare_data(cfg, say=lambda *a: None)
    model = models.load_model(cfg.base_model)
    eval_loss = evaluate(model, val_set, cfg.micro_batch_size, lambda c: collate_padded(c, tokenizer.pad_token_id))
    chat = Chat(None, cfg.base_model)
    answers = [chat.answer([{"role": "user", "content": q}], max_new_tokens=40, repetition_penalty=1.1)
               for q in QUESTIONS]
    return {"name": "base", "what": METHODS["base"][1], "eval_loss": eval_loss, "answers": answers,
            "examples": max_steps * cfg.batch_size}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}"


HEADERS = {"en": ["method", "learning rate", "trainable params", "adapter on disk", "tokens/s", "val loss",
                  f"“{QUESTIONS[0]}”", f"“{QUESTIONS[1]}”"],
           "zh": ["方法", "学习率", "可训练参数", "适配器大小", "tokens/s", "验证损失",
                  f"“{QUESTIONS[0]}”", f"“{QUESTIONS[1]}”"]}


def table(rows: list[dict], lang: str) -> str:
    from peftune.adapters import human_bytes

    def cell(text: str) -> str:
        text = " ".join(text.split()).replace("|", "/")
        return text if len(text) <= 90 else text[:89] + "…"

    lines = ["| " + " | ".join(HEADERS[lang]) + " |", "|" + "---|" * len(HEADERS[lang])]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['name']}` | | | | | | {cell(r['error'])} | |")
            continue
        if "trainable" not in r:  # the base model, for reference
            lines.append(f"| {r['what']} | | | | | {r['eval_loss']:.4f} | {cell(r['answers'][0])} | "
                         f"{cell(r['answers'][1])} |")
            continue
        lines.append(f"| `{r['name']}` ({r['what']}) | {r['learning_rate']:g} | {r['trainable']:,} | "
                     f"{human_bytes(r['adapter_bytes'])} | {r['tokens_per_s']:.0f} | {r['eval_loss']:.4f} | "
                     f"{cell(r['answers'][0])} | {cell(r['answers'][1])} |")
    return "\n".join(lines)


def write_into(path: str, text: str) -> None:
    from peftune.io import atomic_write_text

    doc = open(path, encoding="utf-8").read()
    start, end = doc.index("<!-- table -->") + len("<!-- table -->"), doc.index("<!-- /table -->")
    atomic_write_text(path, doc[:start] + "\n" + text + "\n" + doc[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated method names (default: all)")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps of 8 samples (default 40)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/methods*.md")
    parser.add_argument("--results", help="also keep the raw results here (JSON lines)")
    parser.add_argument("--table_from", help="build the table from a --results file instead of training (the "
                        "last row of each method wins)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as out:
            print("RESULT " + json.dumps(run_one(args.one, args.max_steps, out), ensure_ascii=False), flush=True)
        return 0
    names = args.only.split(",") if args.only else list(METHODS)
    rows = []
    if args.table_from:
        saved = {}
        for line in open(args.table_from, encoding="utf-8"):
            row = json.loads(line)
            saved[row["name"]] = row
        rows, names = [saved[n] for n in METHODS if n in saved and n in names], []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--max_steps", str(args.max_steps)],
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"name": name, "error": f"failed: {last}"})
        else:
            rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1], ensure_ascii=False), file=sys.stderr, flush=True)
        if args.results:
            with open(args.results, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rows[-1], ensure_ascii=False) + "\n")
    note = (f"{rows[0].get('examples', args.max_steps * 8)} training examples per method "
            f"(`--max_steps {args.max_steps}`), measured on: {machine()}.")
    for lang, path in (("en", "docs/methods.md"), ("zh", "docs/methods.zh-CN.md")):
        text = table(rows, lang) + "\n\n" + note
        if args.write:
            write_into(os.path.join(ROOT, path), text)
    print(table(rows, "en") + "\n\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
