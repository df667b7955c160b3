"""Fault injection for the crash tests: `PEFTUNE_FAULT=POINT:STEP` kills the process with SIGKILL when training
reaches that point at that optimizer step (points: `after_step`, `in_checkpoint`, `in_eval`). Unset, it does
nothing. The tests use it to crash a run at exact places and check that resuming loses nothing."""

from __future__ import annotations

import os
import signal


def point(name: str, step: int) -> None:
    spec = os.environ.get("PEFTUNE_FAULT")
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
