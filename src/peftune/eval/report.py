"""The eval report: numbers with paired bootstrap 95% intervals (report.json), a table (report.md), the
learning-vs-forgetting chart and the multiple-choice bars (report.png), and a one-line summary."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import numpy as np

from ..io import atomic_path, atomic_write_text

FILES = ("report.json", "report.md", "report.png")
RESAMPLES = 1000


def interval(stat, n: int, seed: int = 0) -> list[float]:
    """The 2.5 and 97.5 percentiles of stat(indices) over resamples of n paired items."""
    if n == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(RESAMPLES)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def mc_correct(questions: list[dict], samples: list[dict], owner: list[int], scores) -> dict:
    """Per question whether the base (scale 0) and the tuned model (scale 1) rank the gold choice first by
    log-likelihood per character of the choice."""
    chars = np.array([s["chars"] for s in samples], dtype=float)
    owner = np.array(owner)
    out = {"questions": len(questions)}
    for label, scale in (("base", 0.0), ("tuned", 1.0)):
        per_char = -np.array(scores.nll[scale]) / np.maximum(chars, 1)
        right = []
        for q, question in enumerate(questions):
            mine = np.flatnonzero(owner == q)
            right.append(bool(int(np.argmax(per_char[mine])) == question["gold"]))
        out[label] = right
    return out


WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")  # a CJK character, or a word


def overlap_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1 between an answer and its reference (words, and CJK characters one by one)."""
    a, r = Counter(WORDS.findall(answer.lower())), Counter(WORDS.findall(reference.lower()))
    common = sum((a & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def _ratio(num: np.ndarray, den: np.ndarray):
    return lambda idx: float(num[idx].sum() / max(den[idx].sum(), 1))


def summarize(result: dict) -> dict:
    """The report's numbers from the raw scores."""
    out: dict = {"adapter": result["adapter"], "base_model": result["base_model"], "seconds": result["seconds"],
                 "settings": result["settings"], "scales": result["scales"]}
    t = result["target"]
    if "scores" in t:
        s = t["scores"]
        tok = np.array(s.tokens, dtype=float)
        base, tuned = np.array(s.nll[0.0]), np.array(s.nll[1.0])
        exact = {k: [a[k].strip() == a["reference"].strip() for a in t["answers"]] for k in ("base", "tuned")}
        contains = {k: [a["reference"].strip().lower() in a[k].lower() for a in t["answers"]] for k in ("base", "tuned")}
        f1 = {k: np.array([overlap_f1(a[k], a["reference"]) for a in t["answers"]]) for k in ("base", "tuned")}
        out["target"] = {
            "rows": t["rows"], "tokens": int(tok.sum()),
            "loss_base": s.per_token("nll", 0.0), "loss_tuned": s.per_token("nll", 1.0),
            "loss_change": s.per_token("nll", 1.0) - s.per_token("nll", 0.0),
            "loss_change_95": interval(lambda i: _ratio(tuned, tok)(i) - _ratio(base, tok)(i), len(tok)),
            "exact_base": float(np.mean(exact["base"])), "exact_tuned": float(np.mean(exact["tuned"])),
            "contains_base": float(np.mean(contains["base"])), "contains_tuned": float(np.mean(contains["tuned"])),
            "contains_change_95": interval(lambda i: float(np.mean(np.array(contains["tuned"])[i])
                                                           - np.mean(np.array(contains["base"])[i])),
                                           len(t["answers"])),  # rows (a row past cutoff_len has no loss sample)
            "f1_base": float(f1["base"].mean()), "f1_tuned": float(f1["tuned"].mean()),
            "f1_change_95": interval(lambda i: float(f1["tuned"][i].mean() - f1["base"][i].mean()), len(f1["base"])),
            "answers": t["answers"][:8],
        }
    else:
        out["target"] = {"rows": 0, "note": "no target rows: the run has no validation rows; pass --data FILE"}
    p = result["probe"]
    s = p["scores"]
    tok = np.array(s.tokens, dtype=float)
    base, tuned, kl = np.array(s.nll[0.0]), np.array(s.nll[1.0]), np.array(s.kl[1.0])
    same = np.array(p["same"], dtype=float)
    out["probe"] = {
        "prompts": len(tok), "tokens": int(tok.sum()),
        "loss_base": s.per_token("nll", 0.0), "loss_tuned": s.per_token("nll", 1.0),
        "loss_change": s.per_token("nll", 1.0) - s.per_token("nll", 0.0),
        "loss_change_95": interval(lambda i: _ratio(tuned, tok)(i) - _ratio(base, tok)(i), len(tok)),
        "kl": s.per_token("kl", 1.0), "kl_95": interval(_ratio(kl, tok), len(tok)),
        "unchanged": float(same.mean()), "unchanged_95": interval(lambda i: float(same[i].mean()), len(same)),
        "examples": p["examples"],
    }
    out["choice"] = {}
    for task, c in result["choice"].items():
        b, tu = np.array(c["base"], dtype=float), np.array(c["tuned"], dtype=float)
        out["choice"][task] = {"questions": c["questions"], "acc_base": float(b.mean()), "acc_tuned": float(tu.mean()),
                               "change": float(tu.mean() - b.mean()),
                               "change_95": interval(lambda i: float(tu[i].mean() - b[i].mean()), len(b))}
    sweep = []
    for scale in result["scales"]:
        row = {"scale": scale, "probe_loss_change": s.per_token("nll", scale) - s.per_token("nll", 0.0),
               "probe_kl": s.per_token("kl", scale)}
        if "scores" in t:
            row["target_loss"] = t["scores"].per_token("nll", scale)
            row["target_gain"] = t["scores"].per_token("nll", 0.0) - row["target_loss"]
        sweep.append(row)
    out["sweep"] = sweep
    return out


def _pm(value: float, ci: list[float], fmt: str = "{:+.3f}") -> str:
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def markdown(r: dict) -> str:
    name = r["adapter"] or f"{r['base_model']} (the base alone)"
    lines = [f"# peftune eval: {name}", "", f"Base model: `{r['base_model']}`. Intervals: paired bootstrap 95% "
             f"({RESAMPLES} resamples). {r['seconds']:.0f} s.", "", "## Gain on the target rows", ""]
    t = r["target"]
    if t.get("rows"):
        lines += ["| | base | tuned | change [95%] |", "|---|---|---|---|",
                  f"| loss per token ({t['tokens']} tokens, {t['rows']} rows) | {t['loss_base']:.4f} | "
                  f"{t['loss_tuned']:.4f} | {_pm(t['loss_change'], t['loss_change_95'])} |",
                  f"| greedy answer equals the reference | {t['exact_base']:.0%} | {t['exact_tuned']:.0%} | |",
                  f"| greedy answer contains the reference | {t['contains_base']:.0%} | {t['contains_tuned']:.0%} | "
                  f"{_pm(t['contains_tuned'] - t['contains_base'], t['contains_change_95'], '{:+.0%}')} |",
                  f"| word overlap with the reference (token F1; CJK by character) | {t['f1_base']:.3f} | "
                  f"{t['f1_tuned']:.3f} | {_pm(t['f1_tuned'] - t['f1_base'], t['f1_change_95'])} |"]
    else:
        lines.append(t["note"])
    p = r["probe"]
    lines += ["", "## Forgetting: the general probe", "",
              f"{p['prompts']} general prompts (Natural Questions, alpaca EN/ZH; none in the demo's data); the "
              f"reference is the base's own greedy answer ({p['tokens']} tokens).", "",
              "| | value [95%] |", "|---|---|",
              f"| loss per token on the base's answers: base {p['loss_base']:.4f}, tuned {p['loss_tuned']:.4f} | "
              f"{_pm(p['loss_change'], p['loss_change_95'])} |",
              f"| KL(base ‖ tuned) per token | {_pm(p['kl'], p['kl_95'], '{:.4f}')} |",
              f"| greedy answers unchanged | {_pm(p['unchanged'], p['unchanged_95'], '{:.0%}')} |"]
    if r["choice"]:
        lines += ["", "## Forgetting: multiple choice (answer likelihood per character, 0-shot)", "",
                  "| task | questions | base | tuned | change [95%] |", "|---|---|---|---|---|"]
        for task, c in r["choice"].items():
            lines.append(f"| {task} | {c['questions']} | {c['acc_base']:.1%} | {c['acc_tuned']:.1%} | "
                         f"{_pm(c['change'], c['change_95'], '{:+.1%}')} |")
    lines += ["", "## Learning against forgetting: the adapter scaled", "",
              "| scale | target loss | target gain | probe loss change | probe KL |", "|---|---|---|---|---|"]
    for row in r["sweep"]:
        lines.append(f"| {row['scale']:g} | {row.get('target_loss', float('nan')):.4f} | "
                     f"{row.get('target_gain', float('nan')):+.4f} | {row['probe_loss_change']:+.4f} | "
                     f"{row['probe_kl']:.4f} |")
    lines += ["", "A scaled adapter can be served as it is measured here: `peftune merge` folds it in at scale 1; "
              "for another scale multiply `lora_alpha` in adapter_config.json by it.", "", "## Examples", ""]
    for ex in p["examples"][:3]:
        lines += [f"- **{ex['prompt']}**", f"  - base: {ex['base']!r}", f"  - tuned: {ex['tuned']!r}"]
    return "\n".join(lines) + "\n"


def chart(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if r["choice"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    xs = [row["probe_kl"] for row in r["sweep"]]
    ys = [row.get("target_gain", 0.0) for row in r["sweep"]]
    ax.plot(xs, ys, "o-")
    for row, x, y in zip(r["sweep"], xs, ys):
        ax.annotate(f"scale {row['scale']:g}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("forgetting: KL(base ‖ tuned) per token on the general probe")
    ax.set_ylabel("gain: target loss per token, base minus tuned")
    ax.set_title("learning against forgetting")
    ax.grid(alpha=0.3)
    if r["choice"]:
        ax = axes[1]
        tasks = list(r["choice"])
        x = np.arange(len(tasks))
        base = [r["choice"][t]["acc_base"] for t in tasks]
        tuned = [r["choice"][t]["acc_tuned"] for t in tasks]
        ax.bar(x - 0.2, base, 0.4, label="base")
        ax.bar(x + 0.2, tuned, 0.4, label="tuned")
        ax.set_xticks(x, tasks, rotation=20)
        ax.set_ylabel("accuracy")
        ax.set_title("multiple choice (0-shot)")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_line(r: dict, out: str) -> str:
    parts = [f"eval {r['adapter'] or r['base_model']}:"]
    t, p = r["target"], r["probe"]
    if t.get("rows"):
        parts.append(f"target loss {t['loss_base']:.3f} -> {t['loss_tuned']:.3f} "
                     f"({_pm(t['loss_change'], t['loss_change_95'])}), answer F1 {t['f1_base']:.2f} -> "
                     f"{t['f1_tuned']:.2f}, contains reference {t['contains_base']:.0%} -> {t['contains_tuned']:.0%};")
    parts.append(f"probe KL {p['kl']:.4f}/token, answers unchanged {p['unchanged']:.0%}, loss on base answers "
                 f"{p['loss_change']:+.3f};")
    for task, c in r["choice"].items():
        parts.append(f"{task} {c['acc_base']:.0%} -> {c['acc_tuned']:.0%};")
    parts.append(f"report: {os.path.join(out, 'report.md')}")
    return " ".join(parts)


def write(result: dict, out: str) -> str:
    r = summarize(result)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(r, indent=2, ensure_ascii=False))
    atomic_write_text(os.path.join(out, "report.md"), markdown(r))
    chart(r, os.path.join(out, "report.png"))
    return summary_line(r, out)
