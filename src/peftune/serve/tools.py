"""OpenAI tool calling over the `<tool_call>` format (data/tools.py: peftune's own tool format, also Hermes-style and
Qwen2.5 templates'): what a request's `tool_choice` makes the answer begin with, and the model's answer as
`tool_calls`, whole or streamed. An answer whose calls are not valid JSON comes back as plain text."""

from __future__ import annotations

import json

from ..data.tools import parse_calls
from ..infer.sampling import partial_tail
from .protocol import new_id

OPEN = "<tool_call>"


def forced_prefix(tool_choice) -> str:
    """The text the answer is made to begin with: a call for `required`, that function's call for a named one."""
    if tool_choice == "required":
        return OPEN + "\n"
    name = getattr(getattr(tool_choice, "function", None), "name", None)
    if name:
        return OPEN + "\n" + '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
    return ""


def with_ids(calls: list[dict]) -> list[dict]:
    return [{"id": new_id("call"), **call} for call in calls]


def message(text: str) -> tuple[dict, str | None]:
    """The assistant message of a whole answer, and "tool_calls" as its finish reason when it called any."""
    parsed = parse_calls(text)
    if parsed is None:
        return {"role": "assistant", "content": text}, None
    content, calls = parsed
    return {"role": "assistant", "content": content or None, "tool_calls": with_ids(calls)}, "tool_calls"


class CallStream:
    """A streamed answer with tools: its text goes out as content until a call may begin (a tail that could be the
    start of `<tool_call>` waits for the next piece); from the first call on it is held, and at the end it becomes
    tool-call deltas, or, when the calls do not parse, the rest of the text."""

    def __init__(self, prefix: str = "") -> None:
        self.text, self.shown, self.held = prefix, 0, bool(prefix)

    def push(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        start = self.text.find(OPEN, self.shown)
        if start >= 0:
            self.held = True
            out, self.shown = self.text[self.shown:start], start
            return out
        safe = len(self.text) - partial_tail(self.text[self.shown:], OPEN)
        out, self.shown = self.text[self.shown:safe], safe
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(text not shown yet, the tool-call deltas or None). Text before the first call was shown already."""
        parsed = parse_calls(self.text)
        if parsed is None:
            rest, self.shown = self.text[self.shown:], len(self.text)
            return rest, None
        return "", [{"index": i, **call} for i, call in enumerate(with_ids(parsed[1]))]
