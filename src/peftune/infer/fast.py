"""A lean decoder for LLaMA-family models (Llama, Mistral without a sliding window, Qwen2), used by the engine when
the adapters are plain LoRA (lora.py's bank): the same arithmetic as transformers' modeling code, in far fewer
operations.

Why by hand: decoding one row on a CPU is dominated by per-operation overhead, not arithmetic. transformers builds
masks and caches each step and calls ~40 small modules per layer, with a forward hook per adapted layer.
benchmarks/decoder.py, the embedded 135M model with an r=16 LoRA on every linear layer, one row: 60 ms a step
through transformers with the bank's hooks against 47 ms here (int8 weights), 75 against 42 ms (4-bit layers);
at eight rows the matmuls dominate and both take about as long. This decoder reads the very same weights (q/k/v and
gate/up fused into one matmul each, the separate layers' weights becoming views of the fused ones, so no memory is
added), keeps each cohort's keys and values in one preallocated tensor, and asks the LoRA bank for one update per
fused matmul.

    decoder = FastDecoder.build(model)    # None when the model is not one this decoder runs
    with bank.rows([adapter]):
        kv, logits = decoder.prefill(ids)             # ids [1, tokens]; prefill(ids, prefix) after cached keys
    with bank.rows(adapters):
        logits = decoder.step(kv, ids, positions)     # one token per row
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import GROUP, Int4Linear, Int8Linear

SUPPORTED = {"llama", "mistral", "qwen2"}
INT4_BLOCK = 64


def unsupported(model) -> str | None:
    """Why this decoder cannot run the model (None when it can)."""
    config = model.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    if getattr(config, "sliding_window", None) and (getattr(config, "use_sliding_window", True)
                                                     or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                                or [])):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "an unexpected module layout"
    for layer in inner.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if type(module) not in (torch.nn.Linear, Int8Linear, Int4Linear):  # not peft's or bitsandbytes' layers
                return f"{type(module).__name__} layers"
    if type(model.lm_head) not in (torch.nn.Linear, Int8Linear, Int4Linear):
        return f"a {type(model.lm_head).__name__} output layer"
    return None


class _Linear:
    """One matmul on a 2-D input: a float weight (with its bias), or quant.py's int8 or 4-bit weights and scales."""

    def __init__(self, modules: list) -> None:
        first = modules[0]
        self.kind = "int8" if isinstance(first, Int8Linear) else "int4" if isinstance(first, Int4Linear) else "float"
        # torch packs 4-bit weights in blocks of 32 or 64 output rows by CPU (64 with AVX512): packed weights
        # concatenate into one matmul only when each part is whole blocks
        split_int4 = self.kind == "int4" and any(m.out_features % INT4_BLOCK for m in modules)
        if split_int4 or any(type(m) is not type(first) for m in modules):
            self.kind = "mixed"  # layers quantized differently: each its own matmul
            self.parts = modules
        elif self.kind == "float":
            self.weight = _fuse(modules, "weight")
        else:
            self.weight = _fuse(modules, "weight", buffer=True)
            self.scales = _fuse(modules, "scales", buffer=True, dim=1 if self.kind == "int4" else 0)
        biases = [m.bias for m in modules]
        if self.kind == "mixed" or all(b is None for b in biases):
            self.bias = None
        else:
            dtype = first.bias.dtype if first.bias is not None else torch.float32
            self.bias = torch.cat([b.detach().to(dtype) if b is not None else torch.zeros(m.out_features, dtype=dtype)
                                   for b, m in zip(biases, modules)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the quantized kernels take bf16 activations; the rest stays in x's dtype
        if self.kind == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scales)
        elif self.kind == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.weight, GROUP,
                                                               self.scales)
        elif self.kind == "mixed":
            return torch.cat([m(x) for m in self.parts], dim=-1)
        else:
            return F.linear(x, self.weight, self.bias)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias


def _fuse(modules: list, attr: str, buffer: bool = False, dim: int = 0) -> torch.Tensor:
    """The modules' tensors `attr` concatenated along the outputs (dimension `dim`); each module's own becomes a
    view of it, so the model (still used for what this decoder does not run) and this decoder share one copy."""
    parts = [getattr(m, attr).detach() for m in modules]
    if len(parts) == 1:
        return parts[0]
    fused = torch.cat(parts, dim=dim)
    if dim != 0:  # a view would not be contiguous (int4 scales: small, so each layer keeps its own)
        return fused
    start = 0
    for module, part in zip(modules, parts):
        view = fused[start: start + part.shape[0]]
        if buffer:
            module.register_buffer(attr, view)
        else:
            setattr(module, attr, torch.nn.Parameter(view, requires_grad=False))
        start += part.shape[0]
    return fused


class _Block:
    def __init__(self, index: int, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}."
        self.qkv = _Linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Linear([attn.o_proj])
        self.gate_up = _Linear([mlp.gate_proj, mlp.up_proj])
        self.down = _Linear([mlp.down_proj])
        self.keys = {"qkv": tuple(prefix + f"self_attn.{p}_proj" for p in "qkv"),
                     "o": (prefix + "self_attn.o_proj",),
                     "gate_up": (prefix + "mlp.gate_proj", prefix + "mlp.up_proj"),
                     "down": (prefix + "mlp.down_proj",)}
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.scaling = attn.scaling
        self.intermediate = mlp.gate_proj.out_features


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' LlamaRMSNorm: in fp32, back to the input's dtype, then the weight
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class KV:
    """A cohort's keys and values: kv [layers, 2, rows, kv heads, capacity, head dim], rows left-padded so that every
    row's newest key is in column `length - 1`; mask [rows, capacity] marks the real keys."""

    def __init__(self, kv: torch.Tensor, mask: torch.Tensor, length: int) -> None:
        self.kv, self.mask, self.length = kv, mask, length
        self.layers = [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]  # views, indexed once

    def bias(self, end: int) -> torch.Tensor | None:
        """The additive attention mask [rows, 1, 1, end] over the first `end` columns; None without padding."""
        mask = self.mask[:, :end]
        if bool(mask.all()):
            return None
        zero = torch.zeros((), dtype=self.kv.dtype)
        return torch.where(mask, zero, torch.finfo(self.kv.dtype).min)[:, None, None]

    @property
    def rows(self) -> int:
        return self.kv.shape[2]

    def _grow(self, capacity: int) -> None:
        kv = self.kv.new_zeros((*self.kv.shape[:4], capacity, self.kv.shape[5]))
        kv[..., : self.length, :] = self.kv[..., : self.length, :]
        mask = self.mask.new_zeros((self.rows, capacity))
        mask[:, : self.length] = self.mask[:, : self.length]
        self.kv, self.mask = kv, mask
        self.layers = [(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]

    def prefix(self, tokens: int) -> torch.Tensor:
        """A copy of a one-row state's first `tokens` keys and values (for `FastDecoder.prefill`)."""
        return self.kv[..., :tokens, :].clone()

    def reserve(self, tokens: int) -> None:
        if self.length + tokens > self.kv.shape[4]:
            self._grow(max(2 * self.kv.shape[4], self.length + tokens + 32))

    def merge(self, other: "KV") -> "KV":
        """This cohort with other's rows appended (both right-aligned to the longer length)."""
        length = max(self.length, other.length)
        shape = list(self.kv.shape)
        shape[2], shape[4] = self.rows + other.rows, length + 32
        kv, mask = self.kv.new_zeros(shape), self.mask.new_zeros((shape[2], shape[4]))
        for src, rows in ((self, slice(0, self.rows)), (other, slice(self.rows, shape[2]))):
            kv[:, :, rows, :, length - src.length: length] = src.kv[..., : src.length, :]
            mask[rows, length - src.length: length] = src.mask[:, : src.length]
        return KV(kv, mask, length)

    def keep(self, rows: list[int]) -> "KV | None":
        """Only these rows; key columns no remaining row attends to are dropped."""
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index, : self.length]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        length = self.length - start
        kv = self.kv.new_zeros((*self.kv.shape[:2], len(rows), self.kv.shape[3], length + 32, self.kv.shape[5]))
        kv[..., :length, :] = self.kv[:, :, index, :, start: self.length]
        padded = self.mask.new_zeros((len(rows), length + 32))
        padded[:, :length] = mask[:, start:]
        return KV(kv, padded, length)


class FastDecoder:
    def __init__(self, model) -> None:
        inner = model.model
        config = model.config
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.blocks = [_Block(i, layer) for i, layer in enumerate(inner.layers[: config.num_hidden_layers])]
        self.norm, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = _Linear([model.lm_head])
        self.head_key = ("lm_head",)
        attn = inner.layers[0].self_attn
        self.heads, self.head_dim = config.num_attention_heads, attn.head_dim
        self.kv_heads = config.num_key_value_heads
        self.dtype = self.embed.weight.dtype  # of activations and keys/values (fp32 under int8 weights)
        self.bank = None  # set by the engine: the LoraBank whose `delta` adds adapters' updates

    @classmethod
    def build(cls, model) -> "FastDecoder | None":
        return None if unsupported(model) else cls(model)

    def groups(self) -> list[tuple[str, ...]]:
        """The LoRA bank's groups: the layers each fused matmul computes."""
        return [key for block in self.blocks for key in block.keys.values()] + [self.head_key]

    def _apply(self, linear: _Linear, key: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        out = linear(x)
        return out if self.bank is None else self.bank.apply(key, x, out)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, kv: KV, prefill: bool) -> torch.Tensor:
        """Runs ids [rows, tokens] at positions, writing their keys/values at kv.length onwards; the last token's
        logits [rows, vocab] in fp32."""
        rows, tokens = ids.shape
        h = self.embed(ids).view(rows * tokens, -1)
        cos, sin = self.rotary(h, positions)  # [rows, tokens, head dim]
        cos, sin = cos[:, None], sin[:, None]
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        start, end = kv.length, kv.length + tokens
        if not prefill:
            mask = kv.bias(end)
        elif start:  # a prompt after cached keys (prefix.py): each token sees those and the prompt up to itself
            mask = torch.ones((tokens, end), dtype=torch.bool).tril(diagonal=start)
        else:
            mask = None
        for index, block in enumerate(self.blocks):
            a = _rms_norm(h, block.norm1, block.eps1)
            qkv = self._apply(block.qkv, block.keys["qkv"], a).view(rows, tokens, nq + 2 * nkv, d).transpose(1, 2)
            qk = _rotate(qkv[:, : nq + nkv], cos, sin)
            keys, values = kv.layers[index]
            keys[:, :, start:end] = qk[:, nq:]
            values[:, :, start:end] = qkv[:, nq + nkv:]
            attn = F.scaled_dot_product_attention(qk[:, :nq], keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                  is_causal=prefill and not start, scale=block.scaling,
                                                  enable_gqa=nq != nkv)
            attn = attn.transpose(1, 2).reshape(rows * tokens, nq * d)
            h = h + self._apply(block.o, block.keys["o"], attn)
            a = _rms_norm(h, block.norm2, block.eps2)
            gate, up = self._apply(block.gate_up, block.keys["gate_up"], a).split(block.intermediate, dim=-1)
            h = h + self._apply(block.down, block.keys["down"], F.silu(gate) * up)
        kv.length = end
        last = h.view(rows, tokens, -1)[:, -1]
        return self._apply(self.head, self.head_key, _rms_norm(last, self.norm, self.eps)).float()

    def prefill(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> tuple[KV, torch.Tensor]:
        """One row's prompt ids [1, tokens]: its KV and the last logits [vocab]. prefix: the keys and values of the
        tokens before these ([layers, 2, 1, kv heads, length, head dim], from `KV.prefix`), or None."""
        start = 0 if prefix is None else prefix.shape[4]
        end = start + ids.shape[1]
        kv = torch.zeros((len(self.blocks), 2, 1, self.kv_heads, end + 32, self.head_dim), dtype=self.dtype)
        if prefix is not None:
            kv[..., :start, :] = prefix
        mask = torch.zeros((1, end + 32), dtype=torch.bool)
        mask[:, :end] = True
        state = KV(kv, mask, start)
        return state, self._forward(ids, torch.arange(start, end)[None], state, prefill=True)[0]

    def step(self, kv: KV, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row, ids and positions [rows, 1]: the logits [rows, vocab]."""
        kv.reserve(1)
        kv.mask[:, kv.length] = True
        return self._forward(ids, positions, kv, prefill=False)
