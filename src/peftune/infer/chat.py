"""`peftune chat`: base model + adapter, a streaming REPL, or `--prompt` answers (`--json` for scripts)."""

from __future__ import annotations

import json
import sys

from .. import models
from ..adapters import run_config
from ..data.tools import parse_calls
from ..errors import PeftuneError
from .engine import Engine
from .sampling import SamplingParams


class Chat:
    """The base model with one adapter, answering through the shared engine (engine.py)."""

    def __init__(self, adapter: str | None = None, base_model: str | None = None, prompt_template: str | None = None,
                 trust_remote_code: bool = False, dtype: str = "auto", engine: str = "torch") -> None:
        run = run_config(adapter) if adapter else {}
        quantize = {k: bool(run.get(k)) for k in ("load_in_4bit", "load_in_8bit")}
        if any(quantize.values()) and engine == "llama.cpp":
            quantize = {}  # llama.cpp runs the base's GGUF file as it is
        if any(quantize.values()):  # a QLoRA adapter answers best on the base it was trained against
            try:
                models.quantization_config(**quantize)
            except PeftuneError as e:
                print(f"note: {e}; answering with the unquantized base", file=sys.stderr)
                quantize = {}
        self.engine = Engine(base_model, {"adapter": adapter} if adapter else {}, prompt_template=prompt_template,
                             trust_remote_code=trust_remote_code, max_batch=1, quantize=quantize,
                             dtype=dtype, engine=engine)
        self.name = "adapter" if adapter else None
        self.tokenizer = self.engine.tokenizer
        # the adapter's own default system prompt (saved by `peftune train`, placeholders filled)
        self.system_prompt = self.engine.get(self.name).system_prompt

    def answer(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
               repetition_penalty: float = 1.0, stream: bool = False, tools: list | None = None) -> str:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        on_text = (lambda t: print(t, end="", flush=True)) if stream else None
        # the caller's messages carry the system prompt it chose (run() puts the adapter's own in by default)
        text, _, _ = self.engine.generate(self.name, messages, params, on_text=on_text, default_system=False,
                                          tools=tools)
        if stream:
            print(flush=True)
        return text.strip()


def repl(chat: Chat, system: str | None, **gen) -> None:
    print("peftune chat — /reset clears the conversation, /exit (or Ctrl-D) leaves.")
    if system:
        print(f"(system prompt: {system})")
    history: list[dict] = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": line}]
        print("assistant> ", end="", flush=True)
        reply = chat.answer(messages, stream=True, **gen)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def load_tools(path: str | None) -> list | None:
    """--tools FILE: a JSON list of function definitions (OpenAI's {"type": "function", "function": {...}} or bare
    {name, description, parameters})."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            tools = json.load(fh)
    except OSError as e:
        raise PeftuneError(f"--tools {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PeftuneError(f"--tools {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function", t).get("name"), str)
                                              for t in tools):
        raise PeftuneError(f"--tools {path}: expected a list of function definitions, each with a `name`")
    return tools


def run(args) -> int:
    tools = load_tools(args.tools)
    chat = Chat(args.adapter, args.base_model, args.prompt_template, args.trust_remote_code, args.dtype, args.engine)
    try:
        return _answer(chat, args, tools)
    finally:
        chat.engine.close()


def _answer(chat: Chat, args, tools: list | None = None) -> int:
    args.system = chat.system_prompt if args.system is None else args.system  # --system "" = none
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
           "repetition_penalty": args.repetition_penalty, "tools": tools}
    if not args.prompt:
        repl(chat, args.system, **gen)
        return 0
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
        answer = chat.answer(messages, **gen)
        calls = parse_calls(answer) if tools else None  # the answer's calls, as `tool_calls` (data/tools.py)
        if args.json:
            out = {"prompt": prompt, "answer": answer}
            if calls:
                out["content"], out["tool_calls"] = calls
            print(json.dumps(out, ensure_ascii=False), flush=True)
        else:
            shown = answer if not calls else "\n".join(
                ([calls[0]] if calls[0] else []) + [f"[tool call] {c['function']['name']}({c['function']['arguments']})"
                                                    for c in calls[1]])
            print(f"you> {prompt}\nassistant> {shown}\n", flush=True)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--adapter", help="a directory written by `peftune train` (or any PEFT adapter dir)")
    p.add_argument("--base_model", help="override the base model named in the adapter's config")
    p.add_argument("--prompt_template", help="override the prompt template the adapter was trained with")
    p.add_argument("--prompt", action="append", help="answer this prompt in a fresh conversation and exit "
                   "(repeatable)")
    p.add_argument("--json", action="store_true", help='with --prompt: print one {"prompt", "answer"} JSON per line '
                   '(and "content", "tool_calls" when the answer calls tools)')
    p.add_argument("--tools", metavar="FILE.json", help="function definitions the model may call (a JSON list, as "
                   "OpenAI's `tools`); calls in an answer are shown as tool calls (docs/tools.md)")
    p.add_argument("--system", help="a system message at the start of each conversation (default: the one the "
                   "adapter was trained with, its system_prompt; --system '' for none)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling when temperature > 0 (default 0.9)")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="> 1 discourages repeats (default 1.1)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8", "int4"),
                   help="weights for answering (the same as `peftune serve`): auto (default: on a CPU for LoRA "
                   "adapters int8, and 4-bit where the base's weights already are 4-bit, as the embedded model's; else "
                   "fp32; bf16 on a GPU), fp32, bf16, fp16, int8, int4 (weight-only, groups of 32)")
    p.add_argument("--engine", default="torch", choices=("torch", "llama.cpp"),
                   help="what computes (the same as `peftune serve`): torch (default) or llama.cpp (plain LoRA "
                   "adapters on the base's GGUF file; needs llama-cpp-python)")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")
