"""peftune's tool format: function calling for any model, including those whose chat template knows no tools.

A conversation with tools becomes one in plain roles, which every template renders:
- the tool definitions go into the system turn (after the conversation's own system prompt), one JSON object a line
  inside `<tools></tools>`, with how to call them;
- an assistant's calls follow its text (if any) as tagged JSON blocks, one per call (several for parallel calls):
  `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`;
- the tool results become a user turn of `<tool_response>\n...\n</tool_response>` blocks (consecutive results in one
  turn, in order).
This is the layout of Hermes-style and Qwen2.5 chat templates, so models that know it from pre-training start close.
The assistant turns (text and calls) are responses and carry the loss; the definitions and the results are prompt.
`parse_calls` reads the model's output back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re

from .formats import RowError

FORMATS = ("auto", "native", "peftune")
INSTRUCTIONS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
                "</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}}\n</tool_call>")
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def has_tools(messages: list[dict], tools) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def _definition(tool: dict) -> dict:
    """OpenAI's {"type": "function", "function": {...}} or a bare {name, description, parameters}."""
    return tool if "function" not in tool else {"type": "function", "function": tool["function"]}


def _arguments(args):
    """Arguments as an object: OpenAI sends them as a JSON string, sharegpt rows as an object."""
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise RowError(f"tool call arguments are not valid JSON: {args[:80]!r}") from None
    return {} if args is None else args


def format_call(call: dict) -> str:
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RowError("a tool call needs a function `name`")
    body = {"name": function["name"], "arguments": _arguments(function.get("arguments"))}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


def system_text(system: str | None, tools: list) -> str:
    listed = "\n".join(json.dumps(_definition(t), ensure_ascii=False) for t in tools)
    block = INSTRUCTIONS.format(tools=listed)
    return f"{system}\n\n{block}" if system else block


def to_plain(messages: list[dict], tools) -> list[dict]:
    """The conversation in system/user/assistant roles only, in peftune's tool format."""
    out: list[dict] = []
    if tools:
        first = messages[0] if messages and messages[0]["role"] == "system" else None
        out.append({"role": "system", "content": system_text(first["content"] if first else None, tools)})
        messages = messages[1:] if first else messages
    for msg in messages:
        role = msg["role"]
        if role == "assistant" and msg.get("tool_calls"):
            parts = ([msg["content"]] if msg.get("content") else []) + [format_call(c) for c in msg["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            block = f"<tool_response>\n{msg.get('content', '')}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append({k: v for k, v in msg.items() if k in ("role", "content")})
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


def parse_calls(text: str) -> tuple[str, list[dict]] | None:
    """A model's answer in this format: (the text before the first call, stripped; OpenAI tool_calls with
    `arguments` as a JSON string), or None when it holds no call, or any call is not JSON with a string `name`
    and object `arguments` (the caller then returns the text as it is)."""
    found = list(CALL.finditer(text))
    if not found:
        return None
    calls = []
    for match in found:
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return None
        args = body.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"type": "function", "function": {"name": body["name"],
                                                       "arguments": json.dumps(args, ensure_ascii=False)}})
    return text[: found[0].start()].strip(), calls
