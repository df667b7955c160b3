"""`peftune serve --engine llama.cpp`: the same API computed by llama.cpp (the tiny base written once as an f16 GGUF,
each adapter as a LoRA GGUF): each adapter's own answers, the same as `peftune chat --engine llama.cpp`, answers that
do not depend on what else is running, prompt prefixes kept, sequences freed."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import KEY, Server, ask, train_alpha_and_beta

from peftune import cli

PROMPTS = ["Who are you?", "Hi", "What is your name?", "Tell me a story", "你是谁？"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("peftune-cache"))


@pytest.fixture(scope="module")
def adapters(tiny_bpe_model_dir, tmp_path_factory):
    """As the other serve tests' (conftest.py), on the tiny base whose tokenizer can be written as GGUF."""
    return train_alpha_and_beta(tiny_bpe_model_dir, tmp_path_factory.mktemp("bpe-adapters"))


@pytest.fixture(scope="module")
def cpp_server(tiny_bpe_model_dir, adapters, cache):
    srv = Server(tiny_bpe_model_dir, adapters, "--engine", "llama.cpp", "--api_key", KEY, "--max_batch", "4",
                 "--max_model_len", "512", "--enable_adapter_loading", env={"PEFTUNE_CACHE": cache})
    yield srv
    srv.stop()


@pytest.fixture
def cpp(cpp_server):
    from openai import OpenAI

    return OpenAI(base_url=cpp_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_it_says_it_runs_llama_cpp_and_each_adapter_answers_its_own_way(cpp_server, cpp, cache):
    assert "weights: llama.cpp:" in cpp_server.output()
    assert [m.id for m in cpp.models.list().data] == ["tiny", "alpha", "beta"]
    answers = {m: ask(cpp, m) for m in ("tiny", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers


@pytest.mark.parametrize("model", ["alpha", "beta"])
def test_matches_peftune_chat_on_llama_cpp(cpp, adapters, model, capsys, cache, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", cache)
    prompt = "What is your name?"
    assert cli.main(["chat", "--engine", "llama.cpp", "--adapter", adapters[model], "--json", "--prompt", prompt,
                     "--max_new_tokens", "10", "--repetition_penalty", "1.1"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]
    assert ask(cpp, model, prompt, max_tokens=10, extra_body={"repetition_penalty": 1.1}).strip() == expected


def test_answers_do_not_depend_on_what_else_runs(cpp):
    jobs = [(m, p) for p in PROMPTS for m in ("tiny", "alpha", "beta")]
    alone = {job: ask(cpp, *job, max_tokens=16) for job in jobs}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: ask(cpp, *job, max_tokens=16), jobs)))
    # f32 keys and values without flash attention (cpp.py): the cells other rows hold change no number
    assert {j: together[j] for j in jobs} == alone


def test_streamed_equals_whole_and_prefixes_are_kept(cpp):
    messages = [{"role": "user", "content": "Tell me a story about the sea"}]
    whole = cpp.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
    again = cpp.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == whole.choices[0].message.content
    other = cpp.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0)
    assert other.choices[0].message.content != whole.choices[0].message.content  # no prefix of another adapter
    chunks = list(cpp.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_sequences_are_freed_after_stops_and_disconnects(cpp_server, cpp):
    import urllib.request

    before = ask(cpp, "alpha")
    for i in range(12):  # three times --max_batch: a sequence that was not freed would run out
        r = cpp.chat.completions.create(model=("alpha", "beta", "tiny")[i % 3], max_tokens=4, temperature=0,
                                        messages=[{"role": "user", "content": f"question {i}"}])
        assert r.choices[0].finish_reason in ("stop", "length")
    for _ in range(5):
        body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "Tell me a story"}],
                           "max_tokens": 400, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(cpp_server.url + "/v1/chat/completions", data=body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = urllib.request.urlopen(req, timeout=30)
        for _ in range(3):
            response.readline()
        response.close()
        deadline = time.time() + 20
        while cpp_server.health()["running"]:
            assert time.time() < deadline, "the request kept generating after its client left"
            time.sleep(0.05)
    assert ask(cpp, "alpha") == before


def test_prompt_longer_than_max_model_len_is_400(cpp):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        ask(cpp, "alpha", "word " * 600)
    assert "512" in str(e.value)


def test_load_and_unload_at_run_time(cpp, cpp_server, adapters):
    import urllib.request

    def post(path, body):
        req = urllib.request.Request(cpp_server.url + path, data=json.dumps(body).encode(), headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status

    alpha = ask(cpp, "alpha")
    assert post("/v1/load_lora_adapter", {"lora_name": "alpha2", "lora_path": adapters["alpha"]}) == 200
    assert ask(cpp, "alpha2") == alpha
    assert post("/v1/unload_lora_adapter", {"lora_name": "alpha2"}) == 200
    assert [m.id for m in cpp.models.list().data] == ["tiny", "alpha", "beta"]
    assert ask(cpp, "alpha") == alpha
