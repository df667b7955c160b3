"""FSDP (version 2) for the frozen base, asked for by an Accelerate config (`accelerate launch --config_file` with
`distributed_type: FSDP`), and the refusal of what is not supported (DeepSpeed, FSDP version 1).

Why not `accelerator.prepare`: Accelerate shards only on accelerators (on a CPU its state is MULTI_CPU and an FSDP
config is ignored), and it would shard the adapter too, whose gradients and optimizer state then become DTensors
that checkpoints, clipping and the adapter file would each have to gather. Here torch's own `fully_shard` wraps each
decoder layer and then the LossModel, with the trainable parameters left out of the sharding (`ignored_params`): the
frozen base, nearly all the memory, is split over the processes and all-gathered layer by layer as the forward and
backward passes reach it; the adapter (a few MB) stays whole on every process, like DDP, and its gradients are
averaged over the processes once per optimizer step (`all_reduce_gradients`). Checkpoints, the adapter file, resume
and clipping then work as with one process. The same code runs on CPUs (gloo) and GPUs (NCCL).
"""

from __future__ import annotations

import os

import torch

from ..errors import PeftuneError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested():
    """Accelerate's FSDP settings when the launch asks for FSDP (its FullyShardedDataParallelPlugin, read from the
    variables `accelerate launch` sets), else None. DeepSpeed and FSDP version 1 are refused (exit status 2); called
    before Accelerate starts, which would otherwise fail on them first or run them its own way."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise PeftuneError("DeepSpeed is not supported by peftune train: its engine takes over gradient accumulation, "
                           "the optimizer step and checkpoints, which peftune's exact-resume loop does itself. For a "
                           "base too large for one device, use FSDP: accelerate launch --config_file "
                           "examples/accelerate/fsdp2.yaml (docs/distributed.md)")
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if int(plugin.fsdp_version) != 2:
        raise PeftuneError(f"FSDP version {plugin.fsdp_version} is not supported: set fsdp_version: 2 in the "
                           "accelerate config (examples/accelerate/fsdp2.yaml)")
    if plugin.activation_checkpointing:
        raise PeftuneError("fsdp_activation_checkpointing is not used by peftune: set gradient_checkpointing: true "
                           "in the training config instead")
    return plugin


def check_config(cfg, precision: str) -> None:
    """What cannot be sharded this way, refused before anything is written."""
    if precision == "fp16":
        raise PeftuneError("FSDP with fp16 is not supported (its loss scaler would need Accelerate's optimizer "
                           "wrapper): set mixed_precision: bf16 or no")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        raise PeftuneError("FSDP cannot shard a quantized base (load_in_4bit / load_in_8bit): train without FSDP")
    if cfg.fuse_projections:
        raise PeftuneError("fuse_projections shares one weight between q/k/v (and gate/up), which FSDP cannot "
                           "shard: set fuse_projections: false")
    if cfg.torch_compile:
        raise PeftuneError("torch_compile under FSDP is not supported here (each compiled layer would also have to "
                           "trace FSDP's gathers; untested): set torch_compile: false")


def _layer_classes(model, plugin) -> tuple[type, ...]:
    """The classes each wrapped in their own FSDP unit: the config's fsdp_transformer_layer_cls_to_wrap, else the
    model's own `_no_split_modules` (its decoder layer)."""
    names = plugin.transformer_cls_names_to_wrap or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = list(getattr(inner, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise PeftuneError(f"FSDP: no layer of the model is one of {names or 'its _no_split_modules'}; set "
                           "fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer class")
    return tuple(classes)


def shard(loss_model: torch.nn.Module, plugin, device: torch.device) -> tuple[int, int, int]:
    """Shards the frozen parameters of every decoder layer, then the rest (embeddings, final norm, head) at the
    root, in place; trainable parameters stay whole. Returns (sharded layers, bytes of the frozen base this process
    holds, bytes of the whole frozen base)."""
    from torch.distributed.fsdp import fully_shard

    loss_model.to(device)
    trainable = {p for p in loss_model.parameters() if p.requires_grad}
    kwargs = {"reshard_after_forward": bool(plugin.reshard_after_forward), "ignored_params": trainable}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    layers = [m for m in loss_model.modules() if isinstance(m, _layer_classes(loss_model.module, plugin))]
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(loss_model, **kwargs)
    mine = whole = 0
    for p in loss_model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            mine += local.numel() * local.element_size()
            whole += p.numel() * p.element_size()
    return len(layers), mine, whole


def all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Averages the trainable parameters' gradients over the processes (what DDP does; accumulate_step has scaled
    each loss for an average). Hand-written because the trainable parameters are outside FSDP's sharding: one flat
    all-reduce per step. A parameter that has no gradient on any process keeps none (as with one process)."""
    import torch.distributed as dist

    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, seen in zip(params, present.tolist()):
        n = p.numel()
        if seen:
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n

