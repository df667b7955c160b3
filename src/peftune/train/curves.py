"""curves.png: a run's metrics.jsonl drawn by step: training and evaluation loss, learning rate, tokens/s.
Written at the end of `peftune train`, and by `peftune curves RUN_DIR` at any time (during a run too)."""

from __future__ import annotations

import json
import os

from ..errors import PeftuneError
from ..io import atomic_path


def read_metrics(path: str) -> list[dict]:
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if number > 1 and not line.endswith("\n"):  # a line still being written
                        break
                    raise PeftuneError(f"{path}:{number}: not a JSON object") from None
    except FileNotFoundError:
        raise PeftuneError(f"{path}: no such file (a run directory of `peftune train` has one)") from None
    if not records:
        raise PeftuneError(f"{path}: no steps logged yet")
    return records


def plot(metrics_path: str, png_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in records], label="training loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[1].plot(steps, [r["lr"] for r in records])
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("learning rate")
    axes[1].grid(alpha=0.3)
    axes[2].plot(steps, [r.get("tokens_per_s", 0) for r in records])
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("tokens/s (training)")
    axes[2].grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png_path


def run(args) -> int:
    out = args.output or os.path.join(args.run_dir, "curves.png")
    print(plot(os.path.join(args.run_dir, "metrics.jsonl"), out))
    return 0


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a run directory of `peftune train` (its metrics.jsonl)")
    p.add_argument("--output", help="the PNG to write (default RUN_DIR/curves.png)")
