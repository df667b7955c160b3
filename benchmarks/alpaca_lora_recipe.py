"""A faithful copy of the alpaca-lora recipe (tloen/alpaca-lora finetune.py), for the speed comparison.

What it keeps from finetune.py: the alpaca prompt template, `tokenize()` with cutoff_len and the EOS appended
when there is room, labels = input_ids (train_on_inputs) or the prompt masked with -100, LoRA r=8 / alpha=16 /
dropout 0.05 on q_proj,v_proj, `DataCollatorForSeq2Seq(pad_to_multiple_of=8)`, the HF Trainer with
adamw_torch, `group_by_length` off. On a CPU: fp32 and no 8-bit loading (as finetune.py does without a GPU).
Written from the recipe's description; run by benchmarks/speed.py in its own process.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    spec = json.load(open(spec_path))
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.pad_token_id = 0  # as finetune.py: unk, different from EOS
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    template = json.load(open(spec["template"]))
    cutoff_len = spec["cutoff_len"]

    def generate_prompt(instruction, input=None, label=None):
        res = template["prompt_input"].format(instruction=instruction, input=input) if input else \
            template["prompt_no_input"].format(instruction=instruction)
        return res + label if label else res

    def tokenize(prompt, add_eos_token=True):
        result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
        if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff_len \
                and add_eos_token:
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(point):
        full = tokenize(generate_prompt(point["instruction"], point["input"], point["output"]))
        if not spec["train_on_inputs"]:
            user = tokenize(generate_prompt(point["instruction"], point["input"]), add_eos_token=False)
            n = len(user["input_ids"]) - 1  # finetune.py: the prompt without its EOS
            full["labels"] = [-100] * n + full["labels"][n:]
        return full

    rows = json.load(open(spec["data"]))
    train_data = [generate_and_tokenize_prompt(r) for r in rows]

    lora = spec.get("lora", {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]})  # speed.py's run 3: the demo's
    targets = "all-linear" if lora["targets"] == ["all-linear"] else lora["targets"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=targets,
                                             lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)

    counts = {"real": 0, "padded": 0}

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += batch["attention_mask"].numel()
        return batch

    args = TrainingArguments(
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
        warmup_steps=spec["warmup_steps"], num_train_epochs=1, learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear", logging_steps=10, optim="adamw_torch", eval_strategy="no", save_strategy="no",
        output_dir=spec["output_dir"], report_to="none", use_cpu=True, seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, train_dataset=train_data, args=args, data_collator=counting_collator)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    from speed import finish_arm  # the shared evaluation and peak-RSS reading

    finish_arm(model, spec, {"real_tokens": counts["real"], "padded_tokens": counts["padded"], "train_time_s": elapsed})


if __name__ == "__main__":
    main(sys.argv[1])
