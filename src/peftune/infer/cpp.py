"""llama.cpp as the engine's model side (`--engine llama.cpp`): the base as a GGUF file, each plain LoRA adapter as a
LoRA GGUF, and one llama.cpp context whose key/value cache holds every running request as a sequence of its own.

- The base: the embedded model's own Q4_1 file, a `.gguf` base_model as given, or any other LLaMA-architecture base
  written once into the cache as f16 (export/gguf.py).
- Adapters: written once into the cache as LoRA GGUFs (export/gguf.py, keyed by the adapter files' content). llama.cpp
  applies one set of adapters to a whole `llama_decode`, so a step decodes each adapter's rows together, one call
  per adapter, with that adapter set (the scheduler's cohorts are per adapter here).
- Prompt prefixes: a prompt's keys and values stay in the cache as a sequence of their own (a few, least recently used
  dropped), and a later prompt of the same adapter that begins the same way starts from them (`llama_memory_seq_cp`
  shares the cells, it copies nothing): a shared system prompt, or a conversation's earlier turns, are computed once.
- Sampling, stop strings and streaming stay in scheduler.py and sampling.py: both engines answer through the same
  code from the logits; only the arithmetic differs (llama.cpp's quantized matmuls, f16 keys and values).

Written against llama-cpp-python's low-level API because its `Llama` class decodes one sequence, with one adapter
fixed when it loads.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch

from .. import models
from ..errors import PeftuneError
from ..io import sha256_files

CHUNK = 512  # prompt tokens per llama_decode call (the context's n_batch)
PREFIXES = 8  # prompts whose keys and values are kept for later prompts that begin the same way
MIN_PREFIX = 8  # tokens; shorter shared beginnings are computed again


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise PeftuneError("--engine llama.cpp needs llama-cpp-python: pip install 'peftune[llamacpp]' "
                           "(it builds from source, a few minutes)") from None
    # llama-cpp-python routes llama.cpp's log through this logger (installed at import); errors only
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def gguf_cache() -> str:
    path = os.path.join(os.path.dirname(models.cache_dir()), "gguf")
    os.makedirs(path, exist_ok=True)
    return path


def base_gguf(base_model: str, trust_remote_code: bool = False) -> str:
    """The base as a GGUF file llama.cpp loads: its source GGUF when it came from one, else an f16 export (cached)."""
    source = models.source_gguf(base_model)
    if source:
        return source
    from ..export import gguf as writer

    path = models.resolve_model_path(base_model)
    if not os.path.isdir(path):
        raise PeftuneError(f"--engine llama.cpp: base_model {base_model} is not a local model directory or GGUF file")
    # keyed by the files' names, sizes and times, as the GGUF conversion cache is: no reading of the weights at start
    key = hashlib.sha256(json.dumps(models.files_identity(path)).encode()).hexdigest()[:16]
    target = os.path.join(gguf_cache(), f"{os.path.basename(os.path.normpath(path))}-{key}-f16.gguf")
    if not os.path.isfile(target):
        model = models.load_model(base_model, trust_remote_code, dtype=torch.float32)
        writer.write_model(model, models.load_tokenizer(base_model, trust_remote_code), target, "f16",
                           name=os.path.basename(os.path.normpath(path)))
    return target


def lora_gguf(adapter_dir: str, config) -> str:
    """The adapter as a LoRA GGUF (cached by the content of its weights and config)."""
    from ..export import gguf as writer

    files = [os.path.join(adapter_dir, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    if not all(os.path.isfile(f) for f in files):
        raise PeftuneError(f"{adapter_dir}: no adapter_config.json and adapter_model.safetensors (llama.cpp runs "
                           "adapters saved as safetensors)")
    target = os.path.join(gguf_cache(), f"lora-{sha256_files(*files)[:16]}-f32.gguf")
    if not os.path.isfile(target):
        writer.write_lora(adapter_dir, config, target, "f32")
    return target


class CppState:
    """A cohort's rows as llama.cpp sequence ids (the keys and values live in the context); rows that leave free
    their sequence."""

    def __init__(self, runner: "CppRunner", seqs: list[int]) -> None:
        self.runner, self.seqs = runner, seqs

    def merge(self, other: "CppState") -> "CppState":
        return CppState(self.runner, self.seqs + other.seqs)

    def keep(self, rows: list[int]) -> "CppState | None":
        kept = [self.seqs[i] for i in rows]
        for seq in set(self.seqs) - set(kept):
            self.runner.release(seq)
        return CppState(self.runner, kept) if kept else None


class CppRunner:
    """One llama.cpp model and context: `prefill` a prompt into a fresh sequence, `decode` one token for each of an
    adapter's rows. Called from the scheduler's thread only (adapter loading holds the scheduler's lock)."""

    def __init__(self, gguf_path: str, max_seqs: int, seq_len: int, threads: int | None = None) -> None:
        L = self.L = _llama()
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf_path.encode(), L.llama_model_default_params())
        if not self.model:
            raise PeftuneError(f"--engine llama.cpp: llama.cpp cannot load {gguf_path}")
        params = L.llama_context_default_params()
        # every sequence has room for seq_len tokens in the one (unified) cache, and the kept prefixes for seq_len
        # more together, so a step never runs out of it
        params.n_ctx = (max_seqs + 1) * seq_len
        params.n_batch = params.n_ubatch = CHUNK
        params.n_seq_max = max_seqs + PREFIXES
        params.kv_unified = True
        # f32 keys and values, and attention without flash attention's f16 running sums: then a row's numbers do not
        # depend on which cells of the shared cache the other rows hold (with f16 and flash attention they do, and
        # greedy answers changed with what else was running)
        params.type_k = params.type_v = 0  # GGML_TYPE_F32
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads()
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise PeftuneError(f"--engine llama.cpp: cannot make a context of {params.n_ctx} tokens")
        self.memory = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(CHUNK, 0, 1)
        self.free = list(range(max_seqs))[::-1]
        self.prefixes: OrderedDict[int, tuple[str | None, np.ndarray]] = OrderedDict()  # sequence -> its prompt
        self.prefix_free = list(range(max_seqs, max_seqs + PREFIXES))
        self.prefix_budget = seq_len
        self.adapters: dict[str, object] = {}
        self.active: str | None = None
        self.gguf_path = gguf_path

    # ------------------------------------------------------------------ adapters
    def add(self, name: str, lora_path: str) -> None:
        adapter = self.L.llama_adapter_lora_init(self.model, lora_path.encode())
        if not adapter:
            raise PeftuneError(f"llama.cpp cannot load the LoRA GGUF {lora_path}")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        for seq in [s for s, (a, _) in self.prefixes.items() if a == name]:
            self._forget(seq)
        adapter = self.adapters.pop(name)
        if self.active == name:
            self._use(None)
        self.L.llama_adapter_lora_free(adapter)

    def _use(self, name: str | None) -> None:
        L = self.L
        if name is None:
            status = L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            status = L.llama_set_adapters_lora(self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(self.adapters[name]), 1,
                                               (ctypes.c_float * 1)(1.0))  # alpha/rank is in the file
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({status})")
        self.active = name

    # ------------------------------------------------------------------ sequences
    def release(self, seq: int) -> None:
        self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free.append(seq)

    def _decode(self, tokens: list[int], seqs: list[int], positions: list[int], outputs: list[bool]) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for j, (t, s, p, o) in enumerate(zip(tokens, seqs, positions, outputs)):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, p, 1, o
            b.seq_id[j][0] = s
        status = self.L.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status})")

    def _logits(self, rows: int) -> torch.Tensor:
        array = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(rows, self.vocab))
        return torch.from_numpy(array.copy())

    # ------------------------------------------------------------------ kept prefixes
    def _lookup(self, adapter: str | None, ids: np.ndarray) -> tuple[int | None, int]:
        """The kept prompt of this adapter sharing the longest beginning with ids, and how many tokens it shares."""
        best, shared = None, 0
        for seq, (owner, tokens) in self.prefixes.items():
            if owner != adapter:
                continue
            n = min(len(tokens), len(ids))
            differ = np.flatnonzero(tokens[:n] != ids[:n])
            n = int(differ[0]) if len(differ) else n
            if n > shared:
                best, shared = seq, n
        if best is not None:
            self.prefixes.move_to_end(best)
        return best, shared

    def _keep(self, adapter: str | None, ids: np.ndarray, seq: int) -> None:
        if len(ids) < MIN_PREFIX or len(ids) > self.prefix_budget:
            return
        for old, (owner, tokens) in list(self.prefixes.items()):
            if owner == adapter and len(tokens) <= len(ids) and np.array_equal(tokens, ids[:len(tokens)]):
                self._forget(old)  # the new prompt holds all of it
        while self.prefixes and (not self.prefix_free or len(ids) + sum(len(t) for _, t in
                                                                       self.prefixes.values()) > self.prefix_budget):
            self._forget(next(iter(self.prefixes)))
        kept = self.prefix_free.pop()
        self.L.llama_memory_seq_cp(self.memory, seq, kept, 0, len(ids))
        self.prefixes[kept] = (adapter, ids)

    def _forget(self, seq: int) -> None:
        del self.prefixes[seq]
        self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.prefix_free.append(seq)

    # ------------------------------------------------------------------ generation
    def prefill(self, adapter: str | None, prompt: list[int]) -> tuple[CppState, torch.Tensor, int]:
        """(the new sequence, the last position's logits, how many prompt tokens came from a kept prefix)."""
        if not self.free:
            raise RuntimeError("no free llama.cpp sequence")
        ids = np.asarray(prompt, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):  # llama.cpp would abort the process
            raise PeftuneError(f"token ids must be in [0, {self.vocab}) for this GGUF's vocabulary")
        seq = self.free.pop()
        try:
            self._use(adapter)
            source, cached = self._lookup(adapter, ids)
            cached = min(cached, len(ids) - 1)  # the last token goes in again: its logits are needed
            if source is not None and cached >= MIN_PREFIX:
                self.L.llama_memory_seq_cp(self.memory, source, seq, 0, cached)
            else:
                cached = 0
            for start in range(cached, len(ids), CHUNK):
                part = prompt[start: start + CHUNK]
                last = start + len(part) == len(ids)
                self._decode(part, [seq] * len(part), list(range(start, start + len(part))),
                             [last and j == len(part) - 1 for j in range(len(part))])
            logits = self._logits(1)[0]
            self._keep(adapter, ids, seq)
        except BaseException:
            self.release(seq)
            raise
        return CppState(self, [seq]), logits, cached

    def decode(self, adapter: str | None, state: CppState, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._use(adapter)
        self._decode(ids[:, 0].tolist(), state.seqs, positions[:, 0].tolist(), [True] * len(state.seqs))
        return self._logits(len(state.seqs))

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None
