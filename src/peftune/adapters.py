"""Save an adapter in the PEFT layout and verify the result (the method itself: methods.py).

Saving checks what alpaca-lora once got wrong (443-byte empty adapters): the written file must hold every
trainable tensor, and at least one must differ from its value at initialisation.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .errors import PeftuneError
from .io import publish
from .methods import has_virtual_tokens


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _numel(p) -> int:
    """Logical parameter count; a bitsandbytes 4-bit tensor stores two values per byte (its quant_state knows)."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return trainable, total


def save_adapter(model, output_dir: str, initial: dict[str, torch.Tensor], base_model_ref: str, save) -> str:
    """Writes adapter_config.json + adapter_model.safetensors at the root of output_dir, after verifying them in a
    temporary directory; the files are renamed into place only once they check out. `save(model, directory)` writes
    the PEFT layout (methods.Adapter.save_pretrained)."""
    from safetensors.torch import load_file

    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir)
    try:
        model.peft_config["default"].base_model_name_or_path = base_model_ref
        save(model, tmp)
        weights = os.path.join(tmp, "adapter_model.safetensors")
        saved = load_file(weights)
        if not saved:
            raise RuntimeError("the saved adapter holds no tensors")
        # virtual-token methods save the prompt encoder's output (one tensor), not the encoder itself
        if not has_virtual_tokens(model) and len(saved) < len(initial):
            raise RuntimeError(f"the saved adapter holds {len(saved)} tensors, the model trains {len(initial)}")
        changed = any(not torch.equal(p.detach().cpu(), initial[n].cpu())
                      for n, p in model.named_parameters() if p.requires_grad)
        if not changed:
            raise PeftuneError("training left every adapter weight at its initial value, so no adapter was written; "
                               "check learning_rate, max_steps and warmup_steps")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            publish(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(output_dir, "adapter_model.safetensors")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
