"""The built-in sets of general prompts (prompt_sets/, built by scripts/make_prompt_sets.py from Natural Questions
open and alpaca instructions the demo does not train on): `general_probe`, which `peftune eval` asks to measure
forgetting, and `replay`, whose base answers the replay guard mixes into training. The two are disjoint."""

from __future__ import annotations

import json
import os

PROMPT_SETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_sets")


def builtin_prompts(name: str, limit: int | None = None) -> list[dict]:
    """[{"prompt", "source"}] of a built-in set: general_probe or replay, at most `limit` taken evenly over it."""
    with open(os.path.join(PROMPT_SETS, f"{name}.jsonl"), encoding="utf-8") as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    return spread(items, limit)


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items, taken evenly over the list (the sets are grouped by source)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]
