"""Continuous batching: one worker thread decodes every running request a token per step, sharing forward passes.

A request is prefilled alone (so its prompt is computed exactly as in a single stream), then joins a cohort: rows
that can share one forward. Rows of different plain LoRA adapters share a cohort through the LoRA bank (each row's
own adapter in every layer); adapters on peft's own layers, and virtual-token adapters, get a cohort of their own.
A cohort's keys and values are left-padded, with an attention mask and explicit positions per row (fast.KV for the
lean decoder, DynamicKV below for transformers' forward); finished or cancelled rows leave it at once, and new rows
join between steps.

Written here because neither transformers' `generate` (one batch, one set of settings, rows join only at the
start) nor its continuous-batching manager (no per-row peft adapters) serves many adapters per request.

The worker thread does all of an engine's torch work, loading included (`call` runs a function there between
steps), and no other thread of the process should run torch kernels while it is alive. Why: PyTorch's CPU wheels run
their parallel kernels on GNU OpenMP, which gives every thread that starts a parallel region a pool of its own and,
once the process has more OpenMP threads than CPUs, stops spinning between regions and puts its threads to sleep and
wakes them at every one. A decode step is hundreds of small parallel kernels, so on the 2-core CPU this project
measures on, one 8-row step of the embedded model took 47-61 ms in this thread after the main thread had loaded the
model, against 20-32 ms with every kernel in one thread (benchmarks/threads.py).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import RowSampler, SamplingParams, TextStream


class QueueFull(Exception):
    """More requests are waiting than the server allows (answered with 429)."""


@dataclass
class Request:
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict], None]  # gets {"text": ...} chunks, then {"finish_reason", "usage"} (or {"error"})
    max_context: int = 1 << 30
    cached_tokens: int = 0  # of the prompt, whose keys and values came from the prefix cache
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Row:
    req: Request
    sampler: RowSampler
    text: TextStream
    position: int  # the position id of the next token fed in
    last: int  # the token fed in next
    generated: int = 0


@dataclass
class Cohort:
    key: str
    rows: list[Row] = field(default_factory=list)
    state: object = None  # the rows' keys and values: a DynamicKV, or fast.KV (same methods)

    def add(self, row: Row, state) -> None:
        self.state = state if self.state is None else self.state.merge(state)
        self.rows.append(row)

    def keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]
        self.state = self.state.keep(indices)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


class DynamicKV:
    """transformers' DynamicCache of a cohort with its attention mask [rows, length] (1 = a real key), rows
    left-padded: the state of models that run through transformers' own forward."""

    def __init__(self, cache, mask: torch.Tensor) -> None:
        self.cache, self.mask = cache, mask

    def merge(self, other: "DynamicKV") -> "DynamicKV":
        from transformers import DynamicCache

        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [(torch.cat([_pad_left(k1, width, 2), _pad_left(k2, width, 2)]),
                   torch.cat([_pad_left(v1, width, 2), _pad_left(v2, width, 2)]))
                  for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, other.cache)]
        return DynamicKV(DynamicCache(ddp_cache_data=layers),
                         torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)]))

    def keep(self, rows: list[int]) -> "DynamicKV | None":
        """Only these rows; key columns that no remaining row attends to are trimmed."""
        from transformers import DynamicCache

        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        return DynamicKV(DynamicCache(ddp_cache_data=[(k[index, :, start:], v[index, :, start:])
                                                      for k, v, *_ in self.cache]), mask[:, start:])

    def extend(self) -> torch.Tensor:
        """The mask with a column for the token about to be fed in."""
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype)], dim=1)
        return self.mask


class Scheduler:
    """The worker thread. `backend` is the engine's model side: cohort_key(adapter), prefill(request) -> (state,
    logits, next position), decode(cohort, input_ids, positions) -> logits, and the tokenizer."""

    def __init__(self, backend, max_batch: int = 8, max_queue: int = 64) -> None:
        self.backend, self.max_batch = backend, max_batch
        self.pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.cohorts: dict[str, Cohort] = {}
        self.jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="peftune-decode", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, req: Request) -> Request:
        try:
            self.pending.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.pending.maxsize} requests are already waiting") from None
        return req

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) run in the worker thread between steps (the caller waits): its result, or what it
        raised."""
        if threading.current_thread() is self.thread:
            return fn(*args, **kwargs)
        if not self.thread.is_alive():
            raise RuntimeError("the engine is closed")
        done, box = threading.Event(), {}

        def job() -> None:
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                box["error"] = e
            finally:
                done.set()

        self.jobs.put(job)
        while not done.wait(timeout=0.5):
            if not self.thread.is_alive():
                raise RuntimeError("the engine is closed")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def running(self) -> int:
        return sum(len(c.rows) for c in self.cohorts.values())

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while not self.jobs.empty():  # calls run here, between steps: nothing else touches the state
                    self.jobs.get_nowait()()
                idle = self.running() == 0
                self._admit(block=idle)
                for cohort in list(self.cohorts.values()):
                    if cohort.rows:
                        self._step(cohort)
                self.cohorts = {k: c for k, c in self.cohorts.items() if c.rows}
            except Exception as e:  # a bug must not kill the server: fail the running requests, keep serving
                self._fail_all(f"internal error while generating: {type(e).__name__}: {e}")

    def _admit(self, block: bool) -> None:
        while self.running() < self.max_batch:
            try:
                req = self.pending.get(timeout=0.02) if block else self.pending.get_nowait()
            except queue.Empty:
                return
            block = False
            if req.cancelled.is_set():
                continue
            try:
                self._prefill(req)
            except Exception as e:
                req.emit({"error": f"{type(e).__name__}: {e}"})

    @torch.inference_mode()
    def _prefill(self, req: Request) -> None:
        started = time.perf_counter()
        state, logits, position = self.backend.prefill(req)
        row = Row(req, RowSampler(req.params, req.prompt_ids), TextStream(self.backend.tokenizer, req.params.stop),
                  position, last=-1)
        req.timing = {"prefill_s": time.perf_counter() - started}
        if self._advance(row, logits):
            return
        key = self.backend.cohort_key(req.adapter)
        self.cohorts.setdefault(key, Cohort(key)).add(row, state)

    @torch.inference_mode()
    def _step(self, cohort: Cohort) -> None:
        ids = torch.tensor([[r.last] for r in cohort.rows])
        positions = torch.tensor([[r.position] for r in cohort.rows])
        logits = self.backend.decode(cohort, ids, positions)
        keep = []
        for i, row in enumerate(cohort.rows):
            row.position += 1
            if not self._advance(row, logits[i]):
                keep.append(i)
        if len(keep) < len(cohort.rows):
            cohort.keep(keep)

    def _advance(self, row: Row, logits: torch.Tensor) -> bool:
        """Samples the row's next token and streams its text; True when the row is done (and was finished)."""
        req = row.req
        if req.cancelled.is_set():
            req.emit({"finish_reason": "cancelled", "usage": None})
            return True
        token = row.sampler.next_token(logits)
        row.generated += 1
        finish = None
        if token in self.backend.eos_ids and not req.params.ignore_eos:
            finish = "stop"
        else:
            with self.backend.tokenizer_lock:
                text = row.text.push(token)
            if text:
                req.emit({"text": text})
            if row.text.stopped:
                finish = "stop"
            elif row.generated >= req.params.max_tokens or row.position >= req.max_context:
                finish = "length"
        if finish is None:
            row.last = token
            return False
        with self.backend.tokenizer_lock:
            tail = row.text.finish()
        if tail:
            req.emit({"text": tail})
        req.emit({"finish_reason": finish, "usage": {"prompt_tokens": len(req.prompt_ids),
                                                      "completion_tokens": row.generated,
                                                      "total_tokens": len(req.prompt_ids) + row.generated,
                                                      "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}})
        return True

    def _fail_all(self, message: str) -> None:
        for cohort in self.cohorts.values():
            for row in cohort.rows:
                row.req.emit({"error": message})
            try:
                cohort.keep([])  # frees what the rows held (llama.cpp sequences)
            except Exception:
                pass
        self.cohorts = {}
