"""What `--dtype` costs in quality and buys in speed: the embedded model's loss per token on alpaca rows, greedy
answers against fp32's, and one decode step's time at 1 and 8 rows, for fp32, bf16 and int8 (weight-only).

    .venv/bin/python benchmarks/dtypes.py            # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import json
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "Who wrote Romeo and Juliet?", "Give three tips for staying healthy.",
             "你是谁？", "Explain photosynthesis in one sentence.", "What is 12 times 12?"]


def load(dtype: str):
    from peftune import models
    from peftune.infer.quant import quantize

    model = models.load_model("smollm2-135m-instruct", dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    if dtype == "int8":
        quantize(model, "int8")
    return model.eval()


@torch.inference_mode()
def loss_per_token(model, tok, rows: list[dict]) -> float:
    total = count = 0.0
    for r in rows:
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        text = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}],
                                       tokenize=False)
        ids = tok(text, return_tensors="pt").input_ids[:, :256]
        total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


@torch.inference_mode()
def greedy(model, tok) -> list[str]:
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        out.append(tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@torch.inference_mode()
def step_ms(model, rows: int) -> float:
    from transformers import DynamicCache

    out = model(input_ids=torch.ones((rows, 64), dtype=torch.long), cache=DynamicCache(), use_cache=True,
                logits_to_keep=1)
    cache, times = out.cache, []
    for i in range(12):
        start = time.perf_counter()
        out = model(input_ids=torch.ones((rows, 1), dtype=torch.long), cache=cache, use_cache=True, logits_to_keep=1,
                    position_ids=torch.full((rows, 1), 64 + i))
        cache = out.cache
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftune import models

    tok = models.load_tokenizer("smollm2-135m-instruct")
    with open(os.path.join(ROOT, "data", "alpaca_en_demo.json"), encoding="utf-8") as fh:
        rows = json.load(fh)[:40]
    reference = None
    print("| dtype | loss per token (40 alpaca rows) | greedy answers equal to fp32's | decode step, 1 row | "
          "decode step, 8 rows |")
    print("|---|---|---|---|---|")
    for dtype in ("fp32", "bf16", "int8"):
        model = load(dtype)
        answers = greedy(model, tok)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        print(f"| {dtype} | {loss_per_token(model, tok, rows):.4f} | {same} of {len(QUESTIONS)} | "
              f"{step_ms(model, 1):.1f} ms | {step_ms(model, 8):.1f} ms |", flush=True)
        del model


if __name__ == "__main__":
    main()
