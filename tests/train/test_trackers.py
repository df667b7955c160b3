"""report_to really reports: TensorBoard event files under output_dir/runs that TensorBoard reads back with the
logged losses; a tracker whose package is missing, or no tracker at all, is an error before anything is written."""

import importlib.util
import os

import pytest
from test_recipe import train


def test_tensorboard_event_files_hold_the_logged_losses(tiny_model_dir, data_file, tmp_path, capsys):
    pytest.importorskip("tensorboard")  # in the test extra: make install has it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train(tiny_model_dir, data_file, out, "--report_to", "tensorboard") == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    events = [os.path.join(d, f) for d, _, files in os.walk(out / "runs") for f in files if "tfevents" in f]
    assert events, "no event file under output_dir/runs"
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and "eval_loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("loss")] == [2, 3, 4, 6, 8, 9, 10]


@pytest.mark.parametrize("tracker, package", [("mlflow", "mlflow"), ("wandb", "wandb"),
                                              ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_stops_before_training(tracker, package, tiny_model_dir, data_file, tmp_path,
                                                         capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "mlflow", "wandb", "tensorboard", "tensorboardX") else real(name, *a))
    out = tmp_path / "never"
    assert train(tiny_model_dir, data_file, out, "--report_to", tracker) == 2
    assert f"pip install {package}" in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_tracker_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    assert train(tiny_model_dir, data_file, tmp_path / "never", "--report_to", "tensorbord") == 2
    assert "'tensorbord' is not a tracker" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
