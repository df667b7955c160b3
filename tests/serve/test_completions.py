"""POST /v1/completions: a raw prompt, streamed and not."""

import pytest


@pytest.mark.parametrize("model", ["tiny", "beta"])
def test_completion_streamed_equals_whole(client, model):
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_default_length_echo_and_token_prompt(client):
    default = client.completions.create(model="alpha", prompt="abc", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    echoed = client.completions.create(model="alpha", prompt="abc", temperature=0, max_tokens=4, echo=True)
    plain = client.completions.create(model="alpha", prompt="abc", temperature=0, max_tokens=4)
    assert echoed.choices[0].text == "abc" + plain.choices[0].text
    ids = client.completions.create(model="alpha", prompt=[97, 98, 99], temperature=0, max_tokens=4)
    assert ids.usage.prompt_tokens == 3
