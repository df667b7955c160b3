"""`peft_method` → a peft config, and the few things the training loop does differently per method.

Everything a method needs is peft's own: its config classes, `get_peft_model`, `update_and_allocate` (AdaLoRA),
`create_loraplus_optimizer` (LoRA+), `path_initial_model_for_weight_conversion` (PiSSA/OLoRA). Two things are
written here because peft offers them only inside its own `forward(labels=...)`, which our chunked loss bypasses:
AdaLoRA's orthogonality penalty (`orth_penalty`) and the virtual-token forward that returns hidden states
(`train.loss.forward_loss_sum` asks peft's forward for them instead of full logits).
"""

from __future__ import annotations

import os
import shutil

import torch

from .config import FULL_MODEL, VIRTUAL_TOKENS, TrainConfig
from .errors import PeftuneError

DEFAULT_LR = {"lora": 3e-4, "loha": 3e-4, "lokr": 3e-4, "adalora": 1e-3, "ia3": 3e-3, "p_tuning": 1e-3,
              "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "full": 2e-5, "freeze": 1e-4}
CONVERTED_INITS = ("pissa", "olora")  # inits that move the base weights: saved adapters are converted back


def learning_rate(cfg: TrainConfig) -> float:
    return cfg.learning_rate if cfg.learning_rate is not None else DEFAULT_LR.get(cfg.peft_method, 3e-4)


def uses_virtual_tokens(cfg: TrainConfig) -> bool:
    """Prefix/prompt/p-tuning put learned tokens before every sample, so samples cannot be packed in one row."""
    return cfg.peft_method in VIRTUAL_TOKENS


def has_virtual_tokens(model) -> bool:
    """Whether a (peft) model's active adapter is a prefix/prompt/p-tuning one."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def adalora_schedule(cfg: TrainConfig, steps: int) -> tuple[int, int]:
    tinit = cfg.adalora_tinit if cfg.adalora_tinit is not None else int(0.1 * steps)
    tfinal = cfg.adalora_tfinal if cfg.adalora_tfinal is not None else int(0.2 * steps)
    if tinit >= steps - tfinal:
        raise PeftuneError(f"adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) leave no rank-pruning phase in "
                           f"{steps} optimizer steps; lower them or train longer")
    return tinit, tfinal


def _targets(names: list[str]):
    return "all-linear" if names == ["all-linear"] else names


def peft_config(cfg: TrainConfig, steps: int, model_path: str):
    """The peft config object for cfg.peft_method (TaskType CAUSAL_LM)."""
    import peft

    task = peft.TaskType.CAUSAL_LM
    m = cfg.peft_method
    if m == "lora":
        init = {"default": True}.get(cfg.lora_init, cfg.lora_init)
        return peft.LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=_targets(cfg.lora_target_modules), bias="none", use_dora=cfg.use_dora,
                               use_rslora=cfg.use_rslora, init_lora_weights=init)
    if m == "adalora":
        tinit, tfinal = adalora_schedule(cfg, steps)
        return peft.AdaLoraConfig(task_type=task, init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r,
                                  tinit=tinit, tfinal=tfinal, deltaT=cfg.adalora_delta_t, beta1=cfg.adalora_beta1,
                                  beta2=cfg.adalora_beta2, orth_reg_weight=cfg.adalora_orth_reg_weight,
                                  total_step=steps, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=_targets(cfg.lora_target_modules))
    if m in ("loha", "lokr"):
        cls = peft.LoHaConfig if m == "loha" else peft.LoKrConfig
        return cls(task_type=task, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=_targets(cfg.lora_target_modules))
    if m == "ia3":
        return peft.IA3Config(task_type=task, target_modules=cfg.ia3_target_modules or None,
                              feedforward_modules=cfg.ia3_feedforward_modules or None)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.prefix_projection,
                                       **({"encoder_hidden_size": cfg.encoder_hidden_size}
                                          if cfg.encoder_hidden_size else {}))
    if m == "prompt_tuning":
        text = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
                "tokenizer_name_or_path": model_path} if cfg.prompt_tuning_init_text else {}
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, **text)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                        encoder_reparameterization_type=cfg.p_tuning_encoder,
                                        **({"encoder_hidden_size": cfg.encoder_hidden_size}
                                           if cfg.encoder_hidden_size else {}))
    raise PeftuneError(f"peft_method {m}: unknown")  # TrainConfig.validate refuses it first


class Adapter:
    """A peft model plus the per-method steps around it: optimizer, after-step hook, penalty, extra state, save."""

    def __init__(self, cfg: TrainConfig, steps: int, model_path: str, tokenizer):
        self.cfg, self.steps, self.model_path, self.tokenizer = cfg, steps, model_path, tokenizer
        self.init_dir: str | None = None  # PiSSA/OLoRA: the adapter as initialised (recreated identically on resume)

    def attach(self, base):
        from peft import get_peft_model

        if self.cfg.peft_method in FULL_MODEL:
            return train_own_weights(base, None if self.cfg.peft_method == "full" else self.cfg.freeze_trainable_layers)

        if self.cfg.load_in_4bit or self.cfg.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
        try:
            model = get_peft_model(base, peft_config(self.cfg, self.steps, self.model_path))
        except ValueError as e:  # e.g. target modules not in the model
            keys = "lora_target_modules" if self.cfg.peft_method != "ia3" else "ia3_target_modules"
            raise PeftuneError(f"peft_method {self.cfg.peft_method} ({keys}): {str(e).splitlines()[0]}") from None
        if self.cfg.peft_method == "prefix_tuning" and self.cfg.prefix_init_text and not self.cfg.prefix_projection:
            init_prefix_from_text(model, self.tokenizer, self.cfg.prefix_init_text)
        if self.cfg.peft_method == "lora" and self.cfg.lora_init.startswith(CONVERTED_INITS):
            # the initial adapter, kept so the final one can be converted to plain LoRA on the untouched base
            self.init_dir = os.path.join(self.cfg.output_dir, "initial-adapter")
            shutil.rmtree(self.init_dir, ignore_errors=True)
            model.save_pretrained(self.init_dir, safe_serialization=True)
        return model

    def optimizer(self, model, lr: float):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.cfg.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=self.cfg.weight_decay,
                                             loraplus_lr_ratio=self.cfg.loraplus_lr_ratio)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)

    def penalty(self, model) -> torch.Tensor | None:
        """AdaLoRA's orthogonality regularizer, once per optimizer step (peft adds it inside forward(labels=...))."""
        if self.cfg.peft_method != "adalora" or self.cfg.adalora_orth_reg_weight == 0:
            return None
        return self.cfg.adalora_orth_reg_weight * orth_penalty(model)

    def after_optimizer_step(self, model, step: int) -> None:
        """AdaLoRA: update importance scores and prune ranks (needs the gradients: before zero_grad)."""
        if self.cfg.peft_method == "adalora":
            model.base_model.update_and_allocate(step)

    def state(self, model) -> tuple[dict, dict]:
        """Method state a checkpoint needs beyond the trainable weights: AdaLoRA's rank allocator."""
        if self.cfg.peft_method != "adalora":
            return {}, {}
        alloc = model.base_model.rankallocator
        tensors = {f"{kind}|{name}": t.detach().cpu().contiguous() for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                   for name, t in getattr(alloc, kind).items()}
        return {"rank_pattern": model.peft_config["default"].rank_pattern}, tensors

    def load_state(self, model, state: dict, tensors: dict) -> None:
        if self.cfg.peft_method != "adalora":
            return
        alloc = model.base_model.rankallocator
        alloc.reset_ipt()
        device = next(p for p in model.parameters() if p.requires_grad).device
        for key, t in tensors.items():
            kind, name = key.split("|", 1)
            getattr(alloc, kind)[name] = t.to(device)
        model.peft_config["default"].rank_pattern = state.get("rank_pattern")

    def save_pretrained(self, model, directory: str) -> None:
        """The PEFT layout (adapter_config.json + adapter_model.safetensors), loadable with PeftModel.from_pretrained
        on the original base."""
        if self.cfg.peft_method in FULL_MODEL:  # a whole model, with its tokenizer: a base_model of its own
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        elif self.init_dir:
            # the conversion loads the initial adapter with load_adapter(), which switches the whole model to eval
            # mode (no dropout for the rest of training); the mode is put back
            training = model.training
            model.save_pretrained(directory, safe_serialization=True,
                                  path_initial_model_for_weight_conversion=self.init_dir)
            model.train(training)
        else:
            model.save_pretrained(directory, safe_serialization=True)

    def close(self) -> None:
        if self.init_dir:
            shutil.rmtree(self.init_dir, ignore_errors=True)
            self.init_dir = None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList as long as config.num_hidden_layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise PeftuneError("peft_method freeze: cannot find this model's decoder layers")


def train_own_weights(model, last_layers: int | None):
    """`full` (last_layers None): every weight trains. `freeze`: only the last `last_layers` decoder layers do.
    No peft: these are the baselines the PEFT methods are compared against (docs/methods.md)."""
    model.requires_grad_(last_layers is None)
    if last_layers is not None:
        layers = decoder_layers(model)
        if last_layers > len(layers):
            raise PeftuneError(f"freeze_trainable_layers {last_layers}: the model has {len(layers)} decoder layers")
        for layer in layers[len(layers) - last_layers:]:
            layer.requires_grad_(True)
    return model


def orth_penalty(model) -> torch.Tensor:
    """Mean Frobenius distance of P Pᵀ and QᵀQ from the identity over AdaLoRA's A (P) and B (Q) matrices: the same
    formula as peft's AdaLoraModel.forward, which applies it only when it computes the loss itself."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


@torch.no_grad()
def init_prefix_from_text(model, tokenizer, text: str) -> None:
    """Start a prefix from the keys and values the frozen base computes for real text (Li & Liang 2021: such
    prefixes train better than random ones; peft initialises prefix tuning only randomly, though it offers text
    init for prompt tuning). The text is repeated or cut to num_virtual_tokens tokens; with this prefix the
    untrained adapter computes exactly what the base computes with the text before the input."""
    n = model.peft_config["default"].num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftuneError("prefix_init_text: the text has no tokens")
    ids = (ids * -(-n // len(ids)))[:n]
    cache = model.get_base_model()(input_ids=torch.tensor([ids], device=model.device), use_cache=True).cache
    # peft's layout (PeftModel.get_prompt): per virtual token, layer by layer, the key then the value of every head
    rows = [t[0].transpose(0, 1).reshape(n, -1) for layer in cache.layers for t in (layer.keys, layer.values)]
    embedding = model.prompt_encoder["default"].embedding.weight
    embedding.copy_(torch.cat(rows, dim=1).to(embedding.dtype))
