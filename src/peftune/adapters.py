"""Save an adapter in the PEFT layout and verify the result (the method itself: methods.py).

Saving checks what alpaca-lora once got wrong (443-byte empty adapters): the written file must hold every
trainable tensor, and at least one must differ from its value at initialisation.
"""

from __future__ import annotations

import json
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


def set_base_reference(model, ref: str) -> None:
    """What adapter_config.json names as the base: a reference that resolves on any machine with peftune
    (models.portable_ref), not this machine's cache path."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = ref
        if getattr(config, "tokenizer_name_or_path", None):  # prompt tuning's text init
            config.tokenizer_name_or_path = ref


def save_adapter(model, output_dir: str, initial: dict[str, torch.Tensor], save) -> str:
    """Writes adapter_config.json + adapter_model.safetensors at the root of output_dir, after verifying them in a
    temporary directory; the files are renamed into place only once they check out. `save(model, directory)` writes
    the PEFT layout (methods.Adapter.save_pretrained)."""
    from safetensors.torch import load_file

    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir)
    try:
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


def run_config(adapter_dir: str, flag: str = "--adapter") -> dict:
    """The config.yaml of the run that trained an adapter directory (for a checkpoint `RUN/checkpoints/step-N`, the
    run's); {} for a plain PEFT adapter. Raises a PeftuneError naming `flag` when the directory is no adapter."""
    import yaml

    if not os.path.exists(adapter_dir):
        raise PeftuneError(f"{flag} {adapter_dir}: no such directory")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise PeftuneError(f"{flag} {adapter_dir}: no adapter_config.json there (not a trained adapter directory)")
    here = os.path.join(adapter_dir, "config.yaml")
    run = os.path.join(adapter_dir, os.pardir, os.pardir, "config.yaml")
    is_checkpoint = os.path.basename(os.path.dirname(os.path.abspath(adapter_dir))) == "checkpoints"
    for path in (here, run) if is_checkpoint else (here,):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
            return loaded if isinstance(loaded, dict) else {}
    return {}


def base_of(adapter_dir: str, run: dict) -> str | None:
    """The base model an adapter was trained on: its run's base_model, else what peft recorded."""
    if run.get("base_model"):
        return run["base_model"]
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
