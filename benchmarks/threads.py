"""Why the engine's decode thread does all of its torch work (infer/scheduler.py): one decode step of the embedded
model (two LoRA adapters of the demo's shape, r=16 on all linear layers; `--dtype auto` weights, as served), run
where the engine ran it before and where it runs it now.

    .venv/bin/python benchmarks/threads.py        # about 1 minute on a 2-core CPU

Each case runs in a fresh process:
- main: everything in the main thread;
- thread after main: the model loaded in the main thread, the steps in a second thread (what the engine did: its
  worker thread decoded a model the main thread had loaded);
- thread only: loading and steps in a second thread, the main thread idle (what the engine does now).
GNU OpenMP, which PyTorch's CPU wheels use, gives each thread that runs a parallel kernel a pool of its own; once a
process has more OpenMP threads than CPUs it stops spinning between kernels, so each of a step's hundreds of small
kernels pays for putting threads to sleep and waking them. Prints the median step of 15 after 64 prompt tokens (as
benchmarks/decoder.py), for 1 row and for 8 rows (two adapters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
CASES = ("main", "thread after main", "thread only")


def load(adapters: list[str]):
    import torch

    from peftune import models
    from peftune.infer.fast import FastDecoder
    from peftune.infer.lora import LoraBank
    from peftune.infer.quant import quantize

    model = models.load_model("smollm2-135m-instruct", dtype=torch.float32).eval()
    quantize(model, "auto")
    decoder = FastDecoder(model)
    decoder.bank = LoraBank(model, groups=decoder.groups())
    for i, adapter in enumerate(adapters):
        decoder.bank.add(f"a{i}", adapter)
    return decoder


def one_case(case: str, adapters: list[str]) -> dict:
    from decoder import lean_step

    result: dict = {}

    def measure(decoder) -> None:
        result["1 row"] = lean_step(decoder, decoder.bank, ["a0"])
        result["8 rows"] = lean_step(decoder, decoder.bank, ["a0"] * 4 + ["a1"] * 4)

    if case == "main":
        measure(load(adapters))
    else:
        decoder = load(adapters) if case == "thread after main" else None
        worker = threading.Thread(target=lambda: measure(decoder or load(adapters)))
        worker.start()
        worker.join()
    return result


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) == 4 and sys.argv[1] == "--case":
        print(json.dumps(one_case(sys.argv[2], json.loads(sys.argv[3]))))
        return
    from serve import random_adapters

    from peftune import models

    adapters = random_adapters(models.resolve_model_path("smollm2-135m-instruct"), tempfile.mkdtemp())
    print("| where the torch work runs | decode step, 1 row | decode step, 8 rows (2 adapters) |")
    print("|---|---|---|")
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, json.dumps(adapters)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {case} | {r['1 row']:.1f} ms | {r['8 rows']:.1f} ms |", flush=True)
    import torch

    print(f"{os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")


if __name__ == "__main__":
    main()
