"""The one config schema: every field is written once (name, type, default, help) and feeds YAML files,
`--key value` overrides, `peftune train --help` and docs/config.md (those are read and written by options.py)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import PeftuneError

# report_to's trackers (Accelerate's names) -> the packages that provide them (the first is the one to install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}

EMBEDDED_MODEL = "smollm2-135m-instruct"
FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion", "text")
SOURCE_KEYS = {"path": "a data file (.json, .jsonl, .csv, .parquet), a `save_to_disk` directory, or a hub dataset id",
               "format": "alpaca, sharegpt, openai, prompt_completion or text (detected when not given)",
               "columns": "your field names for ours, e.g. {instruction: question, output: answer}",
               "max_samples": "use at most this many rows of it (a seeded random choice)",
               "weight": "repeat its training rows this many times (fractions allowed: 1.5 = all once, half twice)"}


class DataSource:
    """A `data_path` entry: a file path, or a mapping with the keys in SOURCE_KEYS."""


PREFIX_INIT_TEXT = ("You are a helpful, honest assistant. Answer the user's questions clearly and accurately, in "
                    "the language they use.")
PEFT_METHODS = ("lora", "adalora", "ia3", "loha", "lokr", "prefix_tuning", "prompt_tuning", "p_tuning", "full",
                "freeze")
FULL_MODEL = ("full", "freeze")  # baselines that train the model's own weights and save a whole model
LORA_LIKE = ("lora", "adalora", "loha", "lokr")
VIRTUAL_TOKENS = ("prefix_tuning", "prompt_tuning", "p_tuning")


def _f(default: Any, help: str, choices: Optional[tuple] = None, methods: Optional[tuple] = None) -> Any:
    """A config field carrying its help text (and allowed values) once. `methods`: the peft_method values the key
    applies to; set to anything but its default under another method, it is refused."""
    if methods:
        help = f"{help} [{', '.join(methods)}]"
    meta = {"help": help, "choices": choices, "methods": methods}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model and data ---
    base_model: str = _f(EMBEDDED_MODEL, "Base model: `smollm2-135m-instruct` (embedded, works offline), a HF hub id, "
                         "a local HF model directory, or a .gguf file.")
    data_path: list[DataSource] = _f([], "Training data: files (.json, .jsonl, .csv, .parquet), `save_to_disk` "
                                     "directories or hub dataset ids, concatenated; formats alpaca, sharegpt, openai, "
                                     "prompt_completion, text are detected. An entry may be a mapping {path, format, "
                                     "columns, max_samples, weight} to map fields and mix sources.")
    val_data_path: list[DataSource] = _f([], "Validation data of its own (same forms as data_path); when given, "
                                         "val_set_size is not drawn from the training data.")
    skip_bad_rows: bool = _f(False, "Skip invalid rows (reporting how many and which) instead of stopping.")
    data_vars: dict[str, str] = _f({}, "Values for `{{placeholders}}` in the data, e.g. `--data_vars.name Aurora`.")
    output_dir: str = _f("output", "Where the adapter, config.yaml and metrics.jsonl are written.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir (its old run files are replaced).")
    prompt_template: str = _f("auto", "How rows become text: `chat` (the model's own chat template), `alpaca`, "
                              "`alpaca_short`, or a path to a template .json; `auto` = chat if the model has one, "
                              "else alpaca.")
    system_prompt: Optional[str] = _f(None, "The run's default system message: training rows that have none get it, and "
                                      "`peftune chat` (and the server) use it for this adapter unless given another. "
                                      "`{{placeholders}}` are filled from data_vars. Empty = the chat template's own "
                                      "default (SmolLM2's names SmolLM).")
    tool_format: str = _f("auto", "Rows with tools and tool calls: `auto` renders them with the chat template's own tool "
                          "support when it has any, else in peftune's tool format (definitions in the system turn, "
                          "calls as <tool_call>{json}</tool_call>, results as a user turn; docs/tools.md); `peftune` "
                          "always uses peftune's format; `native` only the template's (refuses rows otherwise).",
                          ("auto", "native", "peftune"))
    cutoff_len: int = _f(512, "Maximum tokens per sample; longer conversations are truncated (and lose their EOS); "
                         "plain text is cut into cutoff_len pieces.")
    train_on_inputs: bool = _f(False, "Also train on the prompt tokens (default: the loss covers only the responses).")
    mask_history: bool = _f(False, "In multi-turn conversations train on the last assistant turn only.")
    add_eos_token: bool = _f(True, "End every response with the EOS token so the model learns to stop.")
    val_set_size: float = _f(0.05, "Held-out validation rows: a count (>= 1) or a fraction of the rows (< 1); 0 = none.")
    # --- the forgetting guard (docs/eval.md measures it) ---
    replay: float = _f(0, "Replay: the base model's own greedy answers to general prompts, mixed into training so the "
                       "tuned model keeps what the base knew. A row count (>= 1) or a share of the training rows "
                       "(< 1: 0.25 adds a quarter as many); 0 = off. Generated once before training (progress shown) "
                       "and cached per base model and prompts.")
    replay_data: Optional[str] = _f(None, "Replay's prompts: a data file in any data_path format (each row's "
                                    "conversation up to its last user turn is asked); empty = the built-in 220 "
                                    "general prompts (disjoint from `peftune eval`'s probe).")
    replay_max_tokens: int = _f(128, "Longest base answer generated for replay, in tokens.")
    replay_beta: float = _f(0.0, "Weight of a KL(base || tuned) term on the replay answers' tokens, the base's "
                            "distribution computed with the adapter switched off (no second model in memory); "
                            "0 = replay trains on the base's answers by cross-entropy alone.")
    replay_ce: bool = _f(True, "Train the replay answers' tokens by cross-entropy on the base's greedy tokens. false: "
                         "by the replay_beta KL term alone (distillation of the base's whole distribution, which "
                         "does not sharpen the model onto its greedy answers); needs replay_beta > 0.")
    # --- optimisation (alpaca-lora's names) ---
    batch_size: int = _f(16, "Global batch size in samples per optimizer step (gradient accumulation = "
                         "batch_size / micro_batch_size / processes).")
    micro_batch_size: int = _f(4, "Samples per forward/backward pass on each process.")
    num_epochs: float = _f(3.0, "Passes over the training rows (fractions allowed).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps (overrides num_epochs when reached first).")
    learning_rate: Optional[float] = _f(None, "Peak learning rate of AdamW; empty = the chosen peft_method's default "
                                        "(lora, loha, lokr 3e-4; adalora 1e-3; ia3 3e-3; p_tuning 1e-3; "
                                        "prefix_tuning 1e-2; prompt_tuning 3e-2).")
    lr_scheduler: str = _f("cosine", "Learning-rate decay after warmup.", ("cosine", "linear", "constant"))
    warmup_steps: Optional[int] = _f(None, "Warmup optimizer steps (overrides warmup_ratio).")
    warmup_ratio: float = _f(0.05, "Warmup as a fraction of all optimizer steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value; 0 = no clipping.")
    group_by_length: bool = _f(False, "Draw micro-batches of similar lengths (less padding when packing is off).")
    packing: bool = _f(True, "Padding-free batches: a micro-batch's samples are concatenated in one row with "
                       "restarting position ids; attention never crosses samples.")
    mixed_precision: str = _f("auto", "`auto` (bf16 on GPUs and CPUs that support it, fp16 on older GPUs, else fp32), "
                              "`no` (fp32), `bf16`, `fp16`. Adapter weights and optimizer state stay fp32.",
                              ("auto", "no", "bf16", "fp16"))
    release_memory: bool = _f(True, "On Linux CPUs, return freed activation buffers to the OS at once (fixed 1 MB "
                              "mmap threshold): peak RSS 3.86 -> 3.43 GB in the speed benchmark, up to ~8 % slower.")
    fast_dropout: bool = _f(True, "On CPUs, draw the adapters' dropout masks 64 random bits at a time (4x fewer draws "
                            "than nn.Dropout's bernoulli, p rounded to 1/32768): the same law, another random stream "
                            "(docs/speed.md). false = peft's nn.Dropout.")
    fuse_projections: bool = _f(False, "One matmul for each layer's frozen q/k/v projections and one for gate/up "
                                "(concatenated weights, each LoRA branch on its slice): the same model up to float "
                                "rounding (docs/speed.md). Adapter methods on an unquantized base.")
    cast_weights_once: bool = _f(True, "When training in bf16 or fp16: the frozen base's linear weights and the output "
                                 "head are cast once (kept beside the fp32 weights, half their size) instead of by "
                                 "autocast on every forward; the same numbers, bit for bit (docs/speed.md). Not under "
                                 "FSDP.")
    packed_attention: str = _f("sdpa", "With packing, how each packed sample's causal attention is computed: `sdpa` "
                               "(torch's scaled_dot_product_attention) or `matmul` (samples of up to 512 tokens as "
                               "matmul, fp32 softmax, matmul: other rounding; 11-14 % off a profiled bf16 step on a "
                               "CPU, no gain in benchmarks/speed.py; docs/speed.md).", choices=("sdpa", "matmul"))
    attention_fp32: bool = _f(True, "On CPUs, when training in bf16 or fp16 with packing: each packed sample's "
                              "attention is computed in fp32 (torch's CPU attention backward is slower in bf16; the "
                              "queries and keys are fp32 already after the rotary embedding): more precise, other "
                              "rounding than the bf16 kernel (docs/speed.md). No effect on GPUs.")
    fused_loss: bool = _f(True, "The output head's cross-entropy and its gradient computed together in the forward "
                          "pass, block by block (no logits kept or recomputed for the backward pass): the same loss, "
                          "other rounding of the gradient under bf16/fp16 (docs/speed.md). false = autograd's.")
    fused_lora: bool = _f(True, "Each plain LoRA linear layer's forward and backward as one autograd function (the "
                          "base matmul, the adapter's two, the dropout mask folded into the scaling): fewer casts and "
                          "elementwise passes; the same model, other rounding under bf16/fp16 (docs/speed.md). Not with "
                          "torch_compile or FSDP.")
    fused_norm: bool = _f(True, "The decoder's RMSNorms (LLaMA, Mistral, Qwen2/3) as one autograd function that writes "
                          "its output once in the autocast dtype, so q/k/v and gate/up share one cast: the same "
                          "forward values, other rounding of the gradient (docs/speed.md). Not with torch_compile or "
                          "FSDP.")
    fused_rotary: bool = _f(True, "The rotary position embedding of LLaMA's queries and keys as one autograd function "
                            "(fewer elementwise passes, no zero-filled slices): the same forward values, the gradient "
                            "rounded once (docs/speed.md). Not with torch_compile or FSDP.")
    torch_compile: bool = _f(False, "torch.compile each decoder layer (regional, dynamic shapes; per-sample attention "
                             "and the dropout's bit draw stay eager): the same model up to float rounding; the first "
                             "steps include the compile time (docs/speed.md). Not with fuse_projections or FSDP.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less memory, about a "
                                      "third slower.")
    num_processes: int = _f(1, "Train on this many processes of this machine (DDP through Accelerate, started with "
                            "torch's own launcher): the same adapter as one process, up to float rounding "
                            "(docs/distributed.md). Under torchrun or `accelerate launch` their count rules (1 or the "
                            "same number here).")
    seed: int = _f(42, "Random seed (data order, validation split, adapter init, dropout).")
    # --- adapter: the method and its own settings (docs/methods.md compares them) ---
    peft_method: str = _f("lora", "The PEFT method: `lora` (with the use_dora / use_rslora / lora_init / "
                          "loraplus_lr_ratio variants), `adalora`, `ia3`, `loha`, `lokr` (weights added to the "
                          "model's layers), `prefix_tuning`, `prompt_tuning`, `p_tuning` (learned virtual tokens); or "
                          "the baselines PEFT is measured against: `full` (every weight trained) and `freeze` (only "
                          "the last freeze_trainable_layers decoder layers), which save a whole model in safetensors.",
                          PEFT_METHODS)
    freeze_trainable_layers: int = _f(2, "Freeze: how many of the last decoder layers are trained (the rest of the "
                                      "model, embeddings and head included, stays frozen).", methods=("freeze",))
    lora_r: int = _f(16, "Rank of the low-rank update.", methods=("lora", "loha", "lokr"))
    lora_alpha: float = _f(32, "Scaling numerator: the update is scaled by lora_alpha / lora_r "
                           "(lora_alpha / sqrt(lora_r) with use_rslora).", methods=LORA_LIKE)
    lora_dropout: float = _f(0.05, "Dropout on the adapter's input.", methods=("lora", "adalora"))
    lora_target_modules: list[str] = _f(["all-linear"], "Modules that get the adapter: names (q_proj,v_proj …) or "
                                        "`all-linear`.", methods=LORA_LIKE)
    use_dora: bool = _f(False, "DoRA: split each update into magnitude and direction (better at low rank; about 2x "
                        "slower per token on a CPU, docs/methods.md).", methods=("lora",))
    use_rslora: bool = _f(False, "rsLoRA: scale by lora_alpha / sqrt(lora_r), which keeps high ranks learning.",
                          methods=("lora",))
    lora_init: str = _f("default", "How LoRA starts: `default` (B = 0, A Kaiming-uniform), `gaussian`, "
                        "`orthogonal`, `pissa` (principal singular vectors; exact SVD), `pissa_niter_4` (fast SVD), "
                        "`olora` (QR). pissa/olora change the frozen base weights while training; the saved "
                        "adapter is converted so it works on the original base (its rank doubles).",
                        ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_4", "pissa_niter_16", "olora"),
                        methods=("lora",))
    loraplus_lr_ratio: Optional[float] = _f(None, "LoRA+: train the B matrices at learning_rate x this ratio "
                                            "(16 is the paper's choice); empty = off.", methods=("lora",))
    adalora_init_r: int = _f(12, "AdaLoRA: rank every module starts with.", methods=("adalora",))
    adalora_target_r: int = _f(8, "AdaLoRA: average rank left after pruning (the budget).", methods=("adalora",))
    adalora_tinit: Optional[int] = _f(None, "AdaLoRA: optimizer steps before ranks are pruned; empty = 10 % of "
                                      "the steps.", methods=("adalora",))
    adalora_tfinal: Optional[int] = _f(None, "AdaLoRA: last optimizer steps trained with the final ranks fixed; "
                                       "empty = 20 % of the steps.", methods=("adalora",))
    adalora_delta_t: int = _f(1, "AdaLoRA: re-allocate ranks every this many optimizer steps.",
                              methods=("adalora",))
    adalora_beta1: float = _f(0.85, "AdaLoRA: EMA factor of the importance (sensitivity) scores.",
                              methods=("adalora",))
    adalora_beta2: float = _f(0.85, "AdaLoRA: EMA factor of their uncertainty.", methods=("adalora",))
    adalora_orth_reg_weight: float = _f(0.5, "AdaLoRA: weight of the orthogonality penalty on P and Q.",
                                        methods=("adalora",))
    ia3_target_modules: list[str] = _f([], "IA3: modules whose output (or input, for feed-forward ones) is "
                                       "rescaled; empty = peft's choice for the architecture (LLaMA: k_proj, "
                                       "v_proj, down_proj).", methods=("ia3",))
    ia3_feedforward_modules: list[str] = _f([], "IA3: which of ia3_target_modules are feed-forward (scaled on "
                                            "the input); empty = peft's choice (LLaMA: down_proj).",
                                            methods=("ia3",))
    num_virtual_tokens: int = _f(20, "Learned virtual tokens (prefix/prompt/p-tuning). These methods cannot pack "
                                 "samples, so they train on padded batches.", methods=VIRTUAL_TOKENS)
    prompt_tuning_init_text: Optional[str] = _f(None, "Prompt tuning: start the virtual tokens from the embedding "
                                                "of this text (e.g. a task description); empty = random.",
                                                methods=("prompt_tuning",))
    prefix_init_text: Optional[str] = _f(PREFIX_INIT_TEXT, "Prefix tuning: start the prefix from the keys/values "
                                         "the base computes for this text (repeated or cut to num_virtual_tokens "
                                         "tokens), so training starts from the base's behaviour; empty = random "
                                         "(peft's init: the demo's validation loss 3.80 instead of 1.72 after 320 "
                                         "examples, docs/methods.md). Unused with prefix_projection.",
                                         methods=("prefix_tuning",))
    encoder_hidden_size: Optional[int] = _f(None, "Hidden size of the prompt encoder (p_tuning, prefix_tuning with "
                                            "prefix_projection); empty = the model's hidden size.",
                                            methods=("p_tuning", "prefix_tuning"))
    p_tuning_encoder: str = _f("MLP", "P-tuning: the prompt encoder, `MLP` or `LSTM`.", ("MLP", "LSTM"),
                               methods=("p_tuning",))
    prefix_projection: bool = _f(False, "Prefix tuning: produce the prefix through a 2-layer MLP (more parameters "
                                 "while training, same adapter size).", methods=("prefix_tuning",))
    load_in_4bit: bool = _f(False, "QLoRA: load the frozen base in 4-bit NF4 (double quantization, bf16 compute) "
                            "through bitsandbytes (`pip install 'peftune[qlora]'`); saves memory, not time.")
    load_in_8bit: bool = _f(False, "Load the frozen base in 8-bit (LLM.int8) through bitsandbytes.")
    # --- checkpoints and guards ---
    save_steps: int = _f(50, "Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every this many "
                         "optimizer steps and at the end of each epoch; 0 = only at epoch ends.")
    save_total_limit: int = _f(2, "Keep the newest this many checkpoints.")
    resume_from_checkpoint: Optional[str] = _f(None, "`auto` (the newest complete checkpoint in output_dir) or a "
                                               "checkpoint directory: continue exactly where that run stopped.")
    nan_policy: str = _f("stop", "On a non-finite loss or gradient: `stop` (name the step; checkpoints stay intact) "
                         "or `skip` that optimizer step.", ("stop", "skip"))
    # --- logging and evaluation ---
    eval_steps: int = _f(50, "Evaluate the validation loss every this many optimizer steps (and at the end).")
    logging_steps: int = _f(5, "Write a metrics.jsonl line every this many optimizer steps.")
    report_to: str = _f("none", "Also send metrics to trackers (via Accelerate), comma-separated: `none`, "
                        "`tensorboard` (event files under output_dir/runs), `mlflow` (a local output_dir/mlruns unless "
                        "MLFLOW_TRACKING_URI is set), `wandb` (offline under output_dir unless WANDB_MODE is set). "
                        "The tracker's package must be installed.")
    trust_remote_code: bool = _f(False, "Run model code shipped with a hub model (off unless you trust it).")

    # ---------------------------------------------------------------- validation
    def trackers(self) -> list[str]:
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]

    def check_trackers(self) -> None:
        """Each report_to tracker is known and its package installed (Accelerate only warns, and reports nothing)."""
        for tracker in self.trackers():
            if tracker not in TRACKERS:
                raise PeftuneError(f"report_to: {tracker!r} is not a tracker; use none or some of "
                                   f"{', '.join(TRACKERS)}" + _suggest(tracker, TRACKERS))
            if not any(importlib.util.find_spec(m) for m in TRACKERS[tracker]):
                raise PeftuneError(f"report_to {tracker}: the package {TRACKERS[tracker][0]} is not installed "
                                   f"(pip install {TRACKERS[tracker][0]}), so nothing would be reported; install it "
                                   "or set report_to: none")

    def validate(self, num_processes: int = 1) -> None:
        if not self.data_path:
            raise PeftuneError("data_path: give at least one data file (e.g. `--data_path data/alpaca_en_demo.json`)")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise PeftuneError("save_steps must be >= 0 and save_total_limit >= 1")
        for name in ("batch_size", "micro_batch_size", "cutoff_len", "lora_r", "eval_steps", "logging_steps",
                     "adalora_init_r", "adalora_target_r", "adalora_delta_t", "num_virtual_tokens", "num_processes"):
            if getattr(self, name) < 1:
                raise PeftuneError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size % (self.micro_batch_size * num_processes):
            raise PeftuneError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
                f" x processes ({num_processes}) = {self.micro_batch_size * num_processes}")
        if self.num_epochs <= 0 and not self.max_steps:
            raise PeftuneError(f"num_epochs: must be > 0, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PeftuneError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise PeftuneError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.val_set_size < 0 or (self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size)):
            raise PeftuneError(f"val_set_size: a row count (>= 1) or a fraction (< 1), got {self.val_set_size}")
        if self.replay < 0 or (self.replay >= 1 and self.replay != int(self.replay)):
            raise PeftuneError(f"replay: a row count (>= 1), a share of the training rows (< 1) or 0, got {self.replay}")
        if self.replay_beta < 0:
            raise PeftuneError(f"replay_beta: must be >= 0, got {self.replay_beta}")
        if self.replay_beta and not self.replay:
            raise PeftuneError("replay_beta weighs a KL term on the replay rows: set replay too (e.g. --replay 0.25)")
        if not self.replay_ce and not self.replay_beta:
            raise PeftuneError("replay_ce: false trains the replay rows by the KL term alone: set replay_beta > 0 too")
        if self.torch_compile and self.fuse_projections:
            raise PeftuneError("torch_compile with fuse_projections is not supported (the fused projections keep "
                               "their shared product in Python state between the q, k and v calls; untested under "
                               "compile): choose one")
        if self.replay_max_tokens < 1:
            raise PeftuneError(f"replay_max_tokens: must be >= 1, got {self.replay_max_tokens}")
        if not 0 <= self.warmup_ratio < 1:
            raise PeftuneError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise PeftuneError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PeftuneError(f"{f.name}: must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}"
                                   + _suggest(str(getattr(self, f.name)), choices))
        foreign = [f for f in dataclasses.fields(self) if f.metadata.get("methods")
                   and self.peft_method not in f.metadata["methods"] and getattr(self, f.name) != field_default(f)]
        if foreign:
            owners = "; ".join(f"{f.name} is for {', '.join(f.metadata['methods'])}" for f in foreign)
            raise PeftuneError(f"{', '.join(f.name for f in foreign)}: not used by peft_method {self.peft_method} "
                               f"({owners}); remove {'it' if len(foreign) == 1 else 'them'} or choose that method")
        self.check_trackers()
        if self.adalora_target_r > self.adalora_init_r:
            raise PeftuneError(f"adalora_target_r ({self.adalora_target_r}) cannot exceed adalora_init_r "
                               f"({self.adalora_init_r}): AdaLoRA only prunes ranks")
        for name in ("adalora_beta1", "adalora_beta2"):
            if not 0 < getattr(self, name) < 1:
                raise PeftuneError(f"{name}: must be in (0, 1), got {getattr(self, name)}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise PeftuneError(f"loraplus_lr_ratio: must be > 0, got {self.loraplus_lr_ratio}")
        if self.prefix_projection and self.prefix_init_text not in (None, "", PREFIX_INIT_TEXT):
            raise PeftuneError("prefix_init_text sets the prefix itself; prefix_projection computes it with an MLP: "
                               "choose one")
        if self.peft_method in FULL_MODEL and (self.load_in_4bit or self.load_in_8bit):
            raise PeftuneError(f"peft_method {self.peft_method} trains the model's own weights, which cannot be "
                               "quantized: drop load_in_4bit/load_in_8bit (or use lora for QLoRA)")
        if self.peft_method in FULL_MODEL and self.replay_beta:
            raise PeftuneError(f"replay_beta needs the base's distribution with the adapter switched off; "
                               f"peft_method {self.peft_method} has no adapter (it would need a second model): use "
                               "replay alone")
        if self.freeze_trainable_layers < 1:
            raise PeftuneError(f"freeze_trainable_layers: must be >= 1, got {self.freeze_trainable_layers}")
        if self.load_in_4bit and self.load_in_8bit:
            raise PeftuneError("load_in_4bit and load_in_8bit: choose one")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_default(f) -> Any:
    """A TrainConfig field's default value (its factory's result for lists and dicts)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""
