"""Many plain LoRA adapters on one base model, each batch row with its own adapter, at about the cost of one.

peft can mix adapters in a batch (`adapter_names`), but its per-layer loop splits the batch by adapter, indexes and
writes back each group in Python, in every one of a model's ~200 linear layers: measured here on the embedded model
(bf16, one decode step of one row), a plain forward 48 ms, peft with the adapter active 76 ms, peft with
`adapter_names` 129 ms. This bank keeps every adapter's A and B (B times its scaling) stacked per layer and adds the
updates from a forward hook on the base layer with two matmuls: `out + (x A) B` when the batch has one adapter, and
for a mixed batch `out + ((x A_cat) * mask) B_cat`, where A_cat/B_cat hold all adapters side by side along the rank
and the mask keeps each row's own columns (a dense form of S-LoRA/Punica's gathered matmul; cheaper than a gather
for a handful of adapters). The updates are computed in fp32, as peft does. Adapters that are not plain
LoRA (DoRA, modules_to_save, alpha patterns, other methods) are left to peft (engine.py decides with `plain_lora`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch

PREFIX = "base_model.model."


def plain_lora(adapter_dir: str) -> bool:
    """Whether an adapter is LoRA with nothing but A/B matrices on linear layers (what this bank computes)."""
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
            c = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        return False
    falsy = ("use_dora", "modules_to_save", "trainable_token_indices", "lora_bias", "fan_in_fan_out", "use_qalora",
             "layer_replication", "alora_invocation_tokens", "use_bdlora", "target_parameters", "alpha_pattern")
    return c.get("peft_type") == "LORA" and not any(c.get(k) for k in falsy)


def _linear(module) -> bool:
    """An nn.Linear, or a layer standing in for one (quant.Int8Linear, bitsandbytes' layers)."""
    return isinstance(module, torch.nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features")


class _Layer:
    """One base linear layer's adapters, stacked: A [slots, in, r] and B [slots, r, out] (B already multiplied by
    the slot's scaling), and the same concatenated along the rank, A_cat [in, slots*r] and B_cat [slots*r, out], for
    batches that mix adapters. Slot 0 is the base (zeros)."""

    def __init__(self, module, rank: int, dtype: torch.dtype) -> None:
        self.module, self.dtype = module, dtype
        self.A = torch.zeros((1, module.in_features, rank), dtype=dtype)
        self.B = torch.zeros((1, rank, module.out_features), dtype=dtype)
        self._concat()

    def put(self, slot: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """A [in, r], B [r, out] (scaled) into `slot`, growing the stacks to fit."""
        slots, rank = max(slot + 1, self.A.shape[0]), max(A.shape[1], self.A.shape[2])
        if (slots, rank) != (self.A.shape[0], self.A.shape[2]):
            grownA = torch.zeros((slots, self.A.shape[1], rank), dtype=self.dtype)
            grownB = torch.zeros((slots, rank, self.B.shape[2]), dtype=self.dtype)
            grownA[: self.A.shape[0], :, : self.A.shape[2]] = self.A
            grownB[: self.B.shape[0], : self.B.shape[1]] = self.B
            self.A, self.B = grownA, grownB
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :, : A.shape[1]] = A.to(self.dtype)
        self.B[slot, : B.shape[0]] = B.to(self.dtype)
        self._concat()

    def clear(self, slot: int) -> None:
        if slot < self.A.shape[0]:
            self.A[slot].zero_()
            self.B[slot].zero_()
            self._concat()

    def _concat(self) -> None:
        slots, inputs, rank = self.A.shape
        self.A_cat = self.A.permute(1, 0, 2).reshape(inputs, slots * rank).contiguous()
        self.B_cat = self.B.reshape(slots * rank, -1).contiguous()


class LoraBank:
    def __init__(self, model, dtype: torch.dtype = torch.float32) -> None:
        """dtype: what the updates are computed in: fp32 by default, as peft does (on CPUs without native bf16,
        small bf16 matmuls are also slower than fp32 ones)."""
        self.model, self.dtype = model, dtype
        self.layers: dict[str, _Layer] = {}
        self.slots: dict[str, int] = {}  # adapter name -> slot (0 = the base)
        self.free: list[int] = []
        self._rows: torch.Tensor | None = None  # the slot of each batch row during a forward
        self._masks: dict = {}
        self._active, self._single = False, None
        self._hooks = []

    def add(self, name: str, adapter_dir: str) -> None:
        from safetensors.torch import load_file

        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        modules = dict(self.model.named_modules())
        pairs: dict[str, dict] = {}
        for key, tensor in weights.items():
            stem, _, kind = key.rpartition(".lora_")
            module = stem[len(PREFIX):] if stem.startswith(PREFIX) else stem
            if kind not in ("A.weight", "B.weight") or not _linear(modules.get(module)):
                raise ValueError(f"{key}: not a LoRA matrix of a linear layer of this model")
            pairs.setdefault(module, {})[kind[0]] = tensor
        slot = self.free.pop(0) if self.free else len(self.slots) + 1
        for module, ab in pairs.items():
            A, B = ab["A"].float(), ab["B"].float()  # [r, in], [out, r]
            rank = A.shape[0]
            scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
            layer = self.layers.get(module)
            if layer is None:
                layer = self.layers[module] = _Layer(modules[module], rank, self.dtype)
                self._hooks.append(modules[module].register_forward_hook(self._hook(layer)))
            layer.put(slot, A.T, B.T * scale)
        self.slots[name] = slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        for layer in self.layers.values():
            layer.clear(slot)
        self.free.append(slot)

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]):
        """Within: forwards of the base model add, to batch row i, adapters[i]'s update (None: none)."""
        slots = [self.slots[a] if a else 0 for a in adapters]
        self._rows = torch.tensor(slots)
        self._active = any(slots)  # decided once per forward, not in each of the ~200 hooks
        self._single = slots[0] if len(set(slots)) == 1 else None
        self._masks = {}
        try:
            yield
        finally:
            self._rows = None

    def _mask(self, slots: int, rank: int, tokens: int) -> torch.Tensor:
        """[rows*tokens, slots*rank]: 1 on the columns of each row's own slot."""
        key = (slots, rank, tokens)
        if key not in self._masks:
            rows = torch.where(self._rows < slots, self._rows, torch.zeros_like(self._rows))
            onehot = torch.nn.functional.one_hot(rows, slots).to(self.dtype)  # [rows, slots]
            self._masks[key] = onehot.repeat_interleave(rank, dim=1).repeat_interleave(tokens, dim=0)
        return self._masks[key]

    def _hook(self, layer: _Layer):
        def add_update(module, args, output):
            if self._rows is None or not self._active:
                return output
            x = args[0]
            shape = output.shape
            flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
            slot = self._single
            if slot is not None and slot < layer.A.shape[0]:  # one adapter for the whole batch
                delta = (flat @ layer.A[slot]) @ layer.B[slot]
            else:
                slots, _, rank = layer.A.shape
                delta = ((flat @ layer.A_cat) * self._mask(slots, rank, flat.shape[0] // len(self._rows))) @ layer.B_cat
            return output + delta.view(shape).to(output.dtype)

        return add_update
