"""Training on 2 processes (torchrun, gloo, CPU): gradients are synchronised, the adapter equals one process's with
the same global batch, a process without labelled tokens or without a micro-batch of its own does not hang, a
kill -9 and resume gives the uninterrupted run's adapter byte for byte, and a resume with another number of
processes is refused."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny import train_process

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
        "--micro_batch_size", "1", "--num_epochs", "2", "--val_set_size", "4", "--lora_r", "4", "--learning_rate",
        "1e-2", "--mixed_precision", "no", "--logging_steps", "1", "--eval_steps", "3", "--save_steps", "2"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["data", "empty"])
def test_every_process_holds_the_same_synchronised_gradients(mode, tiny_model_dir, tmp_path):
    done = torchrun(os.path.join(HERE, "ddp_worker.py"), tiny_model_dir, str(tmp_path), mode)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    synced = [k for k in r0 if k.startswith("synced.") and "lora_B" in k]
    assert synced
    for k in synced:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)
        local = "local." + k[len("synced."):]
        # the canary: each process's own gradient differs, and the synchronised one is their mean
        assert not torch.equal(r0[local], r1[local])
        torch.testing.assert_close(r0[k], (r0[local] + r1[local]) / 2, rtol=1e-5, atol=1e-7)
    if mode == "empty":  # process 1 had no labelled token: its own gradient is zero, and nothing hung
        assert all(float(r1["local." + k[len("synced."):]].abs().max()) == 0 for k in synced)


def weights(run) -> dict:
    return load_file(os.path.join(run, "adapter_model.safetensors"))


def test_two_processes_train_the_adapter_one_process_trains(tiny_model_dir, uneven_data, tmp_path):
    one = train_process(tiny_model_dir, uneven_data, tmp_path / "one", *ARGS, "--lora_dropout", "0",
                        "--num_epochs", "1")
    two = train_process(tiny_model_dir, uneven_data, tmp_path / "two", *ARGS, "--lora_dropout", "0",
                        "--num_epochs", "1", "--num_processes", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the same sums in another order: equal to float rounding, relative to each tensor's size
        assert float((b[k] - a[k]).norm() / a[k].norm()) <= 1e-5, k
    assert any(float(a[k].abs().max()) > 1e-3 for k in a if "lora_B" in k)  # it trained
    m1 = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]  # written once, by process 0
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and len(m1) == 6
    for r1, r2 in zip(m1, m2):
        assert r2["tokens"] == r1["tokens"] and r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith(".peftune-write-test")]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_kill_9_then_resume_on_two_processes_gives_the_same_adapter(tiny_model_dir, uneven_data, tmp_path):
    extra = ["--lora_dropout", "0.1", "--num_processes", "2"]
    whole = train_process(tiny_model_dir, uneven_data, tmp_path / "whole", *ARGS, *extra)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = train_process(tiny_model_dir, uneven_data, tmp_path / "cut", *ARGS, *extra, fault="after_step:5")
    assert killed.returncode != 0
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    # another number of processes is refused, naming it
    other = train_process(tiny_model_dir, uneven_data, tmp_path / "cut", *ARGS, "--lora_dropout", "0.1",
                          "--resume_from_checkpoint", "auto")
    assert other.returncode == 2 and "processes" in other.stderr, other.stderr[-2000:]
    resumed = train_process(tiny_model_dir, uneven_data, tmp_path / "cut", *ARGS, *extra,
                            "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha(tmp_path / "cut" / "adapter_model.safetensors") == sha(tmp_path / "whole" / "adapter_model.safetensors")
