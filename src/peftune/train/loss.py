"""Cross-entropy over labelled positions only, in chunks.

Logits are computed only for positions that carry a target, block by block: with a frozen head (every adapter
method) LinearCrossEntropy computes each block's loss and gradient together in the forward pass (`fused_loss`);
otherwise each chunk is recomputed in the backward pass (activation checkpointing). Either way no [tokens x
vocabulary] fp32 tensor of the whole micro-batch is built. The sum
(not the mean) is returned: the caller divides by the trained tokens of the whole optimizer step, so gradient
accumulation weights every token equally (the 2024 transformers accumulation bug averaged per micro-batch).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batching import trained_tokens
from .cast_once import autocast_dtype, is_plain_linear, matmul_weight
from ..methods import has_virtual_tokens
from ..data.render import IGNORE

CHUNK = 1024  # tokens of logits alive at once (about 200 MB of fp32 logits for a 49k vocabulary)
FUSED_CHUNK = 256  # the fused loss's block: [256 x 49,152] fp32 logits, 50 MB (fastest of 32-1024 on a 2-core CPU)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


_BLOCKS: dict = {}


def _blocks(rows: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LinearCrossEntropy's [rows x vocabulary] buffers (logits in the matmul dtype, two fp32), kept from call to call:
    allocated afresh for every block they cost more than the arithmetic on them (release_memory's 1 MB mmap threshold
    hands each large buffer back to the OS, so every new one is page-faulted in: profiled, 32 ms to cast one block of
    256 x 49,152 logits to fp32 into a new tensor). One set is kept (about 125 MB for a 49k vocabulary), the largest
    asked for on that device and dtype."""
    key = (weight.device, weight.dtype, weight.shape[0])
    kept = _BLOCKS.get(key)
    if kept is None or kept[0].shape[0] < rows:
        _BLOCKS.clear()
        shape = (rows, weight.shape[0])
        kept = _BLOCKS[key] = (torch.empty(shape, dtype=weight.dtype, device=weight.device),
                               torch.empty(shape, device=weight.device), torch.empty(shape, device=weight.device))
    return kept


def release_blocks() -> None:
    """Frees LinearCrossEntropy's kept buffers (after training)."""
    _BLOCKS.clear()


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the logits `hidden @ weight.T` against `targets`, for a frozen `weight`, with the
    gradient for `hidden` computed in the forward pass block by block (softmax minus one-hot, times the weight): no
    logits are kept for the backward pass and none are recomputed there, which only scales the stored gradient
    ([tokens x d], fp32). Per block: one matmul, the cast to fp32, one log-softmax, one exp in place, the cast back
    and the matmul of the gradient; the autograd path (checkpointed `_chunk_loss`) also runs the negative
    log-likelihood's backward (a zero-filled [tokens x vocabulary] tensor and a scatter), the log-softmax's backward,
    and, past CHUNK tokens, the head's matmul and log-softmax a second time.

    The same arithmetic as autograd's except where the step's scale (1 / the step's tokens) enters: autograd
    multiplies it into the fp32 softmax before rounding to the matmul dtype, this function multiplies the product
    after (other bf16 rounding of the gradient; in fp32 equal up to float rounding, tested). Why by hand: torch has
    no fused linear cross-entropy, and Liger-Kernel's and Unsloth's are Triton kernels for GPUs."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        with torch.autocast(hidden.device.type, enabled=False):  # `weight` is already in the matmul dtype
            h = hidden.to(weight.dtype)
            grad = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            logits_block, fp32_block, log_probs_block = _blocks(min(chunk, targets.numel()), weight)
            for i in range(0, targets.numel(), chunk):
                t = targets[i:i + chunk, None]
                n = t.shape[0]
                logits = torch.mm(h[i:i + n], weight.t(), out=logits_block[:n])
                log_probs = torch.log_softmax(fp32_block[:n].copy_(logits), -1, out=log_probs_block[:n])
                total -= log_probs.gather(1, t).sum()
                probs = torch.exp(log_probs, out=fp32_block[:n])
                probs.scatter_add_(1, t, torch.full(t.shape, -1.0, device=t.device))  # softmax - one-hot
                grad[i:i + n] = logits.copy_(probs) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def lm_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                chunk: int = CHUNK, fused: bool = True) -> torch.Tensor:
    """Sum of token cross-entropies where targets != IGNORE. hidden: [..., d]; targets: [...]. `fused`: a frozen
    plain head's loss and gradient are computed together by LinearCrossEntropy (chunks of min(chunk, FUSED_CHUNK))."""
    keep = targets != IGNORE
    h, t = hidden[keep], targets[keep]
    if t.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph connected
    if getattr(lm_head, "bias", None) is not None or not is_plain_linear(lm_head):
        # an adapted or biased head: call the module itself (no chunk recompute)
        return sum(F.cross_entropy(lm_head(h[i:i + chunk]).float(), t[i:i + chunk], reduction="sum")
                   for i in range(0, t.numel(), chunk))
    weight = matmul_weight(lm_head)  # under autocast, a cast-once head's low-precision copy (cast_once.py)
    if fused and h.requires_grad and torch.is_grad_enabled() and not weight.requires_grad:
        dtype = autocast_dtype(h.device.type)  # a head that is not cast once: autocast's cast, once per call
        return LinearCrossEntropy.apply(h, weight if dtype is None else weight.to(dtype), t, min(chunk, FUSED_CHUNK))
    if t.numel() <= chunk:
        return _chunk_loss(h, weight, t)
    return sum(checkpoint(_chunk_loss, h[i:i + chunk], weight, t[i:i + chunk], use_reentrant=False)
               for i in range(0, t.numel(), chunk))


def causal_lm_parts(model):
    """(decoder body, output head) of a causal LM, unwrapping PEFT and DDP wrappers."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "get_decoder"):
        inner = inner.module  # DDP
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_decoder(), inner.get_output_embeddings()


def forward_loss_sum(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Runs the body without the full logits, then the chunked loss on labelled positions."""
    return lm_loss_sum(final_hidden(model, batch), causal_lm_parts(model)[1], batch["targets"], fused=fused)


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The last layer's hidden states [batch, tokens, d] of a batch, without computing any logits."""
    body, _ = causal_lm_parts(model)
    if has_virtual_tokens(model):
        # prefix/prompt/p-tuning: peft's own forward inserts the virtual tokens (or the prefix cache); it is asked for
        # the final hidden states and only one position of logits. Prompt tuning prepends positions: keep the last T.
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    logits_to_keep=1)
        return out.hidden_states[-1][:, -batch["input_ids"].shape[1]:]
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    return body(**kwargs, use_cache=False).last_hidden_state


def _chunk_kl(tuned: torch.Tensor, base: torch.Tensor, head) -> torch.Tensor:
    """Sum over positions of KL(base || tuned) between the two next-token distributions."""
    logits = (lambda h: F.linear(h, head)) if isinstance(head, torch.Tensor) else head
    return F.kl_div(F.log_softmax(logits(tuned).float(), -1), F.log_softmax(logits(base).float(), -1),
                    log_target=True, reduction="sum")


@contextlib.contextmanager
def adapter_off(model):
    """The base model's forward: peft's own switch (no second model in memory)."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "disable_adapter"):
        inner = inner.module  # DDP
    if not hasattr(inner, "disable_adapter"):
        raise ValueError("replay_beta needs an adapter to switch off")
    with inner.disable_adapter():
        yield


def kl_to_base_sum(model, batch: dict, hidden: torch.Tensor, chunk: int = CHUNK, base_batch: dict | None = None
                   ) -> torch.Tensor:
    """Sum of KL(base || tuned) over the positions of batch["kl_mask"] (the replay answers' tokens), in chunks
    recomputed in the backward pass like the loss. `hidden`: the tuned model's final hidden states of the batch.
    `base_batch`: the batch's replay samples alone, collated the same way: the base's forward runs on them only (a
    sample's hidden states do not depend on the others in its batch; their kl_mask positions come in the same order)."""
    mask = batch["kl_mask"]
    if not bool(mask.any()):
        return hidden.sum() * 0.0
    base_batch = base_batch if base_batch is not None else batch
    with torch.no_grad(), adapter_off(model):
        base = final_hidden(model, base_batch)[base_batch["kl_mask"]]
    tuned = hidden[mask]
    head = causal_lm_parts(model)[1]
    plain = getattr(head, "bias", None) is None and is_plain_linear(head)
    total = tuned.sum() * 0.0
    for i in range(0, tuned.shape[0], chunk):
        if plain:
            total = total + checkpoint(_chunk_kl, tuned[i:i + chunk], base[i:i + chunk], matmul_weight(head),
                                       use_reentrant=False)
        else:
            total = total + _chunk_kl(tuned[i:i + chunk], base[i:i + chunk], head)
    return total


class LossModel(torch.nn.Module):
    """The model with one micro-batch's training objective as its forward. The loss calls the decoder body directly
    (to skip the full logits), which would bypass a DDP or FSDP wrapper around the model itself, so the training loop
    wraps this module instead: the wrapper then sees the forward whose backward it synchronises. `module` is the
    model (the attribute the unwrapping helpers above look for). Returns (objective, cross-entropy sum, replay tokens
    left out of the reported loss). `lockstep`: every call runs the same sequence of layer forwards whatever the
    batch holds (FSDP). `fused_loss`: the head's cross-entropy through LinearCrossEntropy (lm_loss_sum)."""

    def __init__(self, module: torch.nn.Module, lockstep: bool = False, fused_loss: bool = True) -> None:
        super().__init__()
        self.module = module
        self.lockstep = lockstep
        self.fused_loss = fused_loss

    def forward(self, batch: dict, beta: float = 0.0, replay_ce: bool = True, base_batch: dict | None = None):
        model = self.module
        if beta and self.lockstep and not ("kl_mask" in batch and bool(batch["kl_mask"].any())):
            # lockstep (FSDP): every process must run the same layers in the same order, since each layer's forward
            # gathers its weights from all of them; a micro-batch without replay tokens still runs the base's
            # forward that the others run for their KL term (no gradient; its result is not used)
            with torch.no_grad(), adapter_off(model):
                final_hidden(model, batch)
        if beta and "kl_mask" in batch:
            hidden = final_hidden(model, batch)
            targets, excluded = batch["targets"], 0
            if not replay_ce:
                targets = targets.masked_fill(batch["kl_mask"], IGNORE)
                excluded = int(batch["kl_mask"].sum())
            loss_sum = lm_loss_sum(hidden, causal_lm_parts(model)[1], targets, fused=self.fused_loss)
            return loss_sum + beta * kl_to_base_sum(model, batch, hidden, base_batch=base_batch), loss_sum, excluded
        loss_sum = forward_loss_sum(model, batch, fused=self.fused_loss)
        return loss_sum, loss_sum, 0


def accumulate_step(model, micro_batches: list[list[dict]], collate, backward, forward_context=None,
                    sync_context=None, penalty=None, beta: float = 0.0,
                    replay_ce: bool = True, step_tokens: int | None = None, world: int = 1,
                    weight: float | list[float] = 1.0) -> tuple[float, int]:
    """Forward + backward over the micro-batches of one optimizer step. Each micro-batch's loss sum is divided by
    the trained tokens of the whole step, so the accumulated gradient equals that of one big batch. `penalty`
    (e.g. AdaLoRA's orthogonality term) is added once per step, not per micro-batch, and is not in the reported loss;
    likewise `beta` x the KL to the base on replay tokens (kl_to_base_sum). `replay_ce` False: the replay tokens are
    trained by that KL term alone (no cross-entropy on the base's greedy tokens); the reported loss and token count are
    then those of the other tokens. Every term is divided by all the step's trained tokens.

    `model`: a LossModel (or a DDP/FSDP wrapper of one), or a bare model. Several processes: each passes its own
    micro-batches, the trained tokens of the whole step over every process (`step_tokens`) and the number of
    processes (`world`: the wrapper averages gradients over them, so each loss is multiplied back); `weight` 0 (for
    all, or one per micro-batch): the micro-batch only stands in (distributed.py), its gradient is zero and it counts
    nowhere. Returns (summed loss, reported tokens) of this process's micro-batches."""
    inner = getattr(model, "module", model)
    loss_model = model if isinstance(model, LossModel) or isinstance(inner, LossModel) else LossModel(model)
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight] * len(micro_batches)
    mine = sum(trained_tokens(mb) for mb, w in zip(micro_batches, weights) if w)
    denominator = max(step_tokens if step_tokens is not None else mine, 1)
    total, reported = 0.0, mine
    for k, (mb, weight) in enumerate(zip(micro_batches, weights)):
        last = k == len(micro_batches) - 1
        with (sync_context(last) if sync_context else contextlib.nullcontext()), \
                (forward_context() if forward_context else contextlib.nullcontext()):
            batch = collate(mb)
            base_batch = None
            if beta and "kl_mask" in batch:
                replayed = [s for s in mb if s.get("replay")]
                base_batch = collate(replayed) if len(replayed) < len(mb) else None
            objective, loss_sum, excluded = loss_model(batch, beta, replay_ce, base_batch)
            reported -= excluded if weight else 0
        if not weight:
            objective = objective * 0.0
        backward(objective / denominator if world == 1 else objective * (world / denominator))
        total += loss_sum.item() * weight
    extra = penalty() if penalty else None
    if extra is not None:
        backward(extra)
    return total, reported
