"""The training recipe: read it top to bottom. The maths it needs lives in small tested functions it calls.

Several processes (torchrun, `accelerate launch`, `--num_processes`): Accelerate wraps a LossModel (loss.py) in DDP,
so the forward that computes the loss is the wrapper's; every process walks the same deterministic data order and
takes its own micro-batches of each step (distributed.py); the loss is divided by the trained tokens of the whole
step over every process; only the main process writes files; losses, stop signals and non-finite checks are summed
over the processes, so every process takes the same decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import shutil
import time

import torch

from .. import adapters, methods, models
from ..config import FULL_MODEL, TrainConfig
from ..options import save_config
from ..data import batching
from ..data.render import Renderer, get_template
from ..data.sources import add_system_prompt, apply_weights, load_rows, system_prompt
from ..errors import PeftuneError, TrainingInterrupted
from ..io import atomic_write_text
from . import checkpoint, curves, faults, replay
from .attention import use_packed_attention
from .guards import StopRequest, finite, return_large_buffers_to_os
from . import distributed, sharding
from .cast_once import cast_weights_once
from .compiled import compile_layers
from .dropout import use_fast_dropout
from .fused import fuse_projections
from .lora_fused import use_fused_lora
from .norm_fused import use_fused_norms
from .rotary_fused import use_fused_rotary
from .loss import LossModel, accumulate_step, forward_loss_sum, release_blocks
from .metrics import MetricsLog, progress

RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", "runs", "mlruns", "wandb", "checkpoints", "initial-adapter",
             *adapters.SAVED_FILES)


def split_validation(rows: list, val_set_size: float, seed: int) -> tuple[list, list]:
    n_val = int(val_set_size) if val_set_size >= 1 else int(len(rows) * val_set_size)
    if n_val >= len(rows):
        raise PeftuneError(f"val_set_size ({val_set_size:g}) must be smaller than the number of rows ({len(rows)})")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [rows[i] for i in sorted(val)]


def check_output_dir(cfg: TrainConfig, resuming: bool) -> list[str]:
    """Before any data is read: output_dir must be writable, and hold no other run unless resuming or overwriting.
    Returns the old run files that clear_output_dir will remove. Files that are not a run's are left alone."""
    # a directory that does not exist yet is created only once the data has checked out (no partial output)
    existing_dir = os.path.abspath(cfg.output_dir)
    while not os.path.exists(existing_dir):
        existing_dir = os.path.dirname(existing_dir)
    try:
        if not os.path.isdir(existing_dir):
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", existing_dir)
        probe = os.path.join(existing_dir, f".peftune-write-test-{os.getpid()}")  # one per process
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PeftuneError(f"output_dir {cfg.output_dir}: not writable ({e.strerror})") from None
    if resuming:
        return []
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
    if existing and not cfg.overwrite_output_dir:
        raise PeftuneError(f"output_dir {cfg.output_dir} already holds a run ({', '.join(existing)}); pass "
                           "--resume_from_checkpoint auto to continue it, --overwrite_output_dir true to replace it, "
                           "or choose another --output_dir")
    return existing


def clear_output_dir(cfg: TrainConfig, existing: list[str]) -> None:
    os.makedirs(cfg.output_dir, exist_ok=True)
    for f in existing:
        path = os.path.join(cfg.output_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# num_epochs and max_steps are not here: a resume may extend a run (checkpoint.plan_continuation)
TRAJECTORY_KEYS = ("base_model", "prompt_template", "system_prompt", "cutoff_len", "train_on_inputs", "mask_history",
                   "add_eos_token", "batch_size", "micro_batch_size", "learning_rate", "lr_scheduler",
                   "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "group_by_length", "packing",
                   "mixed_precision", "seed", "nan_policy", "peft_method", "load_in_4bit", "load_in_8bit", "replay",
                   "replay_data", "replay_max_tokens", "replay_beta", "replay_ce", "fuse_projections", "fast_dropout",
                   "torch_compile", "packed_attention", "attention_fp32", "fused_loss", "fused_lora",
                   "fused_norm", "fused_rotary",
                   *(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("methods")))


def config_fingerprint(cfg: TrainConfig, num_processes: int) -> dict:
    """The settings that shape the training trajectory; a resume must match them (checked before data is read).
    Logging and eval settings may change."""
    return {**{k: getattr(cfg, k) for k in TRAJECTORY_KEYS}, "processes": num_processes}


def run_fingerprint(cfg: TrainConfig, train_set: list[dict], num_processes: int) -> dict:
    """config_fingerprint plus a digest of the tokenized training samples."""
    digest = hashlib.sha256()
    for s in train_set:
        digest.update(json.dumps([s["input_ids"], s["labels"]]).encode())
    return {**config_fingerprint(cfg, num_processes),
            "training data": f"{len(train_set)} samples, sha256 {digest.hexdigest()[:16]}"}


def keep_metrics_until(path: str, step: int) -> None:
    """After a resume from step N: metrics.jsonl keeps the lines up to N, so it continues without duplicates."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(lines))


def cpu_has_bf16() -> bool:
    """bf16 autocast wins on CPUs with native bf16 dot products (measured here: 1.45x tokens/s, AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState

    launched = distributed.launched_processes()
    precision = resolve_precision(cfg.mixed_precision)
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        # Accelerate keeps one process-wide state and refuses a second run (a notebook, the tests) with another
        # precision; it offers no public reset, so its own reset is called here, single-process only.
        AcceleratorState._reset_state(reset_partial_state=True)
    cfg.check_trackers()  # before Accelerate sees them: it only warns about a missing one
    trackers = cfg.trackers()
    if "wandb" in trackers:  # offline and inside the run unless the user set otherwise
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", cfg.output_dir)
    if "mlflow" in trackers:
        os.environ.setdefault("MLFLOW_TRACKING_URI", "file:" + os.path.join(os.path.abspath(cfg.output_dir), "mlruns"))
    # under a launcher on a machine without a GPU, Accelerate runs one process per rank unless told to use the CPU
    cpu = bool(launched) and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=precision, log_with=trackers or None, cpu=cpu,
                              project_dir=os.path.join(cfg.output_dir, "runs") if trackers else None)
    distributed.check_launch(launched, accelerator.num_processes, cfg.num_processes)
    return precision, accelerator


def apply_speedups(cfg: TrainConfig, model, device_type: str, precision: str = "no", sharded: bool = False) -> None:
    """The switchable speed-ups on an attached model (after attach: PiSSA/OLoRA have moved the base weights by then);
    benchmarks/profile_step.py applies them the same way. `sharded`: FSDP will split the base's weights over the
    processes (a whole low-precision copy on each would undo that)."""
    if cfg.fuse_projections and cfg.peft_method not in FULL_MODEL:
        fuse_projections(model)
    if cfg.fast_dropout and device_type == "cpu":
        use_fast_dropout(model)
    if cfg.cast_weights_once and precision in ("bf16", "fp16") and not sharded:
        cast_weights_once(model)
    if cfg.fused_lora and not cfg.torch_compile and not sharded:  # compiled layers fuse by themselves
        use_fused_lora(model)
    if cfg.fused_norm and not cfg.torch_compile and not sharded:
        use_fused_norms(model)
    if cfg.fused_rotary and not cfg.torch_compile and not sharded:
        use_fused_rotary(model)
    if cfg.torch_compile:
        compile_layers(model)


def training_rate(counters: dict) -> float:
    """Tokens per second of training alone: evaluation time is left out (metrics.jsonl and the last line agree)."""
    return round(counters["tokens"] / max(counters["elapsed"] - counters.get("eval_s", 0.0), 1e-9), 2)


@torch.no_grad()
def evaluate(model, samples: list[dict], micro_batch_size: int, collate, sharded=None) -> float:
    """Mean loss per trained token. `sharded`: the FSDP-wrapped LossModel, whose own forward must run (its root
    gathers the embeddings and head); otherwise the model is called directly (no DDP broadcast per batch)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), micro_batch_size):
        chunk = samples[i:i + micro_batch_size]
        batch = collate(chunk)
        total += (sharded(batch)[1] if sharded is not None else forward_loss_sum(model, batch)).item()
        count += batching.trained_tokens(chunk)
    model.train()
    return total / max(count, 1)


def prepare_data(cfg: TrainConfig, say=print) -> tuple:
    """(tokenizer, training samples, validation samples): read, validate, split, weight, render."""
    rows = add_system_prompt(load_rows(cfg.data_path, cfg.data_vars, cfg.seed, cfg.skip_bad_rows, warn=say),
                             cfg.system_prompt)
    if cfg.val_data_path:
        train_rows = rows
        val_rows = add_system_prompt(load_rows(cfg.val_data_path, cfg.data_vars, cfg.seed, cfg.skip_bad_rows,
                                               warn=say), cfg.system_prompt)
    else:
        train_rows, val_rows = split_validation(rows, cfg.val_set_size, cfg.seed)
    train_rows = apply_weights(train_rows, cfg.seed)
    tokenizer = models.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    renderer = Renderer(tokenizer, get_template(cfg.prompt_template, tokenizer, cfg.tool_format), cfg.cutoff_len,
                        cfg.train_on_inputs, cfg.add_eos_token, cfg.mask_history)
    train_set = renderer.render_all(train_rows, warn=say, skip_bad_rows=cfg.skip_bad_rows)
    train_set += replay.replay_samples(cfg, renderer, len(train_rows), say)  # the forgetting guard (off unless set)
    val_set = renderer.render_all(val_rows, warn=say, skip_bad_rows=cfg.skip_bad_rows) if val_rows else []
    return tokenizer, train_set, val_set


def train(cfg: TrainConfig, say=print) -> dict:
    from transformers import get_scheduler, set_seed

    # the method's default learning rate when unset; the system prompt with its placeholders filled (config.yaml
    # keeps what the run used, and chat/serve read it from there)
    cfg = dataclasses.replace(cfg, learning_rate=methods.learning_rate(cfg),
                              system_prompt=system_prompt(cfg.system_prompt, cfg.data_vars))
    fsdp = sharding.requested()
    precision, accelerator = make_accelerator(cfg)
    if cfg.release_memory and accelerator.device.type == "cpu":
        return_large_buffers_to_os()
    cfg.validate(accelerator.num_processes)
    fsdp = fsdp if accelerator.num_processes > 1 else None  # one process: nothing to shard
    if fsdp:
        sharding.check_config(cfg, precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if not main:  # one voice: the main process speaks for all
        say = lambda *args, **kwargs: None  # noqa: E731
    # 1. the cheap checks first (output_dir, the checkpoint and its settings), then the data: everything is read and
    # validated before a byte is written to output_dir
    resume = checkpoint.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint, say)
    saved = checkpoint.read_state(resume) if resume else None
    if saved:
        checkpoint.compare_fingerprints(saved["fingerprint"], config_fingerprint(cfg, accelerator.num_processes),
                                        resume, ignore=("training data",))
    old_run_files = check_output_dir(cfg, resuming=bool(resume))
    with accelerator.main_process_first():  # the main process generates replay answers; the others read its cache
        tokenizer, train_set, val_set = prepare_data(cfg, say)
    fingerprint = run_fingerprint(cfg, train_set, accelerator.num_processes)
    steps = batching.total_steps(len(train_set), cfg.batch_size, cfg.num_epochs, cfg.max_steps)
    if saved:
        checkpoint.compare_fingerprints(saved["fingerprint"], fingerprint, resume)
        planned = checkpoint.plan_continuation(saved, steps, resume)
        if planned != steps and cfg.peft_method == "adalora":
            raise PeftuneError(f"cannot extend an AdaLoRA run ({planned} -> {steps} steps): its rank-pruning schedule "
                               "is fixed by the run's length; start a new run")
    if cfg.peft_method == "adalora":
        methods.adalora_schedule(cfg, steps)  # refuse a schedule with no pruning phase before writing anything
    if main:
        clear_output_dir(cfg, old_run_files)
        checkpoint.remove_partial(cfg.output_dir)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    accelerator.wait_for_everyone()
    packing = cfg.packing and not methods.uses_virtual_tokens(cfg)
    if cfg.packing and not packing:
        say(f"note: {cfg.peft_method} puts learned virtual tokens before every sample, so samples cannot be packed "
            "into one row; training on padded batches")

    # 2. model + adapter (seeded first, so the same seed gives the same adapter)
    set_seed(cfg.seed)
    base = models.load_model(cfg.base_model, cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit,
                             load_in_8bit=cfg.load_in_8bit)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    if packing:
        use_packed_attention(base, cfg.packed_attention, cfg.attention_fp32)
    if cfg.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    adapter = methods.Adapter(cfg, steps, models.resolve_model_path(cfg.base_model), tokenizer)
    model = adapter.attach(base)
    apply_speedups(cfg, model, accelerator.device.type, precision, sharded=bool(fsdp))
    adapters.set_base_reference(model, models.portable_ref(cfg.base_model))
    initial = adapters.trainable_state(model)
    trainable, total_params = adapters.count_parameters(model)
    say(f"{cfg.peft_method}: trainable parameters: {trainable:,} of {total_params:,} "
        f"({100 * trainable / total_params:.2f} %)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adapter.optimizer(model, cfg.learning_rate)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * steps)
    warmup = min(warmup, steps - 1)  # warmup starts at lr 0: a run must have at least one step past it
    scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler),
                              optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    # the wrapper (DDP under several processes, or FSDP's sharding) goes around the loss's forward; `model` stays
    # the model itself
    if fsdp:
        loss_model = LossModel(model, lockstep=True, fused_loss=cfg.fused_loss)
        layers, mine, whole = sharding.shard(loss_model, fsdp, accelerator.device)
        say(f"FSDP: the frozen base sharded over {world} processes ({layers} layers, and the rest at the root): this "
            f"process holds {adapters.human_bytes(mine)} of its {adapters.human_bytes(whole)}; the adapter is whole "
            "on each")
        no_sync = lambda last: contextlib.nullcontext()  # noqa: E731
    else:
        loss_model, optimizer = accelerator.prepare(LossModel(model, fused_loss=cfg.fused_loss), optimizer)
        no_sync = lambda last: contextlib.nullcontext() if last else accelerator.no_sync(loss_model)  # noqa: E731
    model.train()
    if packing:
        collate = batching.collate_packed
    else:
        collate = lambda chunk: batching.collate_padded(chunk, tokenizer.pad_token_id)  # noqa: E731
    to_device = lambda b: {k: v.to(accelerator.device) for k, v in b.items()}  # noqa: E731
    order = batching.DataOrder([len(s["input_ids"]) for s in train_set], cfg.batch_size, cfg.micro_batch_size,
                               cfg.seed, cfg.group_by_length)
    per_epoch = order.per_epoch
    say(f"training on {len(train_set)} samples ({len(val_set)} held out): {steps} optimizer steps of "
        f"{cfg.batch_size} samples, micro-batches of {cfg.micro_batch_size}")

    # 3. the loop (resumed exactly where a checkpoint left it)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    counters = {"step": 0, "tokens": 0, "elapsed": 0.0, "eval_s": 0.0, "window_loss": 0.0, "window_tokens": 0,
                "eval_loss": None}
    if resume:
        counters.update(checkpoint.load_checkpoint(resume, accelerator.unwrap_model(model), optimizer,
                                                   scheduler, adapter)["counters"])
        keep_metrics_until(metrics_path, counters["step"])
        say(f"resumed from {resume} at step {counters['step']}")
        if planned != steps:
            lr = checkpoint.replan_schedule(optimizer, scheduler)
            say(f"extending the run from {planned} to {steps} optimizer steps: the learning-rate schedule is "
                f"re-planned over {steps} steps (as if the run had been planned that long from the start); "
                f"it continues at lr {lr:.3g}")
    counters["planned_steps"] = steps
    log = MetricsLog(metrics_path, accelerator) if main else None
    if cfg.trackers():
        accelerator.init_trackers(os.path.basename(os.path.abspath(cfg.output_dir)),
                                  config={k: str(v) for k, v in cfg.to_dict().items()})
        say(f"reporting to {', '.join(cfg.trackers())}" + (f" (TensorBoard: tensorboard --logdir "
                                                           f"{os.path.join(cfg.output_dir, 'runs')})"
                                                           if "tensorboard" in cfg.trackers() else ""))
    bar = progress(steps, initial=counters["step"], disable=not main)
    start = time.perf_counter() - counters["elapsed"]
    first_step, elapsed_before = counters["step"], counters["elapsed"]
    stop = StopRequest()
    with stop.installed():
        for step in range(counters["step"], steps):
            micro_batches = [[train_set[i] for i in mb] for mb in order.micro_batches(step)]
            mine, weights = distributed.my_micro_batches(micro_batches, rank, world, lockstep=bool(fsdp))
            if world > 1:
                distributed.seed_step(cfg.seed, step, rank)
            loss_sum, step_tokens = accumulate_step(
                loss_model, mine, lambda mb: to_device(collate(mb)), accelerator.backward, accelerator.autocast,
                no_sync,
                lambda: adapter.penalty(model), cfg.replay_beta, cfg.replay_ce,
                sum(batching.trained_tokens(mb) for mb in micro_batches), world, weight=weights)
            if fsdp:
                sharding.all_reduce_gradients(params, world)
            if world > 1:  # every process decides from the same numbers: the step's loss, tokens, a stop signal
                loss_sum, step_tokens = distributed.reduce([loss_sum, step_tokens], accelerator.device)
                step_tokens = int(step_tokens)
                signum = int(distributed.reduce([float(stop.signum or 0)], accelerator.device, op="max")[0])
                stop.signum = stop.signum or signum or None
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            done = step + 1
            if not finite(loss_sum, float(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                last = (checkpoint.list_checkpoints(cfg.output_dir) or ["none yet"])[-1]
                if cfg.nan_policy == "stop":
                    raise PeftuneError(f"non-finite loss or gradient at step {done} (loss sum {loss_sum}, gradient "
                                       f"norm {float(grad_norm)}); stopped. Last good checkpoint: {last}. Lower "
                                       "learning_rate, or set nan_policy: skip")
                say(f"warning: non-finite loss or gradient at step {done}; step skipped")
            else:
                optimizer.step()
                adapter.after_optimizer_step(accelerator.unwrap_model(model), done)
                optimizer.zero_grad(set_to_none=True)
                counters["window_loss"] += loss_sum
                counters["window_tokens"] += step_tokens
            scheduler.step()
            counters["step"] = done
            counters["tokens"] += sum(len(s["input_ids"]) for mb in micro_batches for s in mb)
            counters["elapsed"] = time.perf_counter() - start
            if main and cfg.torch_compile and step == first_step:  # counted in tokens/s like any other step
                bar.write(f"torch_compile: the first step took {counters['elapsed'] - elapsed_before:.1f} s "
                          "(compiling the decoder layers; later shapes may compile again)")
            faults.point("after_step", done)
            record = {"step": done, "epoch": round(done / per_epoch, 4),
                      "loss": counters["window_loss"] / max(counters["window_tokens"], 1),
                      "lr": scheduler.get_last_lr()[0], "tokens": counters["tokens"],
                      "elapsed_s": round(counters["elapsed"], 3), "eval_s": round(counters["eval_s"], 3),
                      "tokens_per_s": training_rate(counters)}
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if val_set and (done % cfg.eval_steps == 0 or done == steps):
                faults.point("in_eval", done)
                eval_start = time.perf_counter()
                counters["eval_loss"] = record["eval_loss"] = evaluate(
                    model, val_set, cfg.micro_batch_size, lambda c: to_device(collate(c)),
                    sharded=loss_model if fsdp else None)
                counters["eval_s"] += time.perf_counter() - eval_start
                if main:
                    bar.write(f"step {done}: eval_loss {record['eval_loss']:.4f}")
            if main and (done % cfg.logging_steps == 0 or done == steps or "eval_loss" in record):
                log.write(record)
            if done % cfg.logging_steps == 0 or done == steps:
                counters["window_loss"], counters["window_tokens"] = 0.0, 0
            due = (cfg.save_steps and done % cfg.save_steps == 0) or done % per_epoch == 0
            if main and (due or stop.signum or done == steps):  # the last step too: a finished run can be extended
                checkpoint.save_checkpoint(cfg.output_dir, done, accelerator.unwrap_model(model), optimizer,
                                           scheduler, counters, fingerprint, cfg.save_total_limit, adapter)
            if stop.signum:
                bar.close()
                raise TrainingInterrupted(f"stopped by signal {stop.signum} after step {done}; checkpoint written",
                                          stop.exit_code)
    bar.close()
    release_blocks()  # the fused loss's buffers
    train_time = time.perf_counter() - start
    tokens, eval_loss = counters["tokens"], counters["eval_loss"]

    # 4. the adapter, verified, in the PEFT layout
    counters["elapsed"] = train_time
    result = {"precision": precision, "steps": steps, "tokens": tokens, "train_time_s": round(train_time, 2),
              "eval_time_s": round(counters["eval_s"], 2), "tokens_per_s": training_rate(counters),
              "eval_loss": eval_loss,
              "trainable_parameters": trainable, "base_model_bytes": base_bytes}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        paths = adapters.save_adapter(unwrapped, cfg.output_dir, initial, adapter.save_pretrained)
        result["adapter_bytes"] = sum(os.path.getsize(p) for p in paths)
        adapter.close()
        log.close()
        curves.plot(metrics_path, os.path.join(cfg.output_dir, "curves.png"))
        if cfg.peft_method in FULL_MODEL:
            say(f"model: {cfg.output_dir} ({adapters.human_bytes(result['adapter_bytes'])}, a whole model: use it "
                f"as --base_model {cfg.output_dir})")
        else:
            say(f"adapter: {cfg.output_dir} ({adapters.human_bytes(result['adapter_bytes'])}; the base model is "
                f"{adapters.human_bytes(base_bytes)}, {base_bytes / result['adapter_bytes']:.0f}x larger)")
        say(f"trained {tokens:,} tokens in {train_time - counters['eval_s']:.1f} s ({result['tokens_per_s']:.0f} "
            f"tokens/s, as in metrics.jsonl; evaluation took another {counters['eval_s']:.1f} s)"
            + (f", final eval_loss {eval_loss:.4f}" if eval_loss is not None else ""))
    accelerator.wait_for_everyone()  # the others exit once the adapter is written
    accelerator.end_training()
    return result
