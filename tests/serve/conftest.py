"""A live `peftune serve` in a subprocess on the tiny random LLaMA with two adapters trained here, driven through
the official openai client (as llama.cpp's server tests do)."""

from __future__ import annotations

import pytest
from serving import KEY, Server, train_alpha_and_beta


@pytest.fixture(scope="session")
def adapters(tiny_model_dir, tmp_path_factory):
    return train_alpha_and_beta(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, adapters):
    srv = Server(tiny_model_dir, adapters, "--api_key", KEY, "--max_batch", "8", "--max_body_bytes", "65536",
                 "--enable_adapter_loading")
    yield srv
    srv.stop()
    assert srv.proc.returncode is not None


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
