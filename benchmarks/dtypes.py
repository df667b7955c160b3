"""What `--dtype` costs in quality and buys in speed: the embedded model's loss per token on alpaca rows, greedy
answers against fp32's, and one decode step's time at 1 and 8 rows through the engine's lean decoder (fast.py;
the median of 12 steps), for fp32, bf16, int8, int4 (all layers rounded to 4 bits) and auto (what `--dtype auto`
picks on a CPU: the embedded model's 4-bit layers stay 4-bit, its output layer int8).

    .venv/bin/python benchmarks/dtypes.py            # about 3 minutes on a 2-core CPU
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

    model = models.load_model("smollm2-135m-instruct", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    if dtype in ("int8", "int4", "auto"):
        quantize(model, dtype)
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
    from peftune.infer.fast import FastDecoder

    decoder = FastDecoder(model)
    state = None
    for _ in range(rows):
        kv, _ = decoder.prefill(torch.ones((1, 64), dtype=torch.long))
        state = kv if state is None else state.merge(kv)
    times = []
    for i in range(12):
        start = time.perf_counter()
        decoder.step(state, torch.ones((rows, 1), dtype=torch.long), torch.full((rows, 1), 64 + i))
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
    for dtype in ("fp32", "bf16", "int8", "int4", "auto"):
        model = load(dtype)
        answers = greedy(model, tok)
        reference = reference or answers
        same = sum(a == b for a, b in zip(answers, reference))
        print(f"| {dtype} | {loss_per_token(model, tok, rows):.4f} | {same} of {len(QUESTIONS)} | "
              f"{step_ms(model, 1):.1f} ms | {step_ms(model, 8):.1f} ms |", flush=True)
        del model


if __name__ == "__main__":
    main()
