"""Record formats → uniform rows, with row-precise validation.

A conversation row: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}],
"tools": list | None}`; a plain-text row: `{"text": str}`. Each converter returns the row, or None after
adding what is wrong to `errors` (as `FILE:ROW: message`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..config import FORMATS  # noqa: F401  (the schema owns the names; re-exported for callers)
from ..errors import PeftuneError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "function_call", "observation": "tool", "tool": "tool"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """One problem with one row (its message names the field)."""


MAX_REPORTED = 10


class RowErrors:
    """Collects `FILE:ROW: message` problems; raises one PeftuneError listing the first few and the count."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, row: int, message: str) -> None:
        self.items.append(f"{path}:{row}: {message}")

    def summary(self) -> str:
        shown = "\n".join(self.items[:MAX_REPORTED])
        more = f"\n... and {len(self.items) - MAX_REPORTED} more" if len(self.items) > MAX_REPORTED else ""
        return f"{len(self.items)} problem{'s' * (len(self.items) > 1)}:\n{shown}{more}"

    def raise_if_any(self) -> None:
        from ..hints import setting

        if self.items:
            raise PeftuneError(f"invalid data ({self.summary()})\n({setting('skip_bad_rows', 'true')} skips such "
                               "rows instead)")


def detect_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if "prompt" in rec or "completion" in rec:
        return "prompt_completion"
    if "text" in rec:
        return "text"
    return None


def _string(rec: dict, key: str, required: bool = True, where: str = "") -> str | None:
    value = rec.get(key)
    name = f"{where}{key}"
    if value is None:
        if required:
            raise RowError(f"missing required field `{name}`")
        return None
    if not isinstance(value, str):
        raise RowError(f"field `{name}` must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"field `{name}` is empty")
    return value


def _tools(rec: dict) -> list | None:
    tools = rec.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError(f"field `tools` is not valid JSON: {e.msg}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("field `tools` must be a list of tool (function) descriptions")
    return tools


def _need_assistant(messages: list[dict]) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn (nothing to learn)")


def alpaca(rec: dict) -> dict:
    instruction, output = _string(rec, "instruction"), _string(rec, "output")
    extra, system = _string(rec, "input", False), _string(rec, "system", False)
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise RowError("field `history` must be a list of [user, assistant] string pairs")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    # instruction/input also stay apart, for templates that place them separately (alpaca-lora's)
    messages += [{"role": "user", "content": prompt, "instruction": instruction, "input": extra or ""},
                 {"role": "assistant", "content": output}]
    return {"messages": messages}


def _turns(rec: dict, field: str, role_key: str, text_key: str, roles):
    """(where, turn, role) for each turn of a conversation list, each checked to be an object with a known role."""
    turns = rec.get(field)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field `{field}` must be a non-empty list of {{{role_key}, {text_key}}} turns")
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]."
        if not isinstance(turn, dict):
            raise RowError(f"`{field}[{i}]` must be an object with `{role_key}` and `{text_key}`")
        role = _string(turn, role_key, where=where)
        if role not in roles:
            raise RowError(f"`{where}{role_key}`: unknown role {role!r} (expected one of {', '.join(roles)})")
        yield where, turn, role


def sharegpt(rec: dict) -> dict:
    system = _string(rec, "system", False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for where, turn, speaker in _turns(rec, "conversations", "from", "value", SHAREGPT_ROLES):
        value = _string(turn, "value", where=where)
        role = SHAREGPT_ROLES[speaker]
        if role == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise RowError(f"`{where}value`: a function_call must be JSON {{name, arguments}}: {e.msg}") from None
            calls = call if isinstance(call, list) else [call]
            if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
                raise RowError(f"`{where}value`: a function_call needs a `name`")
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                for c in calls]})
        else:
            messages.append({"role": role, "content": value})
    _need_assistant(messages)
    return {"messages": messages, "tools": _tools(rec)}


def openai(rec: dict) -> dict:
    messages = []
    for where, msg, role in _turns(rec, "messages", "role", "content", OPENAI_ROLES):
        calls = msg.get("tool_calls")
        content = _string(msg, "content", required=not (role == "assistant" and calls), where=where) or ""
        out = {"role": role, "content": content}
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise RowError(f"`{where}tool_calls` must be a list, on an assistant message")
            out["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if isinstance(msg.get(key), str):
                out[key] = msg[key]
        messages.append(out)
    _need_assistant(messages)
    return {"messages": messages, "tools": _tools(rec)}


def prompt_completion(rec: dict) -> dict:
    return {"messages": [{"role": "user", "content": _string(rec, "prompt")},
                         {"role": "assistant", "content": _string(rec, "completion")}]}


def text(rec: dict) -> dict:
    return {"text": _string(rec, "text")}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "alpaca": alpaca, "sharegpt": sharegpt, "openai": openai, "prompt_completion": prompt_completion, "text": text}


def apply_columns(rec: Any, columns: dict[str, str] | None) -> Any:
    """The user's field names → ours (`columns: {instruction: question, output: answer}`)."""
    if not columns or not isinstance(rec, dict):
        return rec
    return {**rec, **{ours: rec[theirs] for ours, theirs in columns.items() if theirs in rec}}


def convert(rec: Any, fmt: str, columns: dict[str, str] | None = None) -> dict:
    """One record → a row in the uniform shape; raises RowError."""
    if not isinstance(rec, dict):
        raise RowError(f"expected an object ({fmt} row), got {type(rec).__name__}")
    return CONVERTERS[fmt](apply_columns(rec, columns))
