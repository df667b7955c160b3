"""Teacher-forced scores of answers under the base (adapter off) and the tuned model at several adapter scales: per
sample the summed negative log-likelihood of its labelled tokens, and the summed KL(base ‖ tuned) over them. One
model in memory: the base's distribution is the same model with the adapter switched off (peft's
`disable_adapter`), the scaled ones through peft's `rescale_adapter_scale` (LoRA-family adapters)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.batching import collate_padded
from ..data.render import IGNORE
from ..train.loss import causal_lm_parts, final_hidden


@dataclass
class Scores:
    tokens: list[int] = field(default_factory=list)  # labelled tokens per sample
    nll: dict[float, list[float]] = field(default_factory=dict)  # scale -> per-sample sums (scale 0: the base)
    kl: dict[float, list[float]] = field(default_factory=dict)  # scale -> per-sample sums of KL(base ‖ scaled)

    def per_token(self, what: str, scale: float) -> float:
        return sum(getattr(self, what)[scale]) / max(1, sum(self.tokens))


def scalable(model) -> bool:
    """Whether peft's rescale_adapter_scale applies (LoRA-family layers)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in model.modules())


def _scaled(model, scale: float):
    if scale == 1:
        return contextlib.nullcontext()
    from peft.helpers import rescale_adapter_scale

    return rescale_adapter_scale(model, float(scale))


def _base(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.inference_mode()
def score(model, samples: list[dict], scales: list[float], pad_id: int, micro_batch: int = 8,
          progress=None, base_model=None) -> Scores:
    """samples: [{"input_ids", "labels"}] (IGNORE where nothing is scored). Scale 0 is always included (the base);
    without an adapter every scale is the base. `base_model`: a whole tuned model (`model`, full/freeze) is scored
    against this separate base, at scales 0 (the base) and 1 (the tuned model) only."""
    adapted = hasattr(model, "disable_adapter") or base_model is not None
    scales = sorted({0.0, *map(float, scales)})
    out = Scores(nll={s: [] for s in scales}, kl={s: [] for s in scales})
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))  # little padding per batch
    for start in range(0, len(samples), micro_batch):
        chunk = [samples[i] for i in order[start: start + micro_batch]]
        batch = collate_padded(chunk, pad_id)
        keep = batch["targets"] != IGNORE
        owner = keep.nonzero()[:, 0]  # the sample of each scored position
        targets = batch["targets"][keep]

        def logprobs(m=model):
            return F.log_softmax(causal_lm_parts(m)[1](final_hidden(m, batch)[keep]).float(), dim=-1)

        if base_model is not None:
            base = logprobs(base_model)
        else:
            with _base(model):
                base = logprobs()
        p_base = base.exp()
        out.tokens += keep.sum(dim=1).tolist()
        for s in scales:
            if s == 0 or not adapted:
                lp = base
            else:
                with _scaled(model, s):
                    lp = logprobs()
            nll = -lp.gather(1, targets[:, None])[:, 0]
            kl = (p_base * (base - lp)).sum(dim=-1).clamp_min(0)
            for what, values in (("nll", nll), ("kl", kl)):
                sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, owner, values.double())
                getattr(out, what)[s] += sums.tolist()
        if progress:
            progress(len(chunk))
    back = sorted(range(len(samples)), key=order.__getitem__)  # position of each sample in the sorted order
    out.tokens = [out.tokens[k] for k in back]
    for table in (out.nll, out.kl):
        for s in table:
            table[s] = [table[s][k] for k in back]
    return out
