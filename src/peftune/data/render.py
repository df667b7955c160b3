"""Conversation rows → `input_ids` + `labels` with exact masks.

A template turns a conversation into text segments, each either prompt (no loss) or response (loss). Segments
are tokenized one by one, so a response's tokens are exactly those the model generates after the prompt at
inference time, and the mask is exact at token level. Labels are built explicitly, never derived from
`pad_token_id`, so the EOS is supervised even where pad and EOS share an id (transformers #23530).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

from ..errors import PeftuneError
from .formats import RowError, RowErrors
from .tools import FORMATS as TOOL_FORMATS, has_tools, to_plain

IGNORE = -100
BUILTIN = ("alpaca", "alpaca_short")


@dataclass
class Segment:
    text: str
    trained: bool  # a response: the loss covers it


class FileTemplate:
    """A template stored as data (alpaca-lora's JSON layout, extended with optional multi-turn/system keys)."""

    def __init__(self, name: str, spec: dict) -> None:
        for key in ("prompt_input", "prompt_no_input"):
            if not isinstance(spec.get(key), str):
                raise PeftuneError(f"prompt template {name}: missing string field `{key}`")
        self.name, self.spec = name, spec

    def _user(self, msg: dict, first: bool) -> str:
        kind = "prompt" if first else "turn"
        instruction = msg.get("instruction", msg["content"])
        extra = msg.get("input", "")
        key = f"{kind}_input" if extra else f"{kind}_no_input"
        fmt = self.spec.get(key) or self.spec[f"prompt_{'input' if extra else 'no_input'}"]
        return fmt.format(instruction=instruction, input=extra)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> list[Segment]:
        if has_tools(messages, tools):  # peftune's tool format (tools.py), in this template's plain turns
            messages = to_plain(messages, tools)
        out: list[Segment] = []
        prompt = ""
        first = True
        for msg in messages:
            if msg["role"] == "system":
                prompt += self.spec.get("system", "{system}\n\n").format(system=msg["content"])
            elif msg["role"] == "user":
                if not first:
                    prompt += self.spec.get("turn_separator", "")
                prompt += self._user(msg, first)
                first = False
            elif msg["role"] == "assistant":
                out += [Segment(prompt, False), Segment(msg["content"], True)]
                prompt = ""
            else:
                raise PeftuneError(f"prompt template {self.name}: cannot render role `{msg['role']}`")
        if prompt:
            out.append(Segment(prompt, False))
        return out


class ChatTemplate:
    """The model's own chat template (tokenizer.apply_chat_template), split into segments by rendering each
    prefix of the conversation: the text an assistant turn adds is its response segment."""

    name = "chat"

    def __init__(self, tokenizer, tool_format: str = "auto") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise PeftuneError("prompt_template chat: this model's tokenizer has no chat template; "
                               "use --prompt_template alpaca")
        self.tokenizer = tokenizer
        self.end_markers = [t for t in {tokenizer.eos_token} if t]
        source = tokenizer.chat_template
        source = " ".join(source.values()) if isinstance(source, dict) else str(source)
        self.supports_tools = "tool" in source
        # tools: the template's own rendering when it has one (auto, native), else peftune's format (tools.py)
        self.tool_format = tool_format

    def _render(self, messages: list[dict], gen: bool, tools=None) -> str:
        keep = ("role", "content", "tool_calls", "name", "tool_call_id")
        plain = [{k: m[k] for k in keep if k in m} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=gen)

    def segments(self, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> list[Segment]:
        if has_tools(messages, tools):
            if self.tool_format == "peftune" or (self.tool_format == "auto" and not self.supports_tools):
                messages, tools = to_plain(messages, tools), None
            elif not self.supports_tools:
                raise RowError("this row has tools or tool calls, but the model's chat template does not support "
                               "tools (tool_format native); tool_format auto or peftune renders them in peftune's "
                               "tool format")
        out: list[Segment] = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._render(messages[:i], True, tools)
            after = self._render(messages[: i + 1], False, tools)
            if not before.startswith(done) or not after.startswith(before):
                raise PeftuneError("prompt_template chat: this model's chat template does not render a conversation "
                                   "as a growing prefix, so the response cannot be masked exactly; "
                                   "use --prompt_template alpaca")
            response = after[len(before):]
            tail = ""
            cut = max((response.rfind(m) + len(m) for m in self.end_markers if m in response), default=-1)
            if cut > 0:  # what follows the end-of-turn marker (a newline) belongs to the next prompt
                response, tail = response[:cut], response[cut:]
            out += [Segment(before[len(done):], False), Segment(response, True)]
            done = after[: len(after) - len(tail)]
        if add_generation_prompt:
            rest = self._render(messages, True, tools)
            out.append(Segment(rest[len(done):], False))
        return [s for s in out if s.text or s.trained]


def get_template(name: str, tokenizer, tool_format: str = "auto"):
    """tool_format: how rows with tools are rendered by a chat template (tools.py); file templates always use
    peftune's format."""
    if tool_format not in TOOL_FORMATS:
        raise PeftuneError(f"tool_format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
    if name == "auto":
        name = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if name == "chat":
        return ChatTemplate(tokenizer, tool_format)
    if name in BUILTIN:
        spec = json.loads(resources.files("peftune.data").joinpath(f"templates/{name}.json").read_text("utf-8"))
        return FileTemplate(name, spec)
    if name.endswith(".json") and os.path.isfile(name):
        try:
            with open(name, encoding="utf-8") as fh:
                return FileTemplate(name, json.load(fh))
        except json.JSONDecodeError as e:
            raise PeftuneError(f"{name}: invalid JSON in prompt template: {e}") from None
    raise PeftuneError(f"prompt_template {name!r}: not `auto`, `chat`, {', '.join(BUILTIN)} or a template .json file")


class Renderer:
    """Tokenizes rows with a template into training samples."""

    def __init__(self, tokenizer, template, cutoff_len: int, train_on_inputs: bool = False,
                 add_eos_token: bool = True, mask_history: bool = False) -> None:
        self.tok, self.template = tokenizer, template
        self.cutoff_len, self.train_on_inputs, self.add_eos_token = cutoff_len, train_on_inputs, add_eos_token
        self.mask_history = mask_history
        self.eos_id = tokenizer.eos_token_id
        with_special = tokenizer("a").input_ids
        without = tokenizer("a", add_special_tokens=False).input_ids
        # what the tokenizer puts before text on its own (BOS for LLaMA); chat templates write their own
        self.text_prefix = with_special[: max(0, len(with_special) - len(without))]
        self.prefix_ids = [] if isinstance(template, ChatTemplate) else self.text_prefix

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        """Token ids of a conversation ending in a user turn, ready for generation."""
        ids = list(self.prefix_ids)
        for seg in self.template.segments(messages, add_generation_prompt=True, tools=tools):
            ids += self.encode(seg.text)
        return ids

    def render(self, row: dict) -> list[dict]:
        """One row → samples: one per conversation; plain text is cut into cutoff_len pieces (none dropped)."""
        meta = {"source": row.get("source"), "row": row.get("row")}
        if "text" in row:
            ids = self.text_prefix + self.encode(row["text"]) + ([self.eos_id] if self.add_eos_token else [])
            return [{"input_ids": ids[k:k + self.cutoff_len], "labels": ids[k:k + self.cutoff_len],
                     "truncated": False, "full_length": len(ids), **meta}
                    for k in range(0, len(ids), self.cutoff_len) if len(ids[k:k + self.cutoff_len]) > 1]
        segments = self.template.segments(row["messages"], tools=row.get("tools"))
        last = max((k for k, seg in enumerate(segments) if seg.trained), default=-1)
        input_ids, labels = list(self.prefix_ids), [IGNORE] * len(self.prefix_ids)
        for k, seg in enumerate(segments):
            ids = self.encode(seg.text)
            if seg.trained and self.add_eos_token and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            trained = self.train_on_inputs or (seg.trained and (k == last or not self.mask_history))
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
        # A truncated sample keeps no EOS at its cut: it must not learn to stop mid-answer.
        return [{"input_ids": input_ids[: self.cutoff_len], "labels": labels[: self.cutoff_len],
                 "truncated": len(input_ids) > self.cutoff_len, "full_length": len(input_ids), **meta}]

    def render_all(self, rows: list[dict], warn=print, skip_bad_rows: bool = False) -> list[dict]:
        samples, empty, errors = [], [], RowErrors()
        for row in rows:
            try:
                rendered = self.render(row)
            except RowError as e:
                errors.add(row.get("source"), row.get("row"), str(e))
                continue
            kept = [s for s in rendered if any(label != IGNORE for label in s["labels"])]
            samples += kept
            if not kept:
                empty.append(f"{row.get('source')}:{row.get('row')}")
        if errors.items and not skip_bad_rows:
            errors.raise_if_any()
        if errors.items:
            warn(f"warning: skipped {errors.summary()}")
        if not samples:
            raise PeftuneError(f"cutoff_len {self.cutoff_len} is too small to hold any response: every row's "
                               f"prompt fills it; raise --cutoff_len")
        if empty:
            warn(f"warning: {len(empty)} row(s) have no response token left within cutoff_len {self.cutoff_len} "
                 f"and are skipped: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        truncated = sum(s["truncated"] for s in samples)
        if truncated:
            warn(f"warning: {truncated} of {len(samples)} samples are longer than cutoff_len {self.cutoff_len} "
                 f"and were truncated")
        return samples
