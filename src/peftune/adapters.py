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


def _signature(p: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Enough of a tensor to tell whether training changed it, without a second copy of a fully trained model."""
    flat = p.detach().flatten()
    return flat[:4096].cpu().clone(), float(flat.double().sum())


def trainable_state(model) -> dict[str, tuple]:
    return {n: _signature(p) for n, p in model.named_parameters() if p.requires_grad}


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
    for config in getattr(model, "peft_config", {}).values():  # full/freeze: no adapter config
        config.base_model_name_or_path = ref
        if getattr(config, "tokenizer_name_or_path", None):  # prompt tuning's text init
            config.tokenizer_name_or_path = ref


# what a finished run keeps of a save: the PEFT layout, or (full/freeze) a whole model and its tokenizer; peft's
# README.md model card is not among them (a user's own README in output_dir stays theirs)
SAVED_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
               "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def _saved_weights(directory: str) -> list[str]:
    """The safetensors files a save wrote: an adapter's, or a whole model's (one file or shards)."""
    for single in ("adapter_model.safetensors", "model.safetensors"):
        if os.path.isfile(os.path.join(directory, single)):
            return [single]
    return sorted(f for f in os.listdir(directory) if f.startswith("model-") and f.endswith(".safetensors"))


def save_adapter(model, output_dir: str, initial: dict[str, tuple], save) -> list[str]:
    """Writes what `save(model, directory)` writes (methods.Adapter.save_pretrained: the PEFT layout, or a whole
    model for full/freeze) at the root of output_dir, after verifying it in a temporary directory; the files are
    renamed into place only once they check out. Returns the paths of the weights files."""
    from safetensors import safe_open

    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir)
    try:
        save(model, tmp)
        files = _saved_weights(tmp)
        saved = set()
        for name in files:
            with safe_open(os.path.join(tmp, name), "pt") as fh:
                saved |= set(fh.keys())
        if not saved:
            raise RuntimeError("the saved adapter holds no tensors")
        # virtual-token methods save the prompt encoder's output (one tensor), not the encoder itself
        if not has_virtual_tokens(model) and len(saved) < len(initial):
            raise RuntimeError(f"the saved adapter holds {len(saved)} tensors, the model trains {len(initial)}")
        changed = any(not torch.equal(_signature(p)[0], initial[n][0]) or _signature(p)[1] != initial[n][1]
                      for n, p in model.named_parameters() if p.requires_grad)
        if not changed:
            raise PeftuneError("training left every adapter weight at its initial value, so no adapter was written; "
                               "check learning_rate, max_steps and warmup_steps")
        kept = [f for f in os.listdir(tmp) if f in SAVED_FILES or f in files]
        for name in sorted(kept, key=lambda f: f in files):  # the weights last
            publish(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(output_dir, name) for name in files]


def is_whole_model(path: str) -> bool:
    """A directory holding a whole model (peft_method full/freeze writes one): config.json, no adapter_config.json."""
    return os.path.isfile(os.path.join(path, "config.json")) and \
        not os.path.isfile(os.path.join(path, "adapter_config.json"))


def run_config(adapter_dir: str, flag: str = "--adapter") -> dict:
    """The config.yaml of the run that trained an adapter directory (for a checkpoint `RUN/checkpoints/step-N`, the
    run's); {} for a plain PEFT adapter. Raises a PeftuneError naming `flag` when the directory is no adapter."""
    import yaml

    if not os.path.exists(adapter_dir):
        raise PeftuneError(f"{flag} {adapter_dir}: no such directory")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        if is_whole_model(adapter_dir):
            raise PeftuneError(f"{flag} {adapter_dir}: a whole model, not an adapter (peft_method full or freeze): "
                               f"use --base_model {adapter_dir}")
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
