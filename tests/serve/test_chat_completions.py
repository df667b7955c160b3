"""POST /v1/chat/completions: streamed and not, usage, stop, seed; each adapter answers as it was trained and as
`peftune chat` does."""

import json

import openai
import pytest
from serving import ask

from peftune import cli

MSG = [{"role": "user", "content": "Who are you?"}]


def stream(client, model, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return list(client.chat.completions.create(model=model, messages=MSG, stream=True, **kw))


@pytest.mark.parametrize("model", ["tiny", "alpha", "beta"])
def test_streamed_equals_not_streamed_at_temperature_0(client, model):
    whole = client.chat.completions.create(model=model, messages=MSG, max_tokens=12, temperature=0)
    chunks = stream(client, model, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]  # exactly one chunk has it
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens <= 12
    assert all(c.usage is None for c in chunks[:-1])
    assert whole.model == model and whole.object == "chat.completion"


def test_without_include_usage_there_is_no_usage_chunk(client):
    chunks = stream(client, "alpha")
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason


def test_each_adapter_differs_from_the_base_and_from_each_other(client):
    answers = {m: ask(client, m) for m in ("tiny", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers


@pytest.mark.parametrize("model", ["alpha", "beta"])
def test_matches_peftune_chat(client, adapters, model, capsys):
    prompt = "What is your name?"
    assert cli.main(["chat", "--adapter", adapters[model], "--json", "--prompt", prompt, "--max_new_tokens", "10",
                     "--repetition_penalty", "1.1"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]
    served = ask(client, model, prompt, max_tokens=10, extra_body={"repetition_penalty": 1.1})
    assert served.strip() == expected


def test_adapter_system_prompt_and_template_are_its_own(client):
    def run(model, messages):
        r = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=messages)
        return r.choices[0].message.content, r.usage.prompt_tokens

    # alpha was trained under "You are alpha.": a conversation without a system message gets exactly that prompt
    plain = run("alpha", MSG)
    assert plain == run("alpha", [{"role": "system", "content": "You are alpha."}, *MSG])
    # a client's own system (or developer) message replaces it: a prompt of another length
    other = run("alpha", [{"role": "developer", "content": "You are someone else entirely."}, *MSG])
    assert other[1] == plain[1] - len("You are alpha.") + len("You are someone else entirely.")  # byte tokens
    # beta was trained with the alpaca template, the base answers with its chat template: the prompts differ
    assert run("beta", MSG)[1] != run("tiny", MSG)[1]


def test_max_tokens_stop_and_seed(client):
    long = client.chat.completions.create(model="alpha", messages=MSG, max_completion_tokens=3, temperature=0)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 3
    full = ask(client, "beta", max_tokens=20)
    word = full[5:7]  # a stop string that the answer reaches after a few tokens
    stopped = client.chat.completions.create(model="beta", messages=MSG, max_tokens=20, temperature=0, stop=[word])
    assert stopped.choices[0].message.content == full[:full.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in stream(client, "beta", max_tokens=20, stop=word)
                       if c.choices)
    assert streamed == stopped.choices[0].message.content  # no piece of the stop string leaks into the stream
    sampled = [ask(client, "tiny", temperature=1.0, seed=7, max_tokens=16) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert ask(client, "tiny", temperature=1.0, seed=8, max_tokens=16) != sampled[0]


def test_n_other_than_1_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=MSG, n=2)
    assert e.value.body["param"] == "n"
