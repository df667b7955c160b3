"""Fixtures on tiny.py's byte-level tokenizer and random 2-layer LLaMA (no download)."""

from __future__ import annotations

import json
import os

import pytest
from tiny import MERGES, ROWS, make_model, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random LLaMA with a ChatML template, usable as --base_model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bpe_model_dir(tmp_path_factory):
    """The tiny LLaMA with a tokenizer that has BPE merges: a base that can be written as a GGUF file."""
    path = tmp_path_factory.mktemp("tiny-bpe-llama")
    tok = make_tokenizer(merges=MERGES)
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def data_file(tmp_path):
    """A small alpaca .json file (rows repeated so there is something to batch)."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS * 6, ensure_ascii=False), encoding="utf-8")
    return str(path)
