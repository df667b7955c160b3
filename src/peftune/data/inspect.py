"""`peftune data inspect`: read, validate and tokenize exactly as training does, and show what the model learns."""

from __future__ import annotations

import json
import math
import sys

from .. import models
from ..config import TrainConfig
from .batching import trained_tokens
from .render import IGNORE, Renderer, get_template
from .sources import add_system_prompt, load_rows, source_spec, system_prompt

START, END = "\x1b[32m", "\x1b[0m"  # trained spans on a terminal; «…» elsewhere


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def _row_key(row: dict) -> str:
    return json.dumps(row.get("text") or row.get("messages"), sort_keys=True, ensure_ascii=False)


def row_lengths(samples: list[dict]) -> list[int]:
    """One length per row: a plain-text document cut into pieces counts once, at its full length."""
    return list({(s["source"], s["row"]): s["full_length"] for s in samples}.values())


def stats(rows: list[dict], samples: list[dict], fmt: str, bad_rows: int) -> dict:
    lengths = sorted(row_lengths(samples))
    total = sum(len(s["input_ids"]) for s in samples)
    trained = trained_tokens(samples)
    keys = [_row_key(r) for r in rows]
    return {"format": fmt, "rows": len(rows), "bad_rows": bad_rows,
            "tokens": {"p50": percentile(lengths, 50), "p90": percentile(lengths, 90),
                       "p99": percentile(lengths, 99), "max": lengths[-1] if lengths else 0},
            "truncated": sum(s["truncated"] for s in samples),
            "trained_token_fraction": round(trained / total, 4) if total else 0.0,
            "duplicates": len(keys) - len(set(keys))}


def marked_text(tok, sample: dict, color: bool) -> str:
    """The sample's text with the spans that carry loss marked."""
    start, end = (START, END) if color else ("«", "»")
    out, run, trained = [], [], False
    for tid, label in zip(sample["input_ids"], sample["labels"]):
        if (label != IGNORE) != trained and run:
            text = tok.decode(run)
            out.append(f"{start}{text}{end}" if trained else text)
            run = []
        trained = label != IGNORE
        run.append(tid)
    if run:
        text = tok.decode(run)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)


def inspect(cfg: TrainConfig, show: int = 0, plot: str | None = None, say=print) -> dict:
    tokenizer = models.load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    renderer = Renderer(tokenizer, get_template(cfg.prompt_template, tokenizer, cfg.tool_format), cfg.cutoff_len,
                        cfg.train_on_inputs, cfg.add_eos_token, cfg.mask_history)
    quiet = lambda msg: None  # noqa: E731  (the report itself says what the warnings would)
    system = system_prompt(cfg.system_prompt, cfg.data_vars)
    per_source, all_rows, all_samples, formats = [], [], [], []
    for entry in cfg.data_path:
        reports: list = []
        rows = load_rows([source_spec(entry)], cfg.data_vars, cfg.seed, cfg.skip_bad_rows, warn=quiet,
                         reports=reports)
        samples = renderer.render_all(add_system_prompt(rows, system), warn=quiet, skip_bad_rows=cfg.skip_bad_rows)
        report = reports[0]
        per_source.append({"path": report.path, **stats(rows, samples, report.format, len(report.bad_rows)),
                           "bad_row_numbers": report.bad_rows[:100]})
        all_rows += rows
        all_samples += samples
        formats.append(report.format)
    result = {**stats(all_rows, all_samples, "+".join(sorted(set(formats))),
                      sum(s["bad_rows"] for s in per_source)), "cutoff_len": cfg.cutoff_len, "sources": per_source}
    if show:
        color = sys.stdout.isatty()
        say(f"--- {min(show, len(all_samples))} rendered samples; the loss covers "
            f"{'the green text' if color else 'the text between « and »'} ---")
        for s in all_samples[:show]:
            say(f"[{s['source']}:{s['row']}] {len(s['input_ids'])} tokens"
                + (" (truncated)" if s["truncated"] else ""))
            say(marked_text(tokenizer, s, color) + "\n")
    if plot:
        save_histogram(row_lengths(all_samples), cfg.cutoff_len, plot)
    return result


def save_histogram(lengths: list[int], cutoff_len: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(lengths, bins=50, color="#4c72b0")
    ax.axvline(cutoff_len, color="#c44e52", linestyle="--", label=f"cutoff_len = {cutoff_len}")
    ax.set_xlabel("tokens per sample (before truncation)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_report(result: dict) -> str:
    lines = []
    for name, s in [(src["path"], src) for src in result["sources"]] + [("mix", result)]:
        t = s["tokens"]
        lines.append(f"{name}: format {s['format']}, {s['rows']} rows, {s['bad_rows']} bad, tokens p50 {t['p50']} "
                     f"p90 {t['p90']} p99 {t['p99']} max {t['max']}, {s['truncated']} truncated at "
                     f"{result['cutoff_len']}, {100 * s['trained_token_fraction']:.1f} % of tokens trained, "
                     f"{s['duplicates']} duplicates")
    return "\n".join(lines)
