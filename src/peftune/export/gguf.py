"""A merged LLaMA-architecture model as one GGUF file (llama.cpp, Ollama), written with the `gguf` package.

What the `gguf` package leaves to its caller, and this module does: the tensor names llama.cpp expects, the
permutation of the q and k projections' rows that llama.cpp's rotary embedding assumes (with the *key/value* head
count for k under grouped-query attention: the mistake of llama.cpp #3364), which tensors stay f32 (norms), the
metadata, and the tokenizer. When the base came from a GGUF file (the embedded model does), its metadata and
tokenizer keys are carried over unchanged and only the tensors are new; for other bases they are written from the
transformers config and the tokenizer's files with `gguf.vocab`'s helpers (BPE and SentencePiece tokenizers), and
anything else is refused rather than written wrong.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch

from ..errors import PeftuneError

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}  # transformers model_type -> GGUF architecture
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama_ftype (general.file_type)
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# keys a copied header must not keep: the writer sets them for the new tensors
NOT_COPIED = {"general.file_type", "general.quantization_version", "general.alignment"}


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (rotary halves: all first halves, then all second halves, per head) in llama.cpp's
    order (the two halves interleaved), for a projection with `heads` heads."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_supported(config) -> None:
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise PeftuneError(f"export --format gguf: {config.model_type} models are not written yet (LLaMA-architecture "
                           "ones are: llama, mistral); merge with `peftune merge` and convert with llama.cpp's "
                           "convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in (None, "default"):
        raise PeftuneError(f"export --format gguf: rope scaling {kind!r} is not written yet")
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        raise PeftuneError("export --format gguf: sliding-window attention is not written yet")


def tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight llama.cpp reads, q/k permuted."""
    config = model.config
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                w = permute_rows(w, heads)
            elif ours == "self_attn.k_proj":
                w = permute_rows(w, kv_heads)
            out.append((f"blk.{i}.{theirs}.weight", w))
            bias = state.get(f"model.layers.{i}.{ours}.bias")
            if bias is not None:
                raise PeftuneError(f"export --format gguf: layer {ours} has a bias, which this writer does not handle")
    out.append(("output_norm.weight", state["model.norm.weight"]))
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not tied:  # llama.cpp reuses token_embd when there is no output tensor
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _encode(name: str, w: torch.Tensor, outtype: str):
    """(array, raw dtype or None) as the writer takes them."""
    import gguf

    array = w.numpy().astype(np.float32)
    if w.ndim == 1 or outtype == "f32":
        return array, None
    if outtype == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[OUTTYPES[outtype]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:  # rows that do not split into blocks stay f16
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def _copy_header(writer, source: str) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in NOT_COPIED or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _write_header(writer, model, tokenizer, name: str) -> None:
    """Metadata and tokenizer keys of a base that did not come from a GGUF file."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = None
        for kind in (BpeVocab, LlamaHfVocab):
            try:
                vocab = kind(__import__("pathlib").Path(folder))
                break
            except (FileNotFoundError, TypeError, ValueError, KeyError, NotImplementedError):
                continue
        if vocab is None:
            raise PeftuneError("export --format gguf: this tokenizer is neither byte-level BPE nor SentencePiece; "
                               "its GGUF keys cannot be written here")
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        if len(tokens) < config.vocab_size:  # rows of the embedding no token uses (padding to a multiple)
            for i in range(len(tokens), config.vocab_size):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2" if isinstance(vocab, BpeVocab) else "llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = SpecialVocab(folder, load_merges=isinstance(vocab, BpeVocab), n_vocab=len(tokens))
        if isinstance(vocab, BpeVocab) and not special.merges:  # GGUF cannot hold an empty list, and llama.cpp
            # refuses a BPE vocabulary without its merges key
            raise PeftuneError("export --format gguf: this byte-level BPE tokenizer has no merges, and llama.cpp "
                               "loads BPE vocabularies only with them")
        special.add_to_gguf(writer)


@contextlib.contextmanager
def _gguf_file(path: str, arch: str):
    """A GGUFWriter to fill in; the file is written to path + ".tmp" and renamed into place once complete."""
    import gguf

    tmp = path + ".tmp"
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise PeftuneError(f"export: cannot write {path} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_model(model, tokenizer, path: str, outtype: str = "f16", source_gguf: str | None = None,
                name: str = "peftune export") -> None:
    """Writes the model to path (a temporary file beside it, renamed into place when complete)."""
    import gguf

    check_supported(model.config)
    if outtype not in OUTTYPES:
        raise PeftuneError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    with _gguf_file(path, ARCHITECTURES[model.config.model_type]) as writer:
        if source_gguf:
            _copy_header(writer, source_gguf)
        else:
            _write_header(writer, model, tokenizer, name)
        writer.add_file_type(FILE_TYPES[outtype])
        if outtype in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, w in tensors(model):
            array, raw = _encode(tensor_name, w, outtype)
            if raw is None:
                writer.add_tensor(tensor_name, array)
            else:
                writer.add_tensor(tensor_name, array, raw_dtype=raw)


ADAPTER_TYPES = {"f32": np.float32, "f16": np.float16}


def write_lora(adapter_dir: str, config, path: str, outtype: str = "f32") -> dict:
    """A plain LoRA adapter as llama.cpp's LoRA GGUF (`--lora`, Ollama's ADAPTER): A and B per layer under the base's
    tensor names, B's rows of q and k permuted as the base's are, and adapter.lora.alpha chosen so that llama.cpp's
    scale, alpha / rank, is peft's (alpha / rank, or alpha / sqrt(rank) for rsLoRA). Returns what was written."""
    import json

    import gguf
    from safetensors.torch import load_file

    check_supported(config)
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        peft_config = json.load(fh)
    unexpressible = [k for k in ("use_dora", "modules_to_save", "lora_bias", "alpha_pattern", "rank_pattern",
                                 "trainable_token_indices") if peft_config.get(k)]
    if peft_config.get("peft_type") != "LORA" or unexpressible:
        what = peft_config.get("peft_type", "?") if peft_config.get("peft_type") != "LORA" else \
            ", ".join(unexpressible)
        raise PeftuneError(f"export --adapter_only: llama.cpp's LoRA format holds plain LoRA A/B pairs with one scale; "
                           f"this adapter has {what}. Export the merged model instead (leave out --adapter_only)")
    if outtype not in ADAPTER_TYPES:
        raise PeftuneError(f"--outtype {outtype}: a LoRA GGUF is written in f32 or f16")
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for key, tensor in weights.items():
        stem, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise PeftuneError(f"export --adapter_only: {key} is not a LoRA A/B matrix (llama.cpp's LoRA format holds "
                               "nothing else); export the merged model instead (leave out --adapter_only)")
        pairs.setdefault(stem.replace("base_model.model.", "", 1), {})[kind[0]] = tensor.float()
    ranks = {ab["A"].shape[0] for ab in pairs.values()}
    if len(ranks) != 1:
        raise PeftuneError("export --adapter_only: the adapter's layers have different ranks, and llama.cpp applies "
                           "one alpha to all; export the merged model instead")
    rank = ranks.pop()
    alpha = float(peft_config["lora_alpha"])
    scale = alpha / (rank ** 0.5 if peft_config.get("use_rslora") else rank)
    names = {f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}.weight" for i in range(config.num_hidden_layers)
             for ours, theirs in LAYER_NAMES.items()}
    names["lm_head"] = "output.weight"
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    with _gguf_file(path, ARCHITECTURES[config.model_type]) as writer:
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)  # llama.cpp: scale = alpha / rank
        for module, ab in sorted(pairs.items()):
            name = names.get(module)
            if name is None or "A" not in ab or "B" not in ab:
                raise PeftuneError(f"export --adapter_only: {module} is not a layer llama.cpp's LLaMA graph adapts; "
                                   "export the merged model instead")
            if module == "lm_head" and getattr(config, "tie_word_embeddings", False):
                raise PeftuneError("export --adapter_only: the adapter changes the output layer, which this base "
                                   "shares with its input embeddings (llama.cpp would not apply it); export the "
                                   "merged model instead")
            B = ab["B"]
            kind = name.split(".")[-2]
            if kind in heads:
                B = permute_rows(B, heads[kind])
            writer.add_tensor(f"{name}.lora_a", ab["A"].numpy().astype(ADAPTER_TYPES[outtype]))
            writer.add_tensor(f"{name}.lora_b", B.numpy().astype(ADAPTER_TYPES[outtype]))
    return {"rank": rank, "alpha": scale * rank, "scale": scale, "layers": len(pairs)}
