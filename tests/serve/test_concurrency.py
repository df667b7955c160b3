"""Requests for different adapters at the same moment each get their own adapter's answer; a client that goes away
frees its slot; a full queue answers 429."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serving import KEY, Server, ask

PROMPTS = ["Who are you?", "Hi", "What is your name?", "Tell me a story", "Name?", "你是谁？"]


def test_parallel_requests_across_adapters_get_their_own_answers(client):
    jobs = [(m, p) for p in PROMPTS for m in ("tiny", "alpha", "beta")]
    alone = {job: ask(client, *job, max_tokens=16) for job in jobs}  # one at a time: the reference
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: ask(client, *job, max_tokens=16), jobs * 1)))
    flips = [job for job in jobs if together[job] != alone[job]]
    # batching must never hand a row another adapter's answer; on this tiny fp32 model it changes no token either
    assert not flips, {job: (alone[job], together[job]) for job in flips}


def _stream_request(server, model, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


def test_disconnect_mid_stream_stops_generation(server):
    response = _stream_request(server, "tiny", 900)  # far more tokens than it gets time for
    for _ in range(3):  # the role chunk and two text chunks: generating now
        assert response.readline().startswith(b"data: ")
        response.readline()
    assert server.health()["running"] == 1
    response.close()  # the client goes away
    deadline = time.time() + 20
    while server.health()["running"]:
        assert time.time() < deadline, "the request kept generating after its client left"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, adapters):
    srv = Server(tiny_model_dir, adapters, "--max_batch", "1", "--max_queue", "1")
    yield srv
    srv.stop()


def test_a_full_queue_answers_429_with_retry_after(small_server):
    from openai import OpenAI

    client = OpenAI(base_url=small_server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    busy = [_stream_request(small_server, "tiny", 900) for _ in range(2)]  # one running, one waiting
    busy[0].readline()
    with pytest.raises(openai.RateLimitError) as e:
        ask(client, "beta", max_tokens=2)
    assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    for r in busy:
        r.close()
    deadline = time.time() + 30
    while True:  # the slots come back: the server answers again
        try:
            assert ask(client, "beta", max_tokens=2) is not None
            break
        except openai.RateLimitError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_many_clients_at_once_all_finish(client):
    threads, results = [], []

    def one(i):
        r = client.chat.completions.create(model=("alpha", "beta", "tiny")[i % 3], max_tokens=8, temperature=0.8,
                                           messages=[{"role": "user", "content": f"Count to {i}"}], seed=i)
        results.append(r.choices[0].finish_reason)

    for i in range(12):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 12 and set(results) <= {"stop", "length"}
