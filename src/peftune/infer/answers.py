"""Greedy answers to many prompts through the shared engine, and the base model's answers cached on disk: the eval
probe compares a tuned model against them (eval/run.py), and replay trains on them (train/replay.py)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time

from .. import models
from ..errors import PeftuneError
from ..io import atomic_write_text

ANSWER_CACHE_VERSION = "1"


def answers_cache(base_path: str, prompts: list[list[int]], max_new_tokens: int) -> str:
    """The cache file of a base model's answers to these prompts: keyed by the base's files (models.files_identity),
    the prompts' token ids and the answer length, so another base or other prompts never read stale answers."""
    key = hashlib.sha256(json.dumps([ANSWER_CACHE_VERSION, models.files_identity(base_path), prompts,
                                     max_new_tokens]).encode())
    folder = os.path.join(os.path.dirname(models.cache_dir()), "answers")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, key.hexdigest()[:24] + ".json")


def generate(engine, name: str | None, prompts: list[list[int]], max_new_tokens: int, what: str,
             say=print) -> list[dict]:
    """Greedy answers, all submitted at once (the engine batches them): [{"text", "finish_reason"}]. Progress goes
    to `say` every 20 answers."""
    from .sampling import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    waiting = list(enumerate(prompts))
    results: list[dict | None] = [None] * len(prompts)
    events: queue.Queue = queue.Queue()
    texts: dict[int, list[str]] = {}
    started, done, running = time.time(), 0, 0
    while done < len(prompts):
        while waiting and running < 64:  # within the engine's queue
            k, ids = waiting.pop(0)
            engine.submit(name, ids, params, lambda e, k=k: events.put((k, e)))
            running += 1
        k, event = events.get()
        if "error" in event:
            raise PeftuneError(f"generating {what}: {event['error']}")
        if "text" in event:
            texts.setdefault(k, []).append(event["text"])
        if "finish_reason" in event:
            results[k] = {"text": "".join(texts.get(k, [])), "finish_reason": event["finish_reason"]}
            done += 1
            running -= 1
            if done % 20 == 0 or done == len(prompts):
                say(f"  {what}: {done}/{len(prompts)} answers ({time.time() - started:.0f} s)")
    return results


def base_answers(engine, prompts: list[list[int]], max_new_tokens: int, what: str, say=print) -> list[dict]:
    """The base's greedy answers, generated once per base model, prompts and length, then read back."""
    path = answers_cache(engine.base_path, prompts, max_new_tokens)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    found = generate(engine, None, prompts, max_new_tokens, f"{what} (cached after)", say)
    atomic_write_text(path, json.dumps(found, ensure_ascii=False))
    return found
