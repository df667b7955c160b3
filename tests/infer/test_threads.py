"""The engine does all of its torch work in its decode thread: loading, adapters, generating, and what callers hand it
with `Engine.call` (scheduler.py: GNU OpenMP slows every small kernel once a second thread has a pool of its own,
2-3x on a decode step of the embedded model here, benchmarks/threads.py)."""

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftune.config import TrainConfig
from peftune.infer.engine import Engine
from peftune.infer.sampling import SamplingParams
from tiny import make_adapter


class Kernels(TorchDispatchMode):
    """Records the torch operators run in the thread that entered it (dispatch modes are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_loading_adapters_and_generating_run_no_kernel_in_the_calling_thread(dtype, tiny_model_dir, tokenizer,
                                                                              tmp_path):
    for i in range(2):
        make_adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4), tmp_path / f"a{i}", seed=i)
    with Kernels() as probe:  # the check itself: it sees what this thread runs
        torch.ones(2).add_(1)
    assert "aten.add_.Tensor" in probe.ops

    greedy = SamplingParams(max_tokens=5, temperature=0)
    messages = [{"role": "user", "content": "Hello"}]
    with Kernels() as caller:
        engine = Engine(tiny_model_dir, {"a0": str(tmp_path / "a0")}, dtype=dtype)
        try:
            answers = {name: engine.generate(name, messages, greedy)[0] for name in (None, "a0")}
            engine.load_adapter("a1", str(tmp_path / "a1"))
            answers["a1"] = engine.generate("a1", messages, greedy)[0]
            engine.unload_adapter("a1")
            worker = engine.call(threading.current_thread)
            total = engine.call(lambda: float(torch.arange(4.0).sum()))
        finally:
            engine.close()
    assert caller.ops == []
    assert worker is engine.scheduler.thread and total == 6.0
    assert answers["a0"] != answers[None] and answers["a1"] != answers["a0"]  # the adapters did compute


def test_call_hands_back_errors_and_refuses_a_closed_engine(tiny_model_dir):
    engine = Engine(tiny_model_dir, {}, dtype="fp32")
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0)
    assert engine.call(lambda: 7) == 7  # the thread lived through it
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.call(lambda: 7)
