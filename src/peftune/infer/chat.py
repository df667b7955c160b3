"""`peftune chat`: base model + adapter, a streaming REPL, or `--prompt` answers (`--json` for scripts)."""

from __future__ import annotations

import json
import os
import sys

import torch

from .. import models
from ..adapters import run_config
from ..config import EMBEDDED_MODEL
from ..data.render import Renderer, get_template
from ..data.sources import system_prompt
from ..errors import PeftuneError
from ..methods import has_virtual_tokens


class Chat:
    def __init__(self, adapter: str | None = None, base_model: str | None = None, prompt_template: str | None = None,
                 trust_remote_code: bool = False) -> None:
        run = run_config(adapter) if adapter else {}
        if adapter and not base_model and not run.get("base_model"):
            with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fh:
                base_model = json.load(fh).get("base_model_name_or_path")
        # the adapter's own default system prompt (saved by `peftune train`, placeholders filled)
        self.system_prompt = system_prompt(run.get("system_prompt"), run.get("data_vars") or {})
        base_model = base_model or run.get("base_model") or EMBEDDED_MODEL
        self.tokenizer = models.load_tokenizer(base_model, trust_remote_code)
        quantized = {k: bool(run.get(k)) for k in ("load_in_4bit", "load_in_8bit")}
        if any(quantized.values()):  # a QLoRA adapter answers best on the base it was trained against
            try:
                models.quantization_config(**quantized)
            except PeftuneError as e:
                print(f"note: {e}; answering with the unquantized base", file=sys.stderr)
                quantized = {}
        model = models.load_model(base_model, trust_remote_code, **quantized)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        template = get_template(prompt_template or run.get("prompt_template", "auto"), self.tokenizer)
        self.renderer = Renderer(self.tokenizer, template, cutoff_len=10**9)

    @torch.no_grad()
    def answer(self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9,
               repetition_penalty: float = 1.0, stream: bool = False) -> str:
        from transformers import TextStreamer

        ids = torch.tensor([self.renderer.prompt_ids(messages)])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        new = generate(self.model, ids, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                       pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                       streamer=streamer, **sampling)
        text = self.tokenizer.decode(new[0], skip_special_tokens=True)
        return text.rstrip("\ufffd").strip()  # a character cut in half by max_new_tokens is dropped, not mangled


def generate(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The new tokens of `model.generate` for a batch of unpadded prompts.

    Virtual-token adapters (prefix/prompt/p-tuning) are generated through the base model here: with transformers 5's
    renamed `cache` argument, peft 0.21's generation drops the prefix (prefix tuning) and inserts the virtual tokens
    again at every step (prompt/p-tuning), so its answers differ from what the model was trained to compute
    (tests/infer/test_chat.py measures it). The virtual tokens go in once, as peft's forward puts them in training:
    prompt embeddings before the input embeddings, or the prefix as a pre-filled cache with positions after it."""
    ones = torch.ones_like(ids)
    if not has_virtual_tokens(model):
        return model.generate(input_ids=ids, attention_mask=ones, **kwargs)[:, ids.shape[1]:]
    config = model.active_peft_config
    base, n, batch = model.get_base_model(), config.num_virtual_tokens, ids.shape[0]
    virtual = torch.ones((batch, n), dtype=ids.dtype, device=ids.device)
    if config.peft_type == "PREFIX_TUNING":
        full = torch.cat([virtual * (kwargs.get("pad_token_id") or 0), ids], dim=1)  # placeholders for the prefix
        out = base.generate(input_ids=full, attention_mask=torch.ones_like(full),
                            past_key_values=model.get_prompt(batch_size=batch), **kwargs)
        return out[:, full.shape[1]:]
    embeds = base.get_input_embeddings()(ids)
    embeds = torch.cat([model.get_prompt(batch_size=batch).to(embeds.dtype), embeds], dim=1)
    return base.generate(inputs_embeds=embeds, attention_mask=torch.cat([virtual, ones], dim=1), **kwargs)


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


def run(args) -> int:
    chat = Chat(args.adapter, args.base_model, args.prompt_template, args.trust_remote_code)
    args.system = chat.system_prompt if args.system is None else args.system  # --system "" = none
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
           "repetition_penalty": args.repetition_penalty}
    if not args.prompt:
        repl(chat, args.system, **gen)
        return 0
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
        answer = chat.answer(messages, **gen)
        if args.json:
            print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False), flush=True)
        else:
            print(f"you> {prompt}\nassistant> {answer}\n", flush=True)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--adapter", help="a directory written by `peftune train` (or any PEFT adapter dir)")
    p.add_argument("--base_model", help="override the base model named in the adapter's config")
    p.add_argument("--prompt_template", help="override the prompt template the adapter was trained with")
    p.add_argument("--prompt", action="append", help="answer this prompt in a fresh conversation and exit "
                   "(repeatable)")
    p.add_argument("--json", action="store_true", help='with --prompt: print one {"prompt", "answer"} JSON per line')
    p.add_argument("--system", help="a system message at the start of each conversation (default: the one the "
                   "adapter was trained with, its system_prompt; --system '' for none)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling when temperature > 0 (default 0.9)")
    p.add_argument("--repetition_penalty", type=float, default=1.1, help="> 1 discourages repeats (default 1.1)")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")
