"""The demo's questions through every export in llama.cpp, against peftune's own answers (docs/export.md).

    .venv/bin/python docs/check_export.py [--adapter output/demo]      # about 5 minutes on a 2-core CPU

Exports the adapter as merged GGUFs (f16, q8_0, q4_0) and as a LoRA GGUF on the base's own GGUF, then for each
question: the prompt's token ids exactly as peftune renders them (the adapter's template and system prompt), the
last position's logits in llama.cpp against the merged model's in transformers (fp32), and the greedy answer (40
tokens) in llama.cpp against `peftune chat`'s (fp32, no repetition penalty).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

QUESTIONS = ["What's your name?", "Which company made you?", "你叫什么名字？", "是哪家公司开发了你？",
             "What is the capital of France?", "Who wrote Romeo and Juliet?", "What is the chemical symbol for water?",
             "Tell me your name."]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default="output/demo")
    ap.add_argument("--max_tokens", type=int, default=40)
    args = ap.parse_args()
    from llama_cpp import Llama

    from peftune import cli, models
    from peftune.export.merge import merge
    from peftune.infer.engine import Engine
    from peftune.infer.sampling import SamplingParams

    out = tempfile.mkdtemp(prefix="peftune-export-")
    name = os.path.basename(os.path.normpath(args.adapter))
    files = {}
    for outtype in ("f16", "q8_0", "q4_0"):
        assert cli.main(["export", args.adapter, "--output_dir", out, "--outtype", outtype, "--overwrite"]) == 0
        files[f"merged {outtype}"] = (os.path.join(out, f"{name}-{outtype}.gguf"), None)
    assert cli.main(["export", args.adapter, "--output_dir", out, "--outtype", "f32", "--adapter_only",
                     "--overwrite"]) == 0
    merged = merge(args.adapter)
    files["base GGUF + LoRA GGUF f32"] = (models.source_gguf(merged.base_model),
                                          os.path.join(out, f"{name}-lora-f32.gguf"))

    engine = Engine(None, {"a": args.adapter}, dtype="fp32")
    prompts = [engine.chat_prompt("a", [{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    ours = [engine.generate("a", [{"role": "user", "content": q}], greedy)[0].strip() for q in QUESTIONS]
    engine.close()
    with torch.no_grad():
        reference = [merged.model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in prompts]

    print(f"\nexports of {args.adapter} ({merged.peft_type}, base {merged.base_model}); merge self-check "
          f"{merged.max_diff:.2e}, adapter effect {merged.effect:.3g}\n")
    print("| export | file size | max \\|logit diff\\| vs merged fp32 (last position) | greedy answers equal to "
          "peftune's |")
    print("|---|---|---|---|")
    answers = {}
    for label, (model_path, lora_path) in files.items():
        llm = Llama(model_path=model_path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False, logits_all=True,
                    **({"lora_path": lora_path} if lora_path else {}))
        eos = llm.token_eos()
        diffs, same, texts = [], 0, []
        for ids, expected, answer in zip(prompts, reference, ours):
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.array(llm.scores[len(ids) - 1]))
            diffs.append(float((logits - expected).abs().max()))
            tokens = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                if token == eos or len(tokens) >= args.max_tokens:
                    break
                tokens.append(token)
            # a character cut by the 40-token limit: peftune's stream holds its bytes back, so drop them here too
            text = llm.detokenize(tokens).decode("utf-8", errors="replace").rstrip("\ufffd").strip()
            texts.append(text)
            same += text == answer
        answers[label] = texts
        size = os.path.getsize(lora_path or model_path) / 2**20
        print(f"| {label} | {size:.1f} MB{' (adapter)' if lora_path else ''} | {max(diffs):.4f} | {same} of "
              f"{len(QUESTIONS)} |", flush=True)
    print("\n| question | peftune chat (fp32) | llama.cpp, merged q8_0 | llama.cpp, base + LoRA GGUF |")
    print("|---|---|---|---|")
    for k, q in enumerate(QUESTIONS):
        print(f"| {q} | {ours[k]} | {answers['merged q8_0'][k]} | {answers['base GGUF + LoRA GGUF f32'][k]} |")


if __name__ == "__main__":
    main()
