"""One decode step of the embedded model with a LoRA adapter (r=16 on all linear layers, the demo's shape), through
transformers' forward with the LoRA bank's hooks and through the lean decoder (infer/fast.py), for 1 and 8 rows
(8: two adapters, rows sorted by adapter), per weight format. The median of 15 steps after 64 prompt tokens.

    .venv/bin/python benchmarks/decoder.py           # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@torch.inference_mode()
def transformers_step(model, bank, names: list[str]) -> float:
    from transformers import DynamicCache

    rows = len(names)
    with bank.rows(names):
        out = model(input_ids=torch.ones((rows, 64), dtype=torch.long), cache=DynamicCache(), use_cache=True,
                    logits_to_keep=1)
    cache, mask, times = out.cache, torch.ones((rows, 64), dtype=torch.long), []
    for i in range(15):
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
        start = time.perf_counter()
        with bank.rows(names):
            out = model(input_ids=torch.ones((rows, 1), dtype=torch.long), cache=cache, use_cache=True,
                        logits_to_keep=1, attention_mask=mask, position_ids=torch.full((rows, 1), 64 + i))
        cache = out.cache
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


@torch.inference_mode()
def lean_step(decoder, bank, names: list[str]) -> float:
    state = None
    for name in names:
        with bank.rows([name]):
            kv, _ = decoder.prefill(torch.ones((1, 64), dtype=torch.long))
        state = kv if state is None else state.merge(kv)
    times = []
    for i in range(15):
        start = time.perf_counter()
        with bank.rows(names):
            decoder.step(state, torch.ones((len(names), 1), dtype=torch.long), torch.full((len(names), 1), 64 + i))
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from serve import random_adapters

    from peftune import models
    from peftune.infer.fast import FastDecoder
    from peftune.infer.lora import LoraBank
    from peftune.infer.quant import quantize

    adapters = random_adapters(models.resolve_model_path("smollm2-135m-instruct"), tempfile.mkdtemp())
    print("| weights | path | decode step, 1 row | decode step, 8 rows (2 adapters) |")
    print("|---|---|---|---|")
    for dtype in ("fp32", "int8", "auto"):
        for path in ("transformers + bank hooks", "lean decoder"):
            model = models.load_model("smollm2-135m-instruct", dtype=torch.float32).eval()
            if dtype != "fp32":
                quantize(model, dtype)
            decoder = FastDecoder(model) if path == "lean decoder" else None
            bank = LoraBank(model, groups=decoder.groups() if decoder else None)
            if decoder:
                decoder.bank = bank
            for i, adapter in enumerate(adapters):
                bank.add(f"a{i}", adapter)
            step = (lambda names: lean_step(decoder, bank, names)) if decoder else \
                (lambda names: transformers_step(model, bank, names))
            print(f"| {dtype} | {path} | {step(['a0']):.1f} ms | {step(['a0'] * 4 + ['a1'] * 4):.1f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
