"""A live `peftune serve` in a subprocess on the tiny random LLaMA with two adapters trained here, driven through
the official openai client (as llama.cpp's server tests do)."""

from __future__ import annotations

import json

import pytest
from serving import KEY, Server

from peftune import cli

TRAIN = ["--batch_size", "4", "--micro_batch_size", "4", "--num_epochs", "10", "--learning_rate", "3e-2",
         "--lora_r", "8", "--val_set_size", "0", "--cutoff_len", "384", "--logging_steps", "40"]


def _train(base: str, out, answer: str, *extra: str) -> str:
    data = out.parent / f"{out.name}.json"
    rows = [{"instruction": q, "output": answer} for q in ("Who are you?", "What is your name?", "Hi", "Name?")]
    data.write_text(json.dumps(rows * 4), encoding="utf-8")
    assert cli.main(["train", "--base_model", base, "--data_path", str(data), "--output_dir", str(out), *TRAIN,
                     *extra]) == 0
    return str(out)


@pytest.fixture(scope="session")
def adapters(tiny_model_dir, tmp_path_factory):
    """alpha: trained with its own system prompt; beta: trained with the alpaca template (not the base's chat one)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": _train(tiny_model_dir, root / "alpha", "I am alpha, the first.", "--system_prompt",
                            "You are alpha."),
            "beta": _train(tiny_model_dir, root / "beta", "beta here!", "--prompt_template", "alpaca")}


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
