"""The server's streamed tool calls (serve/tools.py): text goes out until a call may begin, a call never leaks as
text, a call that does not parse ends as text."""

import json

from peftune.serve.tools import CallStream, forced_prefix, message


def feed(pieces, prefix=""):
    stream = CallStream(prefix)
    shown = "".join(stream.push(p) for p in pieces)
    rest, deltas = stream.finish()
    return shown, rest, deltas


def test_text_before_a_call_streams_and_the_call_becomes_deltas():
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    pieces = ["Let me ", "look. <", "tool", "_call>", call[len("<tool_call>"):]]
    shown, rest, deltas = feed(pieces)
    assert shown == "Let me look. " and rest == ""
    assert deltas[0]["index"] == 0 and deltas[0]["function"]["name"] == "f"
    assert json.loads(deltas[0]["function"]["arguments"]) == {"x": 1}


def test_a_held_tail_that_is_no_call_and_a_broken_call_come_back_as_text():
    assert feed(["a <tool", " box"]) == ("a <tool box", "", None)
    shown, rest, deltas = feed(["ok <tool_call>{broken"])
    assert (shown + rest, deltas) == ("ok <tool_call>{broken", None)


def test_forced_prefixes_and_whole_answers():
    assert forced_prefix("required") == "<tool_call>\n" and forced_prefix("auto") == ""
    shown, rest, deltas = feed(['{"a": 2}}\n</tool_call>'], prefix='<tool_call>\n{"name": "g", "arguments": ')
    assert shown == "" and deltas[0]["function"]["name"] == "g"
    msg, finish = message('<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert finish == "tool_calls" and msg["content"] is None and msg["tool_calls"][0]["id"].startswith("call-")
    assert message("plain") == ({"role": "assistant", "content": "plain"}, None)
