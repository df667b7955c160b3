"""Crash, signal and corruption tests: a subprocess on a tiny model is killed at exact points
(PEFTUNE_FAULT), resumed, and its final adapter compared bit for bit with an uninterrupted run."""

import errno
import hashlib
import json
import os
import pickle
import signal
import time

import pytest
from tiny import train_process

from peftune import cli
from peftune.train import checkpoint

ARGS = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
        "--micro_batch_size", "2", "--num_epochs", "2", "--learning_rate", "1e-2", "--lora_r", "4",
        "--lora_dropout", "0.1", "--val_set_size", "4", "--eval_steps", "3", "--logging_steps", "1",
        "--save_steps", "2", "--save_total_limit", "3"]


def run(tiny_model_dir, data_file, out, *extra, fault=None, wait=True):
    return train_process(tiny_model_dir, data_file, out, *ARGS, *extra, fault=fault, wait=wait)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def metrics(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "eval_s", "tokens_per_s")} for r in rows]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    from tiny import ROWS

    data = tmp_path_factory.mktemp("data") / "rows.json"
    data.write_text(json.dumps(ROWS * 6, ensure_ascii=False), encoding="utf-8")
    out = tmp_path_factory.mktemp("reference")
    proc = run(tiny_model_dir, str(data), out)
    assert proc.returncode == 0, proc.stderr
    return str(data), out


@pytest.mark.parametrize("fault", ["after_step:3", "in_checkpoint:4", "in_eval:6", "after_step:9"])
def test_kill_9_then_resume_is_bit_identical(tiny_model_dir, reference, tmp_path, fault):
    data, ref = reference
    out = tmp_path / "run"
    killed = run(tiny_model_dir, data, out, fault=fault)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".tmp")] or fault.startswith("in_checkpoint")
    resumed = run(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert sha(out / "adapter_model.safetensors") == sha(ref / "adapter_model.safetensors")
    assert metrics(out) == metrics(ref)  # continues without duplicates or gaps


def test_sigterm_checkpoints_then_resume(tiny_model_dir, reference, tmp_path):
    data, ref = reference
    out = tmp_path / "run"
    proc = run(tiny_model_dir, data, out, "--save_steps", "0", wait=False)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not open(out / "metrics.jsonl").read().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, err
    # the exact command to continue, with the user's own arguments
    assert "Resume with:\n  peftune train --base_model" in err and err.rstrip().endswith("--resume_from_checkpoint auto")
    assert checkpoint.list_checkpoints(str(out))
    resumed = run(tiny_model_dir, data, out, "--save_steps", "0", "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert sha(out / "adapter_model.safetensors") == sha(ref / "adapter_model.safetensors")
    assert metrics(out) == metrics(ref)


def test_refuses_changed_run_allows_logging_changes(tiny_model_dir, reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    assert run(tiny_model_dir, data, out, fault="after_step:5").returncode == -signal.SIGKILL
    changed = run(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto", "--learning_rate", "2e-2")
    assert changed.returncode == 2 and "learning_rate: 0.01 then, 0.02 now" in changed.stderr
    changed = run(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto", "--cutoff_len", "64")
    assert changed.returncode == 2 and "cutoff_len" in changed.stderr
    fine = run(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto", "--logging_steps", "5",
               "--eval_steps", "4")
    assert fine.returncode == 0, fine.stderr
    again = run(tiny_model_dir, data, out)
    assert again.returncode == 2 and "--resume_from_checkpoint auto" in again.stderr  # no silent mixing


def test_corrupted_and_pickled_checkpoints_are_refused(tiny_model_dir, reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    assert run(tiny_model_dir, data, out, fault="after_step:5").returncode == -signal.SIGKILL
    step4 = out / "checkpoints" / "step-4"
    # a flipped byte: caught by the checksum
    blob = bytearray((step4 / "optimizer.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (step4 / "optimizer.safetensors").write_bytes(bytes(blob))
    bad = run(tiny_model_dir, data, out, "--resume_from_checkpoint", str(step4))
    assert bad.returncode == 2 and "is corrupted: optimizer.safetensors does not match" in bad.stderr
    # a crafted pickle with a matching checksum: never unpickled, so the payload never runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (step4 / "optimizer.safetensors").write_bytes(pickle.dumps(Payload()))
    state = json.loads((step4 / "state.json").read_text())
    state["files"]["optimizer.safetensors"] = sha(step4 / "optimizer.safetensors")
    (step4 / "state.json").write_text(json.dumps(state))
    bad = run(tiny_model_dir, data, out, "--resume_from_checkpoint", str(step4))
    assert bad.returncode == 2 and "is corrupted" in bad.stderr
    assert not marker.exists()
    # a checkpoint missing its state file is incomplete; `auto` passes over damaged ones to an older one
    os.remove(out / "checkpoints" / "step-2" / "adapter_model.safetensors")
    bad = run(tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoints" / "step-2"))
    assert bad.returncode == 2 and "is incomplete: adapter_model.safetensors is missing" in bad.stderr


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    proc = run(tiny_model_dir, data, out, "--learning_rate", "1e30", "--max_grad_norm", "0", "--warmup_steps", "0")
    assert proc.returncode == 2
    assert "non-finite loss or gradient at step" in proc.stderr and "Last good checkpoint" in proc.stderr
    for path in checkpoint.list_checkpoints(str(out)):
        checkpoint.read_state(path)  # intact


def test_full_disk_keeps_earlier_checkpoints(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = checkpoint.save_file

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (three safetensors files) succeeds, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    out = tmp_path / "run"
    code = cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     *ARGS])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "No space left on device" in err and "earlier checkpoints are intact" in err
    (only,) = checkpoint.list_checkpoints(str(out))
    checkpoint.read_state(only)
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".tmp")]


def test_unwritable_output_dir(tiny_model_dir, data_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir",
                     str(blocker / "out"), *ARGS])
    assert code == 2 and "not writable" in capsys.readouterr().err


def test_seed_fixes_the_adapter_bytes(tiny_model_dir, reference, tmp_path):
    data, ref = reference
    again = run(tiny_model_dir, data, tmp_path / "same")
    other = run(tiny_model_dir, data, tmp_path / "other", "--seed", "7")
    assert again.returncode == 0 and other.returncode == 0
    assert sha(tmp_path / "same" / "adapter_model.safetensors") == sha(ref / "adapter_model.safetensors")
    assert sha(tmp_path / "other" / "adapter_model.safetensors") != sha(ref / "adapter_model.safetensors")


def test_a_finished_run_keeps_its_last_state_and_can_be_extended(tiny_model_dir, reference, tmp_path):
    data, ref = reference
    out = tmp_path / "run"
    first = run(tiny_model_dir, data, out, "--num_epochs", "1", "--save_steps", "3")
    assert first.returncode == 0, first.stderr
    # 20 training rows, 4 a step: 5 steps; the last one's state is kept although 5 is no multiple of save_steps
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["step-3", "step-5"]
    done = run(tiny_model_dir, data, out, "--num_epochs", "1", "--save_steps", "3", "--resume_from_checkpoint", "auto")
    assert done.returncode == 2 and "nothing to resume" in done.stderr and "raise num_epochs or max_steps" in done.stderr
    longer = run(tiny_model_dir, data, out, "--num_epochs", "2", "--save_steps", "3",
                 "--resume_from_checkpoint", "auto")
    assert longer.returncode == 0, longer.stderr
    assert "extending the run from 5 to 10 optimizer steps" in longer.stdout
    rows, reference_rows = metrics(out), metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, 11))  # metrics continue without gaps
    # the extension follows the 10-step schedule exactly as a run planned for 10 steps from the start
    assert [r["lr"] for r in rows[5:]] == pytest.approx([r["lr"] for r in reference_rows[5:]])
    assert rows[4]["lr"] == pytest.approx(0.0) and reference_rows[4]["lr"] > 0


def test_shortening_a_run_on_resume_is_refused(tiny_model_dir, reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    assert run(tiny_model_dir, data, out, fault="after_step:7").returncode == -signal.SIGKILL
    shorter = run(tiny_model_dir, data, out, "--num_epochs", "1.8", "--resume_from_checkpoint", "auto")
    assert shorter.returncode == 2 and "planned for 10 optimizer steps and would now end at 9" in shorter.stderr
    past = run(tiny_model_dir, data, out, "--max_steps", "5", "--resume_from_checkpoint", "auto")
    assert past.returncode == 2 and "the settings now end the run at step 5" in past.stderr


def test_output_dir_and_resume_are_checked_before_the_data_is_read(tiny_model_dir, reference, tmp_path):
    data, _ = reference
    out = tmp_path / "run"
    assert run(tiny_model_dir, data, out, "--max_steps", "2").returncode == 0
    # the data path is wrong too, but the run in the way is reported first: no tokenizing before the refusal
    proc = run(tiny_model_dir, str(tmp_path / "missing.json"), out)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr, proc.stderr
    proc = run(tiny_model_dir, str(tmp_path / "missing.json"), out, "--resume_from_checkpoint", "auto",
               "--lora_r", "8")
    assert proc.returncode == 2 and "lora_r: 4 then, 8 now" in proc.stderr, proc.stderr


def test_a_setting_added_later_at_its_default_does_not_block_a_resume():
    from peftune.errors import PeftuneError
    from peftune.train import checkpoint as ckpt

    saved = {"seed": 42, "peft_method": "lora"}  # a checkpoint written before `replay` existed
    ckpt.compare_fingerprints(saved, {**saved, "replay": 0, "replay_beta": 0.0}, "step-5")
    with pytest.raises(PeftuneError, match="replay: 0 then, 0.5 now"):
        ckpt.compare_fingerprints(saved, {**saved, "replay": 0.5}, "step-5")
    # fast_dropout's default (on) is not what older runs did: they resume with it off, and say so otherwise
    ckpt.compare_fingerprints(saved, {**saved, "fast_dropout": False}, "step-5")
    with pytest.raises(PeftuneError, match="fast_dropout: False then, True now"):
        ckpt.compare_fingerprints(saved, {**saved, "fast_dropout": True}, "step-5")
    # attention_fp32 likewise: older bf16 runs on CPUs computed attention in bf16
    ckpt.compare_fingerprints(saved, {**saved, "attention_fp32": False}, "step-5")
    with pytest.raises(PeftuneError, match="attention_fp32: False then, True now"):
        ckpt.compare_fingerprints(saved, {**saved, "attention_fp32": True}, "step-5")
    # the fused loss, LoRA layers, norms and rotary embedding likewise: older runs computed them through autograd
    for key in ("fused_loss", "fused_lora", "fused_norm", "fused_rotary"):
        ckpt.compare_fingerprints(saved, {**saved, key: False}, "step-5")
        with pytest.raises(PeftuneError, match=f"{key}: False then, True now"):
            ckpt.compare_fingerprints(saved, {**saved, key: True}, "step-5")
