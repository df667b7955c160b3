"""Prefix caching: the keys and values of recent prompts, per model (the base or an adapter), so that a prompt that
begins like one of them computes only the rest.

Prompts share beginnings all the time: the chat template's system prompt and headers (24 of the 36 tokens of
a short question to the embedded model), an adapter's own system prompt, and in a conversation every earlier turn.
Computing a prompt stalls every stream being decoded (the scheduler runs one forward at a time), so what is not
computed again is time every running request gets back. The idea is vLLM's automatic prefix
caching, on whole prompts instead of fixed-size blocks: the lean decoder keeps one KV tensor per cohort, so the
cached part is copied in once.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch


class PrefixCache:
    def __init__(self, budget_bytes: int = 256 << 20, min_tokens: int = 8) -> None:
        """budget_bytes: the most memory the cached keys and values take (least recently used go first);
        min_tokens: shorter shared beginnings are computed again (a copy costs more than it saves)."""
        self.budget, self.min_tokens = budget_bytes, min_tokens
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (model, prompt ids) -> [..., tokens, :]
        self.bytes = 0
        self.lock = threading.Lock()

    def lookup(self, model: str | None, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """(n, keys/values of ids[:n]) for the longest cached beginning of ids (n < len(ids): the last token is
        always computed, for its logits), or (0, None)."""
        best, found, ids = 0, None, tuple(ids)
        with self.lock:
            for key in self.entries:
                if key[0] != model:
                    continue
                n = min(len(os.path.commonprefix([key[1], ids])), len(ids) - 1)
                if n > best:
                    best, found = n, key
            if found is None or best < self.min_tokens:
                return 0, None
            self.entries.move_to_end(found)
            return best, self.entries[found][..., :best, :]

    def store(self, model: str | None, ids: list[int], kv: torch.Tensor) -> None:
        """Keeps kv (the keys and values of ids, [..., len(ids), :], owned by the cache from now on); drops the
        entries it extends (an earlier turn of the same conversation)."""
        size = kv.numel() * kv.element_size()
        if size > self.budget or len(ids) < self.min_tokens:
            return
        key = (model, tuple(ids))
        with self.lock:
            for old in [k for k in self.entries if k[0] == model and key[1][: len(k[1])] == k[1]]:
                self._remove(old)
            self.entries[key] = kv
            self.bytes += size
            while self.bytes > self.budget:
                self._remove(next(iter(self.entries)))

    def drop(self, model: str | None) -> None:
        """Forgets a model's prompts (an adapter unloaded: a new one may come under its name)."""
        with self.lock:
            for key in [k for k in self.entries if k[0] == model]:
                self._remove(key)

    def _remove(self, key: tuple) -> None:
        kv = self.entries.pop(key)
        self.bytes -= kv.numel() * kv.element_size()
