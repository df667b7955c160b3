"""Many plain LoRA adapters on one base model, each batch row with its own adapter, at about the cost of one.

peft can mix adapters in a batch (`adapter_names`), but its per-layer loop splits the batch by adapter, indexes and
writes back each group in Python, in every one of a model's ~200 linear layers: measured here on the embedded model
(bf16, one decode step of one row), a plain forward 48 ms, peft with the adapter active 76 ms, peft with
`adapter_names` 129 ms. This bank keeps every adapter's A and B (B times its scaling) stacked per group of layers and
computes the updates with two matmuls: `(x A) B` when the batch has one adapter, and for a mixed batch
`((x A_cat) * mask) B_cat`, where A_cat/B_cat hold all adapters side by side along the rank and the mask keeps each
row's own columns (a dense form of S-LoRA/Punica's gathered matmul; cheaper than a gather for a handful of
adapters). A group is the layers that read one input (q/k/v, gate/up) when the decoder runs them as one fused matmul
(fast.py): their A matrices side by side and their B matrices block-diagonal, so the group's update is still two
matmuls. Otherwise each layer is a group of its own and a forward hook adds its update. The updates are computed in
fp32, as peft does. Adapters that are not plain LoRA (DoRA, modules_to_save, alpha patterns, other methods) are
left to peft (engine.py decides with `plain_lora`).
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


class _Group:
    """The adapters of layers that read one input: A [slots, in, members*rank] (each member's A in its own `rank`
    columns) and B [slots, members*rank, sum of outs] (block-diagonal, already multiplied by the slot's scaling), and
    for batches that mix adapters the same of the slots in the batch concatenated along the rank (`cat`). Slot 0 is
    the base (zeros)."""

    def __init__(self, modules: list, dtype: torch.dtype) -> None:
        self.dtype, self.inputs = dtype, modules[0].in_features
        self.outs = [m.out_features for m in modules]
        self.starts = [sum(self.outs[:i]) for i in range(len(self.outs))]
        self.A4 = torch.zeros((1, self.inputs, len(modules), 0), dtype=dtype)  # [slots, in, members, rank]
        self.B4 = torch.zeros((1, len(modules), 0, sum(self.outs)), dtype=dtype)  # [slots, members, rank, out]
        self._concat()

    def put(self, slot: int, member: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """A [in, r], B [r, out] (scaled) of one member layer into `slot`, growing the stacks to fit."""
        slots, members, rank = max(slot + 1, self.A4.shape[0]), self.A4.shape[2], max(A.shape[1], self.A4.shape[3])
        if (slots, rank) != (self.A4.shape[0], self.A4.shape[3]):
            A4 = torch.zeros((slots, self.inputs, members, rank), dtype=self.dtype)
            B4 = torch.zeros((slots, members, rank, self.B4.shape[3]), dtype=self.dtype)
            A4[: self.A4.shape[0], :, :, : self.A4.shape[3]] = self.A4
            B4[: self.B4.shape[0], :, : self.B4.shape[2]] = self.B4
            self.A4, self.B4 = A4, B4
        start = self.starts[member]
        self.A4[slot, :, member, : A.shape[1]] = A.to(self.dtype)
        self.B4[slot, member, : B.shape[0], start: start + B.shape[1]] = B.to(self.dtype)
        self._concat()

    def clear(self, slot: int) -> None:
        if slot < self.A4.shape[0]:
            self.A4[slot].zero_()
            self.B4[slot].zero_()
            self._concat()

    def _concat(self) -> None:
        slots, inputs, members, rank = self.A4.shape
        self.width = members * rank  # columns per slot
        self.A = self.A4.reshape(slots, inputs, self.width)
        self.B = self.B4.reshape(slots, self.width, self.B4.shape[3])
        self.pairs = [(self.A[i], self.B[i]) for i in range(slots)]  # views, indexed once
        self._cats: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def cat(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For a batch mixing these slots: A_cat [in, members*len(slots)*rank] (member-major: each member's A of
        every slot side by side) and each member's B_cat [len(slots)*rank, its outs]; without the zeros of the
        block-diagonal B, which cost as much as the rest in a mixed batch."""
        if slots not in self._cats:
            if len(self._cats) >= 16:
                self._cats.clear()
            index = torch.tensor(slots)
            A4 = self.A4[index]  # [slots, in, members, rank]
            A = A4.permute(1, 2, 0, 3).reshape(self.inputs, -1).contiguous()
            Bs = [self.B4[index, m, :, start: start + out].reshape(-1, out).contiguous()
                  for m, (start, out) in enumerate(zip(self.starts, self.outs))]
            self._cats[slots] = (A, Bs)
        return self._cats[slots]


class LoraBank:
    def __init__(self, model, dtype: torch.dtype = torch.float32, groups: list[tuple[str, ...]] | None = None) -> None:
        """dtype: what the updates are computed in: fp32 by default, as peft does (on CPUs without native bf16,
        small bf16 matmuls are also slower than fp32 ones). groups: module names whose outputs the caller computes
        as one matmul and asks `apply` for together; without groups every layer gets a forward hook."""
        self.model, self.dtype = model, dtype
        self.hooked = groups is None
        self.member = {name: (tuple(g), i) for g in (groups or []) for i, name in enumerate(g)}
        self.groups: dict[tuple[str, ...], _Group] = {}
        self.slots: dict[str, int] = {}  # adapter name -> slot (0 = the base)
        self.free: list[int] = []
        self._rows: torch.Tensor | None = None  # the slot of each batch row during a forward
        self._masks: dict = {}
        self._present, self._single = (), None
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
            if not self.hooked and module not in self.member:
                raise ValueError(f"{key}: a layer this decoder does not adapt")
            pairs.setdefault(module, {})[kind[0]] = tensor
        slot = self.free.pop(0) if self.free else len(self.slots) + 1
        for module, ab in pairs.items():
            A, B = ab["A"].float(), ab["B"].float()  # [r, in], [out, r]
            rank = A.shape[0]
            scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
            key, member = self.member.get(module, ((module,), 0))
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group([modules[m] for m in key], self.dtype)
                if self.hooked:
                    self._hooks.append(modules[module].register_forward_hook(self._hook(key)))
            group.put(slot, member, A.T, B.T * scale)
        self.slots[name] = slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        for group in self.groups.values():
            group.clear(slot)
        self.free.append(slot)

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None]):
        """Within: forwards of the base model add, to batch row i, adapters[i]'s update (None: none)."""
        slots = [self.slots[a] if a else 0 for a in adapters]
        # decided once per forward, not in each of the ~200 layers
        self._rows = torch.tensor(slots)
        self._present = tuple(sorted(set(slots) - {0}))
        self._single = slots[0] if len(set(slots)) == 1 else None
        self._masks = {}
        try:
            yield
        finally:
            self._rows = None

    def _mask(self, slots: tuple[int, ...], group: _Group, tokens: int) -> torch.Tensor:
        """[rows*tokens, members*len(slots)*rank] (as `_Group.cat`): 1 on the columns of each row's own slot."""
        members, rank = group.A4.shape[2], group.A4.shape[3]
        key = (slots, members, rank, tokens)
        if key not in self._masks:
            onehot = (self._rows[:, None] == torch.tensor(slots)[None]).to(self.dtype)  # [rows, slots]
            self._masks[key] = onehot.repeat_interleave(rank, dim=1).repeat(1, members).repeat_interleave(tokens, 0)
        return self._masks[key]

    def apply(self, key: tuple[str, ...], flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [rows*tokens, outs] (the group's base output for inputs flat [rows*tokens, in], rows as in `rows`)
        plus each row's adapter update."""
        group = self.groups.get(key) if self._present else None
        if group is None:
            return out
        x = flat.to(self.dtype)
        slot = self._single
        if slot is not None:  # one adapter for the whole batch
            if slot >= len(group.pairs):
                return out
            A, B = group.pairs[slot]
            t = x @ A
            if out.dtype == self.dtype:
                return torch.addmm(out, t, B)
            return out + (t @ B).to(out.dtype)
        slots = tuple(s for s in self._present if s < group.A.shape[0])
        if not slots:
            return out
        A, Bs = group.cat(slots)
        t = (x @ A) * self._mask(slots, group, x.shape[0] // len(self._rows))
        if len(Bs) == 1 and out.dtype == self.dtype:
            return torch.addmm(out, t, Bs[0])
        result = out if out.dtype == self.dtype else out.to(self.dtype)
        width = t.shape[1] // len(Bs)
        for m, B in enumerate(Bs):
            start = group.starts[m]
            result[:, start: start + B.shape[1]].addmm_(t[:, m * width: (m + 1) * width], B)
        return result.to(out.dtype)

    def _hook(self, key: tuple[str, ...]):
        def add_update(module, args, output):
            if self._rows is None:
                return output
            x = args[0]
            flat = self.apply(key, x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]))
            return flat.view(output.shape)

        return add_update
