"""metrics.jsonl (one JSON object per line, flushed as written) and the progress bar."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm


class MetricsLog:
    def __init__(self, path: str, accelerator=None) -> None:
        self.path, self.accelerator = path, accelerator
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])

    def close(self) -> None:
        self.fh.close()


def progress(total: int, initial: int = 0, disable: bool = False):
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=disable)
