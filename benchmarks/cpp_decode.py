"""One llama.cpp decode step of the embedded model (its Q4_1 GGUF) through peftune's llama.cpp engine (infer/cpp.py):
1 and 4 rows, without an adapter and with a LoRA adapter of the demo's shape (r=16 on all linear layers).

    .venv/bin/python benchmarks/cpp_decode.py          # about a minute

Shows how llama.cpp's decode time grows with the rows of a batch on this CPU, what an adapter adds to a step, and
how a step's time grows with the cells other sequences hold in the unified cache.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from serve import random_adapters
    from transformers import AutoConfig

    from peftune import models
    from peftune.infer.cpp import CppRunner, lora_gguf

    base_dir = models.resolve_model_path("smollm2-135m-instruct")
    adapter = random_adapters(base_dir, tempfile.mkdtemp(prefix="peftune-bench-"))[0]
    runner = CppRunner(models.embedded_gguf(), max_seqs=4, seq_len=512)
    runner.add("a", lora_gguf(adapter, AutoConfig.from_pretrained(base_dir)))
    prompt = list(range(1000, 1040))
    print("| adapter | rows | decode step (median of 30) | per row |")
    print("|---|---|---|---|")
    for name in (None, "a"):
        for rows in (1, 4):
            states = [runner.prefill(name, prompt + [i])[0] for i in range(rows)]
            state = states[0]
            for other in states[1:]:
                state = state.merge(other)
            times = []
            for step in range(30):
                ids = torch.full((rows, 1), 1000 + step)
                positions = torch.full((rows, 1), len(prompt) + 1 + step)
                start = time.perf_counter()
                runner.decode(name, state, ids, positions)
                times.append(time.perf_counter() - start)
            state.keep([])
            ms = statistics.median(times) * 1000
            print(f"| {'LoRA r=16' if name else 'none'} | {rows} | {ms:.1f} ms | {ms / rows:.1f} ms |")
    runner.close()
    print()
    occupied_cells()
    print(f"\n{os.cpu_count()} cores, llama.cpp threads: {torch.get_num_threads()}")


def occupied_cells() -> None:
    """One row's decode step against how far into llama.cpp's unified cache other sequences' cells reach: every row
    attends over all cells up to the highest one in use (masked, but computed), so a step's cost grows with what
    the other requests hold, not with the row's own length."""
    from peftune import models
    from peftune.infer.cpp import CppRunner

    runner = CppRunner(models.embedded_gguf(), max_seqs=8, seq_len=4096)
    prompt = list(range(1000, 1040))

    def step_ms() -> float:
        state = runner.prefill(None, prompt + [7])[0]
        times = []
        for step in range(20):
            start = time.perf_counter()
            runner.decode(None, state, torch.full((1, 1), 1000 + step), torch.full((1, 1), len(prompt) + 1 + step))
            times.append(time.perf_counter() - start)
        state.keep([])
        return statistics.median(times) * 1000

    print("| another sequence's cells reach | one row's decode step (median of 20) |")
    print("|---|---|")
    print(f"| (empty cache) | {step_ms():.1f} ms |")
    for filler in (1000, 3000, 6000):
        big = runner.prefill(None, list(range(2000, 2000 + filler)))[0]
        small = runner.prefill(None, list(range(3000, 3050)))[0]  # held after the filler's cells
        big.keep([])
        print(f"| cell ~{filler + 50} | {step_ms():.1f} ms |")
        small.keep([])
    runner.close()


if __name__ == "__main__":
    main()
