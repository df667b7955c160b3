"""Per-request decoding settings and the per-row steps of a batched decode: logits → next token, and streamed text
that never shows a half character or a piece of a stop string.

Written here rather than taken from `transformers.generate`: one `generate` call applies one set of settings to its
whole batch, while a server's batch mixes requests with their own temperature, top_p, seed, penalties and stops.
The processors below compute what transformers' RepetitionPenalty/Temperature/TopP processors compute, row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0  # transformers' (CTRL's) multiplicative penalty over prompt and answer
    frequency_penalty: float = 0.0  # OpenAI's additive penalties over the answer's tokens
    presence_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's benchmark switch: answers run to max_tokens


class RowSampler:
    """Turns one row's logits into its next token under its own settings (and its own seeded generator)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.seen = list(prompt_ids)  # repetition_penalty covers the prompt, as in transformers
        self.counts: dict[int, int] = {}
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def next_token(self, logits: torch.Tensor) -> int:
        p = self.params
        scores = logits.float()
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(set(self.seen)), dtype=torch.long)
            picked = scores[ids]
            scores[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=scores.dtype)
            scores[ids] -= counts * p.frequency_penalty + p.presence_penalty
        if p.temperature <= 0:
            token = int(torch.argmax(scores))
        else:
            scores = scores / p.temperature
            if p.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=True)
                cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
                drop = cumulative - torch.softmax(ordered, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
                ordered[drop] = -float("inf")
                scores = torch.full_like(scores, -float("inf")).scatter(0, order, ordered)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.seen.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def partial_tail(text: str, marker: str) -> int:
    """The length of the longest start of `marker` (not all of it) that `text` ends with: what a stream holds back
    because the next piece may complete the marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class TextStream:
    """Incremental detokenization with stop strings: `push(token)` returns the new text that is safe to show.

    Text is decoded from all the answer's tokens each time (a token may complete a character begun by earlier
    ones), a trailing U+FFFD (half a character) is held back, and so is any tail that could still become a stop
    string. A stop string ends the answer before it; it is never shown."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that is the start of a stop string
            safe -= partial_tail(self.text[:safe], s)
        return self._take(safe)

    def finish(self) -> str:
        """What is left at the end (a held-back tail that did not become a stop string; no half characters)."""
        if self.stopped:
            return ""
        self.text = self.text.rstrip("\ufffd")
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.shown:
            return ""
        out, self.shown = self.text[self.shown:upto], upto
        return out
