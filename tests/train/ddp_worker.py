"""Run by tests/train/test_distributed.py under torchrun (2 processes, gloo): one optimizer step's backward of a
tiny LoRA model through peftune's LossModel wrapped by Accelerate, each process on data of its own. Writes each
process's LoRA gradients after a backward under no_sync (its own only) and after a synchronised one, and, with
`empty`, gives process 1 a micro-batch without a single labelled token (it must not hang the others)."""

import os
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from peftune import methods
from peftune.config import TrainConfig
from peftune.data.render import IGNORE
from peftune.train.loss import LossModel, accumulate_step
from peftune.data.batching import collate_packed


def main() -> None:
    model_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)  # the same adapter on every process
    cfg = TrainConfig(lora_r=4, lora_dropout=0.0)
    model = methods.Adapter(cfg, 10, model_dir, AutoTokenizer.from_pretrained(model_dir)).attach(
        AutoModelForCausalLM.from_pretrained(model_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    loss_model = accelerator.prepare(LossModel(model))
    g = torch.Generator().manual_seed(100 + rank)  # different data on each process
    ids = torch.randint(5, 200, (12 + 7 * rank,), generator=g).tolist()
    labels = [IGNORE] * len(ids) if mode == "empty" and rank == 1 else ids
    mb = [{"input_ids": ids, "labels": labels}]
    grads = {}
    for name, sync in (("local", False), ("synced", True)):
        model.zero_grad(set_to_none=True)
        accumulate_step(loss_model, [mb], collate_packed, accelerator.backward,
                        sync_context=lambda last, sync=sync: (accelerator.no_sync(loss_model) if not sync else
                                                              torch.enable_grad()),
                        step_tokens=2 * len(ids), world=world)
        grads.update({f"{name}.{n}": p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad})
    save_file(grads, os.path.join(out, f"rank{rank}.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
