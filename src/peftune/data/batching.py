"""The data order and the collation of micro-batches.

The plan (which samples go into which optimizer step and micro-batch) is a pure function of (seed, epoch), so
every process knows the whole global step ahead of time — including its number of trained tokens, which the
loss is normalised by — and a resumed run can rebuild it exactly.

Collation produces `targets` already shifted inside each sample (targets[t] = labels[t + 1], IGNORE at a
sample's last token), so the loss never pairs the end of one packed sample with the start of the next.
"""

from __future__ import annotations

import math
import random

import torch

from .render import IGNORE


def epoch_order(lengths: list[int], seed: int, epoch: int, group_by_length: bool, group_size: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:  # like HF's LengthGroupedSampler: sort inside mega-batches, keep the batches' order random
        mega = group_size * 50
        order = [i for k in range(0, len(order), mega)
                 for i in sorted(order[k:k + mega], key=lambda i: -lengths[i])]
        blocks = [order[k:k + group_size] for k in range(0, len(order), group_size)]
        rng.shuffle(blocks)
        order = [i for b in blocks for i in b]
    return order


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


def total_steps(num_samples: int, batch_size: int, num_epochs: float, max_steps: int | None) -> int:
    total = math.ceil(num_epochs * steps_per_epoch(num_samples, batch_size))
    return min(total, max_steps) if max_steps else total


class DataOrder:
    """The global micro-batches (lists of sample indices) of each optimizer step (0-based). Each epoch's order is
    drawn once, when the loop first reaches it, instead of being reshuffled for every step."""

    def __init__(self, lengths: list[int], batch_size: int, micro_batch_size: int, seed: int,
                 group_by_length: bool = False) -> None:
        self.lengths, self.batch_size, self.micro_batch_size = lengths, batch_size, micro_batch_size
        self.seed, self.group_by_length = seed, group_by_length
        self.per_epoch = steps_per_epoch(len(lengths), batch_size)
        self._epoch, self._order = -1, []

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(self.lengths, self.seed, epoch, self.group_by_length, self.micro_batch_size)
        chosen = self._order[k * self.batch_size:(k + 1) * self.batch_size]
        return [chosen[i:i + self.micro_batch_size] for i in range(0, len(chosen), self.micro_batch_size)]


def shifted_targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE]


def collate_packed(samples: list[dict]) -> dict:
    """One row of all samples back to back; position ids restart per sample; no padding, no attention mask."""
    ids, pos, tgt = [], [], []
    for s in samples:
        ids += s["input_ids"]
        pos += range(len(s["input_ids"]))
        tgt += shifted_targets(s["labels"])
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "targets": torch.tensor([tgt])}
    if any(s.get("replay") for s in samples):
        batch["kl_mask"] = torch.tensor([sum(([bool(s.get("replay"))] * len(s["input_ids"]) for s in samples), [])])
        batch["kl_mask"] &= batch["targets"] != IGNORE
    return batch


def collate_padded(samples: list[dict], pad_id: int, multiple_of: int = 8) -> dict:
    """Right-padded rows with an attention mask (packing off, or for methods that cannot pack)."""
    width = max(len(s["input_ids"]) for s in samples)
    width = math.ceil(width / multiple_of) * multiple_of
    ids = torch.full((len(samples), width), pad_id)
    tgt = torch.full((len(samples), width), IGNORE)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n] = torch.tensor(s["input_ids"])
        tgt[r, :n] = torch.tensor(shifted_targets(s["labels"]))
        mask[r, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "targets": tgt}
    if any(s.get("replay") for s in samples):
        rows = torch.tensor([bool(s.get("replay")) for s in samples])
        batch["kl_mask"] = rows[:, None] & (tgt != IGNORE)
    return batch


def trained_tokens(samples: list[dict]) -> int:
    """Tokens that carry loss after the shift (a label at a sample's first position is never predicted)."""
    return sum(sum(1 for t in s["labels"][1:] if t != IGNORE) for s in samples)
