"""A launcher's process count and Accelerate's must agree: srun starting `peftune train` itself (Accelerate reads no
SLURM variables, so each task would be a process of its own training into the same output_dir) is refused before
anything is read or written; one process under a launcher trains as usual."""

import pytest

from peftune.train.distributed import LAUNCHER_SIZES, launched_processes
from tiny import train_process

ARGS = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "2", "--micro_batch_size", "2",
        "--max_steps", "1", "--val_set_size", "2", "--lora_r", "4"]


def test_a_launch_that_accelerate_runs_as_one_process_is_refused(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    out = tmp_path / "run"
    done = train_process(tiny_model_dir, data_file, out, *ARGS)
    assert done.returncode == 2, done.stderr
    assert "SLURM_STEP_NUM_TASKS=2" in done.stderr and "Accelerate runs 1" in done.stderr
    assert not out.exists()


def test_one_process_under_a_launcher_trains(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    done = train_process(tiny_model_dir, data_file, tmp_path / "run", *ARGS)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                                  "SLURM_STEP_NUM_TASKS"])
def test_every_launcher_count_accelerate_or_srun_sets_is_seen(name, monkeypatch):
    """mpirun (`accelerate launch --cpu` with several processes) sets no WORLD_SIZE: its count must still make
    Accelerate run on the CPU with its processes, instead of each rank training alone."""
    for other in LAUNCHER_SIZES:
        monkeypatch.delenv(other, raising=False)
    assert launched_processes() is None
    monkeypatch.setenv(name, "3")
    assert launched_processes() == (name, 3)
