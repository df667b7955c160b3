"""`peftune curves RUN_DIR`: metrics.jsonl drawn as a PNG, also while a line is still being written; a clear error
for a directory without metrics."""

import json

from peftune import cli


def test_curves_of_a_run_in_progress(tmp_path, capsys):
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 100 + s,
                         **({"eval_loss": 1.5} if s % 2 == 0 else {})}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo', encoding="utf-8")
    assert cli.main(["curves", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_directory_without_metrics_is_an_error(tmp_path, capsys):
    assert cli.main(["curves", str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()
