"""Every refusal is a 4xx in OpenAI's error shape; nothing a client sends produces a 5xx or stops the server."""

import json
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import KEY


def post(server, path, body, key=KEY, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def shape(payload: bytes) -> dict:
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param, needle", [
    ({"model": "alpha"}, "messages", "Field required"),
    ({"model": "alpha", "messages": []}, "messages", "at least 1"),
    ({"model": "alpha", "messages": "hi"}, "messages", "valid list"),
    ({"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
    ({"model": "alpha", "messages": MSG, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "alpha", "messages": MSG, "temperature": "hot"}, "temperature", "valid number"),
    ({"model": "alpha", "messages": MSG, "top_p": 0}, "top_p", "greater than 0"),
    ({"model": "alpha", "messages": MSG, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "alpha", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "alpha", "messages": MSG, "n": 3}, "n", "only n = 1"),
    ({"model": 5, "messages": MSG}, "model", "valid string"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(server, body, param, needle):
    status, payload = post(server, "/v1/chat/completions", body)
    err = shape(payload)
    assert status == 400 and err["type"] == "invalid_request_error", payload
    assert err["param"] == param and needle in err["message"], err


def test_malformed_json_unknown_fields_unknown_model(server):
    status, payload = post(server, "/v1/chat/completions", None, raw=b'{"model": "alpha", "messages": [')
    assert status == 400 and "not valid JSON" in shape(payload)["message"]
    status, payload = post(server, "/v1/chat/completions", None, raw=b"[1, 2]")
    assert status == 400 and "JSON object" in shape(payload)["message"]
    status, payload = post(server, "/v1/chat/completions", {"model": "alpha", "messages": MSG, "max_tokens": 2,
                                                            "logit_bias": {}, "user": "u", "whatever": [1]})
    assert status == 200  # unknown extra fields are ignored
    status, payload = post(server, "/v1/chat/completions", {"model": "gamma", "messages": MSG})
    err = shape(payload)
    assert status == 404 and err["param"] == "model" and err["code"] == "model_not_found"


def test_prompt_longer_than_the_context_gives_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="x" * 1100, max_tokens=2)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and "1024 tokens" in err["message"] and "1100" in err["message"]


def test_body_size_limit_is_413(server):
    status, payload = post(server, "/v1/chat/completions", {"model": "alpha", "messages": [
        {"role": "user", "content": "x" * 70000}]})
    assert status == 413 and "larger than 65536 bytes" in shape(payload)["message"]


def test_wrong_key_is_401_before_anything_else(server):
    status, payload = post(server, "/v1/chat/completions", {"model": "gamma"}, key="nope")
    assert status == 401 and shape(payload)["type"] == "authentication_error"


def test_load_and_unload_adapters_at_run_time(server, client, adapters):
    status, payload = post(server, "/v1/load_lora_adapter", {"lora_name": "alpha2", "lora_path": adapters["alpha"]})
    assert status == 200 and b"added successfully" in payload
    assert [m.id for m in client.models.list().data][-1] == "alpha2"
    from serving import ask

    assert ask(client, "alpha2") == ask(client, "alpha")
    status, payload = post(server, "/v1/load_lora_adapter", {"lora_name": "alpha2", "lora_path": adapters["alpha"]})
    assert status == 400 and "already been loaded" in shape(payload)["message"]
    status, payload = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"})
    assert status == 400 and "no such directory" in shape(payload)["message"]
    status, payload = post(server, "/v1/unload_lora_adapter", {"lora_name": "alpha2"})
    assert status == 200 and b"removed successfully" in payload
    status, payload = post(server, "/v1/unload_lora_adapter", {"lora_name": "alpha2"})
    assert status == 404
    status, payload = post(server, "/v1/load_lora_adapter", {"lora_name": "y", "lora_path": adapters["beta"]},
                           key="wrong")
    assert status == 401


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                       | st.text(max_size=30), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=12)
FIELDS = {"model": st.sampled_from(["alpha", "beta", "tiny", "nope", ""]) | JSONISH,
          "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool",
                                                                                "bad"]) | JSONISH,
                                                      "content": st.text(max_size=40) | JSONISH}), max_size=3) | JSONISH,
          "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=5) | JSONISH,
          "max_tokens": st.integers(-3, 4) | JSONISH, "temperature": st.floats(-1, 3) | JSONISH,
          "top_p": st.floats(-1, 2) | JSONISH, "stop": JSONISH, "seed": JSONISH, "n": JSONISH, "stream": JSONISH,
          "stream_options": JSONISH, "repetition_penalty": JSONISH, "echo": JSONISH}


@settings(max_examples=220, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter"]),
       body=st.fixed_dictionaries({}, optional=FIELDS) | JSONISH, garbage=st.none() | st.binary(max_size=60))
def test_fuzzed_requests_never_get_a_5xx(server, path, body, garbage):
    if isinstance(body, dict) and body.get("max_tokens") not in (None,) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)  # bounded work per request
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        body.setdefault("max_tokens", 2)
    if isinstance(body, dict) and "prompt" in body:
        body.setdefault("max_tokens", 2)
    status, payload = post(server, path, body, raw=garbage)
    assert status < 500, (status, payload[:300])
    if status >= 400:
        shape(payload)
