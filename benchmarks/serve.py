"""Serving benchmark: `peftune serve` on the embedded model with two adapters, and llama.cpp on the same model's
GGUF, side by side.

    make install                                         # includes llama-cpp-python (the test extra)
    .venv/bin/python benchmarks/serve.py                 # about 3 minutes on a 2-core CPU
    .venv/bin/python benchmarks/serve.py --adapter output/demo --adapter output/other --dtype bf16

Prints, for 1, 4 and 8 concurrent streaming clients: one stream's decode tokens/s (after its first token), the
aggregate tokens/s of all clients, p50/p95 time to first token, and the server's peak RSS; then llama.cpp's
one-stream numbers on the same prompts. Clients alternate between the two adapters. Every answer is
`max_tokens` long (`ignore_eos`), greedy. The chat template's system prompt is the same in every prompt: after the
first request of each adapter the server's prefix cache holds it (llama-cpp-python likewise reuses the part of its
previous prompt that the next one begins with). Without --adapter, two LoRA adapters of the demo's shape (r=16 on all
linear layers) with random weights are made: they cost what trained ones cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "List five uses of a paperclip.", "Describe the water cycle.", "What makes a good friend?",
           "Give advice to a new programmer.", "Describe a busy market in the morning.", "How do plants grow?"]


def random_adapters(base_dir: str, out: str) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(2):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=1e-3)
        path = os.path.join(out, f"adapter{i}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def stream_one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return {"ttft": (first or start) - start, "tokens": tokens, "decode_s": (last or start) - (first or start),
            "end": time.perf_counter()}


def run_level(url: str, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    results, threads = [], []
    start = time.perf_counter()

    def client(k: int) -> None:
        for j in range(per_client):
            prompt = PROMPTS[(k * per_client + j) % len(PROMPTS)]
            results.append(stream_one(url, models[k % len(models)], prompt, max_tokens))

    for k in range(clients):
        threads.append(threading.Thread(target=client, args=(k,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    ttft = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "stream_tok_s": statistics.median((r["tokens"] - 1) / r["decode_s"] for r in results if r["decode_s"] > 0),
            "ttft_p50": ttft[len(ttft) // 2], "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]}


def answer(url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def batch_invariance(url: str, names: list[str], max_tokens: int) -> tuple[list[int | None], int]:
    """Greedy answers alone vs all at once (batched with each other): for each that differs, the index of the first
    token where it does (None: the same answer)."""
    from peftune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    jobs = [(n, p) for p in PROMPTS for n in names]
    alone = [answer(url, n, p, max_tokens) for n, p in jobs]
    together: dict = {}
    threads = [threading.Thread(target=lambda k=k, job=job: together.__setitem__(k, answer(url, *job, max_tokens)))
               for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = []
    for k in range(len(jobs)):
        if alone[k] != together[k]:
            a, b = tok.encode(alone[k]), tok.encode(together[k])
            firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return firsts, len(jobs)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def llama_cpp(prompts: list[str], max_tokens: int, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: not installed (make install puts llama-cpp-python in .venv)", file=sys.stderr)
        return None
    from peftune.models import embedded_gguf

    llm = Llama(model_path=embedded_gguf(), n_ctx=2048, n_threads=threads, verbose=False)
    eos = llm.token_eos()
    rows = []
    for prompt in prompts:
        start = time.perf_counter()
        first = last = None
        n = 0
        for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                temperature=0, stream=True, logit_bias={eos: -1e9}):
            if chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1  # llama.cpp streams one token per chunk
        rows.append({"ttft": first - start, "stream_tok_s": (n - 1) / (last - first), "tokens": n})
    ttft = sorted(r["ttft"] for r in rows)
    return {"stream_tok_s": statistics.median(r["stream_tok_s"] for r in rows), "ttft_p50": ttft[len(ttft) // 2],
            "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", action="append", default=[], help="adapter directories (default: two made here)")
    ap.add_argument("--engine", default="torch,llama.cpp", help="engines to serve with, in turn (comma-separated)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "int8", "int4"),
                    help="--engine torch's weights")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--per_client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peftune.models import resolve_model_path

    base_dir = resolve_model_path("smollm2-135m-instruct")
    tmp = tempfile.mkdtemp(prefix="peftune-bench-")
    adapters = args.adapter or random_adapters(base_dir, tmp)
    names = [f"a{i}" for i in range(len(adapters))]
    from peftune.serve.launch import start

    results = {}
    for engine in args.engine.split(","):
        flags = ["--engine", engine] + (["--dtype", args.dtype] if engine == "torch" else [])
        server, url = start([*flags, "--base_model", "smollm2-135m-instruct",
                             *[f"--adapter={n}={p}" for n, p in zip(names, adapters)]], stderr=subprocess.DEVNULL)
        try:
            stream_one(url, names[0], "warm up", 8)
            rows = [run_level(url, names, int(c), args.per_client, args.max_tokens) for c in args.levels.split(",")]
            flips = batch_invariance(url, names, args.max_tokens)
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        results[engine] = (rows, flips, rss)
    cpp = llama_cpp(PROMPTS[:4], args.max_tokens, args.threads)

    import platform

    import torch

    print(f"\npeftune serve (--engine torch: {args.dtype} weights; --engine llama.cpp: the Q4_1 GGUF with LoRA GGUFs), "
          f"2 LoRA adapters r=16 all-linear, clients alternate between them; {args.max_tokens} tokens per answer, "
          f"greedy; vs llama.cpp alone (llama-cpp-python's Llama, Q4_1 GGUF, no adapter, {args.threads} threads)\n")
    print("| engine | clients | requests | one stream's decode tok/s | aggregate tok/s | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|---|")
    for engine, (rows, _, _) in results.items():
        for r in rows:
            print(f"| peftune serve --engine {engine} | {r['clients']} | {r['requests']} | {r['stream_tok_s']:.1f} | "
                  f"{r['aggregate_tok_s']:.1f} | {r['ttft_p50']:.3f} s | {r['ttft_p95']:.3f} s |")
    if cpp:
        print(f"| llama.cpp (llama-cpp-python) | 1 | 4 | {cpp['stream_tok_s']:.1f} | {cpp['stream_tok_s']:.1f} | "
              f"{cpp['ttft_p50']:.3f} s | {cpp['ttft_p95']:.3f} s |")
    print()
    for engine, (_, (firsts, total), rss) in results.items():
        print(f"--engine {engine}: greedy answers that differ when batched with the others instead of alone: "
              f"{len(firsts)} of {total}" + (f" (first differing token: {', '.join(map(str, sorted(firsts)))})"
                                             if firsts else "") + f"; peak RSS of the server: {rss:.0f} MB")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")

if __name__ == "__main__":
    main()
