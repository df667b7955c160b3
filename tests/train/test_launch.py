"""Under a launcher (torchrun, `accelerate launch`, srun), `peftune train` refuses to run as one of several processes
until multi-process training exists, instead of Accelerate's silent fallback on CPUs, where every rank trains alone
into the same output_dir."""

import pytest

from tiny import train_process

ARGS = ["--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "2", "--micro_batch_size", "2",
        "--max_steps", "1", "--val_set_size", "2", "--lora_r", "4"]


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_a_launch_of_several_processes_is_refused_before_anything_is_written(variable, tiny_model_dir, data_file,
                                                                               tmp_path, monkeypatch):
    monkeypatch.setenv(variable, "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    done = train_process(tiny_model_dir, data_file, out, *ARGS)
    assert done.returncode == 2, done.stderr
    assert f"{variable}=2" in done.stderr and "multi-process training is not supported yet" in done.stderr
    assert not out.exists()


def test_one_process_under_a_launcher_trains(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    done = train_process(tiny_model_dir, data_file, tmp_path / "run", *ARGS)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
