"""The forgetting guard: replay. The base model answers general prompts (greedy, through the shared engine, with
the run's template and system prompt); those answers are mixed into the training samples, so the tuned model is
also trained to keep answering the way the base did. The answers are cached per base model, prompts and length
(infer/answers.py): a second run, or a resume, reads them back. `replay_beta` adds a KL(base || tuned) term on the
same tokens (loss.py), the base's distribution computed with the adapter switched off.

Mixing general instruction data (which the demo also does) teaches other people's answers to general prompts; replay
teaches the base's own, which is what "keeping what the base knew" means here (and what `peftune eval`'s probe checks).
"""

from __future__ import annotations

import random

from ..config import TrainConfig
from ..data.builtin import builtin_prompts
from ..data.render import IGNORE
from ..data.sources import add_system_prompt, load_rows
from ..errors import PeftuneError

def replay_count(replay: float, train_rows: int) -> int:
    """Rows asked for: a count as given, or a share of the training rows."""
    return int(replay) if replay >= 1 else round(replay * train_rows)


def conversations(cfg: TrainConfig, say=print) -> list[list[dict]]:
    """The prompts replay may ask: the built-in set, or each row of replay_data up to its last user turn."""
    if not cfg.replay_data:
        return [[{"role": "user", "content": p["prompt"]}] for p in builtin_prompts("replay")]
    out = []
    for row in load_rows([cfg.replay_data], cfg.data_vars, cfg.seed, cfg.skip_bad_rows, warn=say):
        users = [i for i, m in enumerate(row.get("messages", [])) if m["role"] == "user"]
        if not users:
            raise PeftuneError(f"{row['source']}:{row['row']}: replay_data needs a question to ask (a conversation "
                               "or an instruction); plain text rows have none")
        out.append(row["messages"][:users[-1] + 1])
    return out


def replay_samples(cfg: TrainConfig, renderer, train_rows: int, say=print) -> list[dict]:
    """The replay samples for a run with this many training rows: each a prompt the base answered, rendered with the
    run's template and system prompt, and the base's answer as the labelled tokens; marked `replay` (the KL term
    finds them by it). An answer that reached replay_max_tokens is trained on as far as it goes, without an end (so
    the model does not learn to stop mid-sentence). Empty when replay is off."""
    want = replay_count(cfg.replay, train_rows)
    if not want:
        return []
    asked = conversations(cfg, say)
    if want > len(asked):
        say(f"note: replay asks for {want} rows; {cfg.replay_data or 'the built-in set'} has {len(asked)} prompts: "
            f"using all {len(asked)}")
        want = len(asked)
    chosen = sorted(random.Random(f"{cfg.seed}/replay").sample(range(len(asked)), want))
    rows = add_system_prompt([{"messages": asked[i]} for i in chosen], cfg.system_prompt)
    prompts = [renderer.prompt_ids(r["messages"]) for r in rows]
    answers = base_answers(cfg, prompts, say)
    out, cut = [], 0
    for prompt, answer in zip(prompts, answers):
        ids = renderer.encode(answer["text"])
        if answer["finish_reason"] == "stop" and renderer.eos_id is not None:
            ids.append(renderer.eos_id)
        else:
            cut += 1
        sample = {"input_ids": (prompt + ids)[:cfg.cutoff_len],
                  "labels": ([IGNORE] * len(prompt) + ids)[:cfg.cutoff_len], "replay": True}
        if any(label != IGNORE for label in sample["labels"][1:]):
            out.append(sample)
    say(f"replay: {len(out)} samples of the base's own answers mixed into {train_rows} training rows"
        + (f" ({cut} of them cut at replay_max_tokens {cfg.replay_max_tokens})" if cut else ""))
    return out


def base_answers(cfg: TrainConfig, prompts: list[list[int]], say=print) -> list[dict]:
    """The base model's greedy answers to these prompts (token ids, as training renders them)."""
    from ..infer.answers import base_answers as cached_answers
    from ..infer.engine import Engine

    # fp32: its batched answers equal its alone ones, so the cache and a regeneration agree (a resume that finds the
    # cache deleted trains on the same samples)
    engine = Engine(cfg.base_model, {}, dtype="fp32", max_batch=32, max_queue=64,
                    trust_remote_code=cfg.trust_remote_code)
    try:
        return cached_answers(engine, prompts, cfg.replay_max_tokens, "replay: the base's answers", say)
    finally:
        engine.close()
