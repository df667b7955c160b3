"""peftune's tool format (data/tools.py): rows with tools render through any template, the assistant's text and
calls carry the loss and the definitions and results do not; the parser reads a model's answer back."""

import json

import pytest

from peftune.data.render import IGNORE, Renderer, get_template
from peftune.data.sources import load_rows
from peftune.data.tools import parse_calls
from tiny import CHATML, make_tokenizer

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Weather in Paris and Rome?"},
    {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                   {"name": "get_weather", "arguments": {"city": "Rome"}}])},
    {"from": "observation", "value": '{"paris": "sunny"}'},
    {"from": "gpt", "value": "Sunny in Paris."}], "tools": json.dumps([WEATHER]), "system": "Be brief."}
OPENAI = {"messages": [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "rainy"},
    {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."}],
    "tools": [{"type": "function", "function": WEATHER}]}


def render(tmp_path, rec, template="chat", tool_format="auto"):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([rec]), encoding="utf-8")
    tok = make_tokenizer(chat_template=CHATML)
    (row,) = load_rows([str(path)])
    (sample,) = Renderer(tok, get_template(template, tok, tool_format), 4096).render(row)
    text = tok.decode(sample["input_ids"])
    trained = tok.decode([t for t in sample["labels"] if t != IGNORE])
    return text, trained


def test_sharegpt_tool_rows_render_in_peftune_format_with_exact_masks(tmp_path):
    text, trained = render(tmp_path, SHAREGPT)
    calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert trained == calls + "<|im_end|>" + "Sunny in Paris.<|im_end|>"  # both parallel calls, then the answer
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in text and "<tools>" in text  # the definitions: prompt, no loss
    assert '<|im_start|>user\n<tool_response>\n{"paris": "sunny"}\n</tool_response><|im_end|>' in text
    assert "sunny" not in trained


def test_openai_tool_rows_keep_text_before_calls_and_merge_results(tmp_path):
    text, trained = render(tmp_path, OPENAI)
    assert trained.startswith('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert trained.endswith("Sunny in Paris, rainy in Rome.<|im_end|>")
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
            "<|im_end|>") in text
    assert "rainy" not in trained.replace("rainy in Rome", "")


def test_file_templates_render_tools_too_and_native_refuses(tmp_path):
    text, trained = render(tmp_path, SHAREGPT, template="alpaca")
    assert "<tool_call>" in trained and "<tools>" in text and "<tool_response>" in text
    with pytest.raises(Exception, match="does not support tools .tool_format native."):
        render(tmp_path, SHAREGPT, tool_format="native")


def test_bad_call_arguments_name_the_row(tmp_path):
    bad = json.loads(json.dumps(OPENAI))
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([bad]), encoding="utf-8")
    tok = make_tokenizer(chat_template=CHATML)
    with pytest.raises(Exception, match=r"rows.json:1: tool call arguments are not valid JSON"):
        Renderer(tok, get_template("chat", tok), 4096).render_all(load_rows([str(path)]))


def test_the_parser_reads_calls_back_and_leaves_other_text_alone():
    one = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_calls(one) == ("Sure.", [{"type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}])
    two = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
           '"{\\"x\\": 1}"}</tool_call> trailing')
    content, calls = parse_calls(two)
    assert content == "" and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"x": 1}
    for text in ("no call here", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "a", "arguments": [1]}</tool_call>', "<tool_call>unclosed"):
        assert parse_calls(text) is None, text
