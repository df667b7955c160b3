"""The one place that generates: a base model loaded once, any number of adapters on it, each prompted the way it
was trained, and batched streaming decoding (scheduler.py). Used by `peftune chat` and `peftune serve`.

    engine = Engine("smollm2-135m-instruct", {"aurora": "output/aurora"})
    text, finish, usage = engine.generate("aurora", [{"role": "user", "content": "Who are you?"}], SamplingParams())
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import threading
import weakref
from dataclasses import dataclass

import torch

from .. import models
from ..adapters import base_of, run_config
from ..config import EMBEDDED_MODEL
from ..data.render import Renderer, get_template
from ..data.sources import system_prompt
from ..errors import PeftuneError
from . import quant
from .fast import FastDecoder
from .lora import LoraBank, plain_lora
from .prefix import PrefixCache
from .sampling import SamplingParams
from .scheduler import DynamicKV, QueueFull, Request, Scheduler  # noqa: F401  (QueueFull: for the server)

ENGINES = ("torch", "llama.cpp")
CPP_SEQ_LEN = 4096  # llama.cpp engine: tokens per running request unless --max_model_len says otherwise
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# int8/int4: quantized weights (bf16 activations into their matmuls), everything else in fp32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32,
          "int4": torch.float32}


def _close(ref) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def _generation_config(path: str, model):
    """The base's generation config (its end-of-sequence ids): the loaded model's, or read from its directory."""
    from transformers import GenerationConfig

    if model is not None:
        return model.generation_config
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig()


def resolve_dtype(dtype: str, quantized_ok: bool) -> str:
    """`auto`: bf16 on a GPU; on a CPU quantized weights when the adapters run through the LoRA bank (int8, with the
    layers whose weights already are 4-bit kept at 4 bits: quant.py), else fp32."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bf16"
    return "auto-quantized" if quantized_ok else "fp32"


class PromptTooLong(PeftuneError):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt is {tokens} tokens; this model's context is {limit} tokens")
        self.tokens, self.limit = tokens, limit


@dataclass
class Served:
    """A model the engine answers as: the base, or the base with one adapter."""

    name: str
    path: str | None  # the adapter directory (None for the base)
    renderer: Renderer
    system_prompt: str | None = None
    virtual: bool = False  # prefix/prompt/p-tuning: learned tokens go in at prefill


class Engine:
    def __init__(self, base_model: str | None = None, adapters: dict[str, str] | None = None,
                 base_name: str | None = None, dtype: str = "auto", prompt_template: str | None = None,
                 trust_remote_code: bool = False, max_batch: int = 8, max_queue: int = 64,
                 quantize: dict | None = None, engine: str = "torch", max_model_len: int | None = None) -> None:
        adapters = dict(adapters or {})
        if base_model is None:  # the base the (first) adapter was trained on
            first = next(iter(adapters.values()), None)
            base_model = (base_of(first, run_config(first)) if first else None) or EMBEDDED_MODEL
        if engine not in ENGINES:
            raise PeftuneError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
        self.base_model, self.prompt_template = base_model, prompt_template
        self.tokenizer_lock = threading.Lock()  # fast tokenizers refuse use from two threads at once
        self.model = self.decoder = self.bank = self.cpp = None
        self.served: dict[str, Served] = {}
        self.prefixes = PrefixCache()
        self.scheduler = Scheduler(self, max_batch=max_batch, max_queue=max_queue)
        # the decode thread must stop before the interpreter does (torch aborts the process otherwise)
        atexit.register(_close, weakref.ref(self))
        try:  # in the decode thread, as all of this engine's torch work (scheduler.py says why)
            self.scheduler.call(self._start, adapters, engine, dtype, quantize, trust_remote_code, max_batch,
                                max_model_len, base_name)
        except BaseException:
            self.scheduler.close()
            raise

    def _start(self, adapters: dict[str, str], engine: str, dtype: str, quantize: dict | None,
               trust_remote_code: bool, max_batch: int, max_model_len: int | None, base_name: str | None) -> None:
        self.base_path = models.resolve_model_path(self.base_model)
        self.tokenizer = models.load_tokenizer(self.base_model, trust_remote_code)
        self.bank_ok = all(plain_lora(p) for p in adapters.values())
        if engine == "llama.cpp":
            config = self._start_cpp(dtype, quantize, trust_remote_code, max_batch, max_model_len)
        else:
            config = self._start_torch(dtype, quantize, trust_remote_code)
        # the longest prompt plus answer: the model's context, --max_model_len, llama.cpp's cache per sequence
        self.context = self.cpp_seq_len if self.cpp is not None else min(
            int(getattr(config, "max_position_embeddings", 0) or 1 << 30), max_model_len or 1 << 30)
        ids = _generation_config(self.base_path, self.model).eos_token_id
        self.eos_ids = {i for i in (ids if isinstance(ids, list) else [ids]) if i is not None}
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self.base = Served(base_name or self.base_model, None, self._renderer({}))
        for name, path in adapters.items():
            self._load(name, path)

    def _start_torch(self, dtype: str, quantize: dict | None, trust_remote_code: bool):
        dtype = resolve_dtype(dtype, self.bank_ok and not any((quantize or {}).values()))
        model = models.load_model(self.base_model, trust_remote_code, dtype=DTYPES.get(dtype, torch.float32),
                                  **(quantize or {}))
        self.model = model.eval()
        self.weights = dtype  # what the weights are, in words (for logs and benchmarks)
        if dtype in ("int8", "int4", "auto-quantized"):
            if not self.bank_ok:
                raise PeftuneError(f"--dtype {dtype} serves plain LoRA adapters (through peftune's own LoRA layers); "
                                   "these adapters need peft's layers: use --dtype bf16 or fp32")
            counts = quant.quantize(self.model, "auto" if dtype == "auto-quantized" else dtype)
            self.weights = ", ".join(f"{kind} ({n} layers)" for kind, n in counts.items() if n)
        # plain LoRA adapters (the default, and most of what is trained) run through the LoRA bank (lora.py), on
        # the lean decoder (fast.py) when the model is LLaMA-like; any other kind of adapter makes the whole engine
        # use peft's own adapter layers
        self.decoder = FastDecoder.build(self.model) if self.bank_ok else None
        groups = self.decoder.groups() if self.decoder else None
        self.bank = LoraBank(self.model, groups=groups) if self.bank_ok else None
        if self.decoder:
            self.decoder.bank = self.bank
        return model.config

    def _start_cpp(self, dtype: str, quantize: dict | None, trust_remote_code: bool, max_batch: int,
                   max_model_len: int | None):
        from transformers import AutoConfig

        from . import cpp

        if dtype != "auto" or any((quantize or {}).values()):
            raise PeftuneError("--engine llama.cpp runs the base's GGUF file as it is: leave out --dtype and "
                               "--load_in_4bit/--load_in_8bit")
        config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=trust_remote_code)
        self.cpp_config = config
        # every running request gets room for this many tokens in llama.cpp's cache (allocated at start)
        self.cpp_seq_len = min(int(getattr(config, "max_position_embeddings", 0) or CPP_SEQ_LEN),
                               max_model_len or CPP_SEQ_LEN)
        path = cpp.base_gguf(self.base_model, trust_remote_code)
        self.cpp = cpp.CppRunner(path, max_seqs=max_batch, seq_len=self.cpp_seq_len)
        self.weights = f"llama.cpp: {os.path.basename(path)}"
        return config

    # ------------------------------------------------------------------ adapters
    def _renderer(self, run: dict) -> Renderer:
        template = self.prompt_template or run.get("prompt_template", "auto")
        return Renderer(self.tokenizer, get_template(template, self.tokenizer, run.get("tool_format", "auto")),
                        cutoff_len=10**9)

    def _load(self, name: str, path: str, flag: str = "--adapter") -> Served:
        if not NAME.match(name) or name == self.base.name or name == "__base__":
            raise PeftuneError(f"{flag} {name}={path}: the name must be letters, digits, '.', '_', ':' or '-', "
                               f"and not the base model's name")
        if name in self.served:
            raise PeftuneError(f"{flag} {name}: an adapter of that name is already loaded")
        run = run_config(path, flag)
        trained_on = base_of(path, run)
        if trained_on and models.resolve_model_path(trained_on) != self.base_path:
            raise PeftuneError(f"{flag} {name}={path}: trained on base model {trained_on}, but this engine runs "
                               f"{self.base_model}; give --base_model {trained_on}")
        virtual = False
        if self.cpp is not None:
            from . import cpp

            try:
                lora = cpp.lora_gguf(path, self.cpp_config)
            except PeftuneError as e:
                raise PeftuneError(f"{flag} {name}={path}: --engine llama.cpp runs plain LoRA adapters: {e}") from None
            self.cpp.add(name, lora)
        elif self.bank is not None:
            if not plain_lora(path):
                raise PeftuneError(f"{flag} {name}={path}: not a plain LoRA adapter (DoRA, another method, or extra "
                                   "trained modules), and this server runs plain LoRA adapters; serve it from a "
                                   "server started with it")
            try:
                self.bank.add(name, path)
            except (ValueError, KeyError, OSError) as e:
                raise PeftuneError(f"{flag} {name}={path}: cannot load it ({e})") from None
        else:
            virtual = self._load_peft(name, path, flag)
        served = Served(name, os.path.abspath(path), self._renderer(run),
                        system_prompt(run.get("system_prompt"), run.get("data_vars") or {}), virtual=virtual)
        self.served[name] = served
        return served

    def _load_peft(self, name: str, path: str, flag: str) -> bool:
        """Loads an adapter onto peft's own layers; True for a virtual-token (prompt learning) adapter."""
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise PeftuneError(f"{flag} {name}={path}: cannot load it beside the other adapters ({e}); serve "
                               "adapters of one kind together") from None
        return bool(getattr(self.model.peft_config[name], "is_prompt_learning", False))

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run in the engine's thread, its result returned: torch work of the caller's own while
        this engine is alive belongs there too (scheduler.py says why)."""
        return self.scheduler.call(fn, *args, **kwargs)

    def load_adapter(self, name: str, path: str) -> Served:
        return self.scheduler.call(self._load, name, path, "lora_path")

    def unload_adapter(self, name: str) -> None:
        self.scheduler.call(self._unload, name)

    def _unload(self, name: str) -> None:
        if name not in self.served:
            raise PeftuneError(f"no adapter named {name!r} is loaded")
        for cohort in self.scheduler.cohorts.values():
            keep = [i for i, r in enumerate(cohort.rows) if r.req.adapter != name]
            for r in cohort.rows:
                if r.req.adapter == name:
                    r.req.emit({"error": f"adapter {name} was unloaded"})
            if len(keep) < len(cohort.rows):
                cohort.keep(keep)
        del self.served[name]
        self.prefixes.drop(name)
        if self.cpp is not None:
            self.cpp.remove(name)
        elif self.bank is not None:
            self.bank.remove(name)
        else:
            self.model.delete_adapter(name)

    def get(self, name: str | None) -> Served:
        if name in (None, self.base.name):
            return self.base
        if name not in self.served:
            raise KeyError(name)
        return self.served[name]

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, name: str | None, messages: list[dict], tools=None, default_system: bool = True,
                    answer_prefix: str = "") -> list[int]:
        """Token ids of a conversation for this model, its own system prompt added when the conversation has none
        (unless default_system is False); `answer_prefix`: text the answer is made to begin with."""
        served = self.get(name)
        if default_system and served.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": served.system_prompt}, *messages]
        with self.tokenizer_lock:
            return served.renderer.prompt_ids(messages, tools=tools) + served.renderer.encode(answer_prefix)

    def text_prompt(self, name: str | None, prompt: str) -> list[int]:
        served = self.get(name)
        with self.tokenizer_lock:
            return list(served.renderer.text_prefix) + served.renderer.encode(prompt)

    def check_length(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) >= self.context:
            raise PromptTooLong(len(prompt_ids), self.context)

    # ------------------------------------------------------------------ generation
    def submit(self, name: str | None, prompt_ids: list[int], params: SamplingParams, emit) -> Request:
        served = self.get(name)
        self.check_length(prompt_ids)
        req = Request(served.name if served.path else None, prompt_ids, params, emit, max_context=self.context)
        return self.scheduler.submit(req)

    def generate(self, name: str | None, messages: list[dict], params: SamplingParams, on_text=None,
                 default_system: bool = True, tools=None):
        """One conversation, answered synchronously: (text, finish_reason, usage). on_text(chunk) streams."""
        events: queue.Queue = queue.Queue()
        self.submit(name, self.chat_prompt(name, messages, tools=tools, default_system=default_system), params,
                    events.put)
        parts: list[str] = []
        while True:
            event = events.get()
            if "error" in event:
                raise RuntimeError(event["error"])
            if "text" in event:
                parts.append(event["text"])
                if on_text:
                    on_text(event["text"])
            if "finish_reason" in event:
                return "".join(parts), event["finish_reason"], event["usage"]

    def close(self) -> None:
        self.scheduler.close()
        if self.cpp is not None and not self.scheduler.thread.is_alive():
            self.cpp.close()

    # ------------------------------------------------------------------ the model side of the scheduler
    def cohort_key(self, adapter: str | None) -> str:
        if self.cpp is not None:  # llama.cpp sets adapters per call: a cohort per adapter
            return adapter or "__base__"
        if adapter and self.served[adapter].virtual:
            return f"virtual:{adapter}"
        # rows of different adapters share a forward only through the LoRA bank; adapters on peft's own layers
        # (DoRA, AdaLoRA, IA3, LoHa, LoKr) get a cohort each: peft's `adapter_names` refuses several of them, and
        # is slow where it works (lora.py)
        if self.bank is not None:
            return "mix"
        return adapter or "__base__"

    def _forward(self, adapter_names: list[str | None], virtual: bool, **kwargs):
        """A forward of the right model for these rows: the bare base for virtual-token rows (their tokens are in the
        cache already), peft's mixed batch, or one adapter set active."""
        from peft import PeftModel

        kwargs.update(use_cache=True, logits_to_keep=1)
        if self.bank is not None:
            with self.bank.rows(adapter_names):
                return self.model(**kwargs)
        if not isinstance(self.model, PeftModel) or virtual:
            base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
            return base(**kwargs)
        if adapter_names[0] is None:
            with self.model.disable_adapter():
                return self.model(**kwargs)
        self.model.set_adapter(adapter_names[0])
        return self.model(**kwargs)

    def prefill(self, req: Request):
        """(keys/values state, last logits, next position) of one request's prompt, computed alone."""
        from transformers import DynamicCache

        ids = torch.tensor([req.prompt_ids])
        served = self.served.get(req.adapter) if req.adapter else None
        if req.adapter and served is None:  # unloaded while the request waited
            raise PeftuneError(f"the adapter {req.adapter} was unloaded")
        if self.cpp is not None:
            state, logits, req.cached_tokens = self.cpp.prefill(req.adapter, req.prompt_ids)
            return state, logits, ids.shape[1]
        if served is not None and served.virtual:
            return self._prefill_virtual(req.adapter, ids)
        if self.decoder is not None:
            cached, prefix = self.prefixes.lookup(req.adapter, req.prompt_ids)
            with self.bank.rows([req.adapter]):
                state, logits = self.decoder.prefill(ids[:, cached:], prefix)
            self.prefixes.store(req.adapter, req.prompt_ids, state.prefix(ids.shape[1]))
            req.cached_tokens = cached
            return state, logits, ids.shape[1]
        out = self._forward([req.adapter], False, input_ids=ids, cache=DynamicCache(),
                            position_ids=torch.arange(ids.shape[1])[None], attention_mask=torch.ones_like(ids))
        return DynamicKV(out.cache, torch.ones_like(ids)), out.logits[0, -1], ids.shape[1]

    def _prefill_virtual(self, name: str, ids: torch.Tensor):
        """The learned tokens go in once, as peft's training forward puts them: prefix tuning's keys/values as a
        pre-filled cache (the prompt's positions after them), prompt/p-tuning's embeddings before the prompt's."""
        from transformers import DynamicCache

        self.model.set_adapter(name)
        config = self.model.peft_config[name]
        n, length = config.num_virtual_tokens, ids.shape[1]
        base = self.model.get_base_model()
        mask = torch.ones((1, n + length), dtype=ids.dtype)
        if config.peft_type == "PREFIX_TUNING":
            prefix = self.model.get_prompt(batch_size=1)
            if not isinstance(prefix, DynamicCache):
                prefix = DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix])
            out = base(input_ids=ids, cache=prefix, attention_mask=mask, position_ids=n + torch.arange(length)[None],
                       use_cache=True, logits_to_keep=1)
        else:
            embeds = base.get_input_embeddings()(ids)
            embeds = torch.cat([self.model.get_prompt(batch_size=1).to(embeds.dtype), embeds], dim=1)
            out = base(inputs_embeds=embeds, cache=DynamicCache(), attention_mask=mask,
                       position_ids=torch.arange(n + length)[None], use_cache=True, logits_to_keep=1)
        return DynamicKV(out.cache, mask), out.logits[0, -1], n + length

    def decode(self, cohort, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        adapters = [r.req.adapter for r in cohort.rows]
        if self.cpp is not None:
            return self.cpp.decode(adapters[0], cohort.state, ids, positions)
        if self.decoder is not None:
            with self.bank.rows(adapters):
                return self.decoder.step(cohort.state, ids, positions)
        state = cohort.state
        out = self._forward(adapters, cohort.key.startswith("virtual:"), input_ids=ids, cache=state.cache,
                            attention_mask=state.extend(), position_ids=positions)
        state.cache = out.cache
        return out.logits[:, -1]
