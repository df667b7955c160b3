"""Atomic checkpoints and exact resume of the whole training state.

A checkpoint is `output_dir/checkpoints/step-N/`: the adapter (PEFT layout, for users), every trainable tensor
(for the resume), the method's own state (AdaLoRA's rank allocator), the optimizer's tensors and the RNG tensors
(safetensors), and `state.json` (step, counters, scheduler, optimizer hyper-parameters,
python/numpy RNG, a fingerprint of what shapes the trajectory, and the sha256 of every other file). It is written
into a temporary directory and renamed into place, so it exists whole or not at all; `state.json` is verified on
load. Nothing here unpickles: every tensor is safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import PeftuneError
from ..io import sha256_files
from . import faults

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
METHOD = "method.safetensors"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}, tensors


def _set_rng_state(state: dict, tensors: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))])


def _optimizer_tensors(optimizer) -> tuple[dict, list]:
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value.detach().cpu().contiguous()
               for idx, st in sd["state"].items() for name, value in st.items() if torch.is_tensor(value)}
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, counters: dict, fingerprint: dict,
                    keep: int, adapter) -> str:
    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root)
    try:
        # the PEFT layout for users (`peftune chat --adapter .../step-N`), and every trainable tensor for the resume:
        # some methods save less than they train (p-tuning saves its prompt encoder's output, not the encoder)
        adapter.save_pretrained(model, tmp)
        save_file(trainable_tensors(model), os.path.join(tmp, TRAINABLE))
        method_state, method_tensors = adapter.state(model)
        if method_tensors:
            save_file(method_tensors, os.path.join(tmp, METHOD))
        opt_tensors, groups = _optimizer_tensors(optimizer)
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        rng, rng_tensors = _rng_state()
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        faults.point("in_checkpoint", step)
        files = {name: sha256_files(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        state = {"step": step, "counters": counters, "fingerprint": fingerprint, "scheduler": scheduler.state_dict(),
                 "optimizer_groups": groups, "rng": rng, "method": method_state, "files": files}
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, default=lambda o: None)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(final):  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        raise PeftuneError(f"cannot write checkpoint {final}: {e.strerror or e}; earlier checkpoints are intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:  # keep >= 1 (TrainConfig.validate)
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(output_dir: str) -> None:
    """Temporary directories of checkpoint writes that a crash interrupted."""
    root = checkpoints_dir(output_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := STEP_DIR.match(name)) and os.path.isfile(os.path.join(root, name, STATE))]
    return [path for _, path in sorted(found)]


def read_state(path: str) -> dict:
    """state.json of a checkpoint, after checking every file against its recorded sha256."""
    state_path = os.path.join(path, STATE)
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        for name, digest in state["files"].items():
            if sha256_files(os.path.join(path, name)) != digest:
                raise PeftuneError(f"checkpoint {path} is corrupted: {name} does not match its recorded checksum")
    except FileNotFoundError as e:
        raise PeftuneError(f"checkpoint {path} is incomplete: {os.path.basename(e.filename)} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PeftuneError(f"checkpoint {path} is corrupted: {STATE} is unreadable") from None
    return state


def resolve_resume(output_dir: str, setting: str | None, say=print) -> str | None:
    """`auto`: the newest checkpoint that verifies (a damaged newer one is reported and passed over)."""
    if not setting:
        return None
    if setting != "auto":
        if not os.path.isdir(setting):
            raise PeftuneError(f"resume_from_checkpoint {setting}: no such checkpoint directory")
        read_state(setting)
        return setting
    for path in reversed(list_checkpoints(output_dir)):
        try:
            read_state(path)
            return path
        except PeftuneError as e:
            say(f"warning: {e}; trying an older checkpoint")
    raise PeftuneError(f"resume_from_checkpoint auto: no complete checkpoint in {checkpoints_dir(output_dir)}")


LEGACY_KEYS = ("num_epochs", "max_steps")  # in fingerprints before runs could be extended; no longer compared


# settings added later whose default is not what runs did before they existed
# checkpoints from before drew dropout masks with nn.Dropout, computed bf16/fp16 attention in that dtype, and the
# head's loss, the LoRA layers, the norms and the rotary embedding through autograd
BEFORE_THE_KEY = {"fast_dropout": False, "attention_fp32": False, "fused_loss": False,
                  "fused_lora": False, "fused_norm": False, "fused_rotary": False}


def _then(saved: dict, key: str):
    """A setting's value in the checkpoint's run: as saved, or what runs did before the setting existed."""
    import dataclasses

    from ..config import TrainConfig, field_default

    if key in saved:
        return saved[key]
    if key in BEFORE_THE_KEY:
        return BEFORE_THE_KEY[key]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return field_default(fields[key]) if key in fields else None


def _newer_default(saved: dict, current: dict, key: str) -> bool:
    """A setting added after the checkpoint was written, set as the run did then (its default, or BEFORE_THE_KEY)."""
    import dataclasses

    from ..config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return key not in saved and key in names and current.get(key) == _then(saved, key)


def compare_fingerprints(saved: dict, current: dict, path: str, ignore: tuple = ()) -> None:
    skip = set(ignore) | set(LEGACY_KEYS)
    changed = [k for k in sorted(set(saved) | set(current)) if k not in skip and saved.get(k) != current.get(k)
               and not _newer_default(saved, current, k)]
    if changed:
        detail = "; ".join(f"{k}: {_then(saved, k)!r} then, {current.get(k)!r} now" for k in changed[:5])
        raise PeftuneError(f"cannot resume from {path}: the run changed ({detail}); resume with the settings it was "
                           "started with, or start over with --overwrite_output_dir true")


def plan_continuation(state: dict, steps: int, path: str) -> int:
    """The number of optimizer steps the checkpoint's run was planned for. A resume may keep that length (an exact
    continuation) or extend it (more num_epochs or max_steps: the schedule is then re-planned, replan_schedule);
    shortening it, or resuming a run that has nothing left to do, is refused."""
    step = state["step"]
    planned = state["counters"].get("planned_steps", steps)  # checkpoints before extension was possible
    if steps <= step:
        more = "raise num_epochs or max_steps to train further" if steps == step else \
            f"the settings now end the run at step {steps}"
        raise PeftuneError(f"nothing to resume: {path} is at step {step} of {planned}; {more} (the finished "
                           f"adapter is in {os.path.dirname(os.path.dirname(os.path.abspath(path)))})")
    if steps < planned:
        raise PeftuneError(f"cannot resume from {path}: the run was planned for {planned} optimizer steps and would "
                           f"now end at {steps}, which changes its learning-rate schedule; resume with the same "
                           "num_epochs/max_steps, or extend the run; its checkpoints' adapters are usable as they are")
    return planned


def replan_schedule(optimizer, scheduler) -> float:
    """After loading an extended run's scheduler state: the optimizer's learning rates become the new (longer)
    schedule's values at the current step, not the old schedule's. Returns the first group's rate."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch keeps no public setter)
    return lrs[0]


def trainable_tensors(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict, path: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(weights) or any(params[n].shape != weights[n].shape for n in params):
        raise PeftuneError(f"checkpoint {path} does not fit this model's adapter (different method or settings)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def load_checkpoint(path: str, model, optimizer, scheduler, adapter) -> dict:
    """Restores adapter weights, method state, optimizer, scheduler and RNG; returns the state (step, counters)."""
    state = read_state(path)
    try:
        weights = load_file(os.path.join(path, TRAINABLE))
        method_tensors = load_file(os.path.join(path, METHOD)) if os.path.exists(os.path.join(path, METHOD)) else {}
        opt_tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        rng_tensors = load_file(os.path.join(path, "rng.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise PeftuneError(f"checkpoint {path} is corrupted: {type(e).__name__}: {str(e)[:200]}") from None
    load_trainable(model, weights, path)
    adapter.load_state(model, state.get("method", {}), method_tensors)
    _load_optimizer(optimizer, opt_tensors, state["optimizer_groups"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], rng_tensors)
    return state
