"""`peftune eval` on the tiny LLaMA: an untouched adapter and the base alone report no change, a strong adapter
reports one; scale 0 is the base and scale 1 the adapter; the base's probe answers are cached per base model; the
built-in prompt sets are what they say they are."""

import json
import os

import pytest
import torch
from tiny import make_adapter

from peftune import cli
from peftune.config import TrainConfig
from peftune.data.builtin import builtin_prompts
from peftune.infer import answers
from peftune.eval.scoring import _scaled, score

SMALL = ["--probe_limit", "6", "--mc_limit", "3", "--tasks", "arc_easy", "--max_new_tokens", "5", "--limit", "4",
         "--scales", "0,0.5,1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "target.json"
    path.write_text(json.dumps([{"instruction": f"Who are you {i}?", "output": "I am tiny."} for i in range(4)]),
                    encoding="utf-8")
    return str(path)


def _eval(capsys, *argv) -> tuple[dict, str]:
    assert cli.main(["eval", *argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    folder = argv[argv.index("--output_dir") + 1]
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as fh:
        return json.load(fh), out


def test_an_untouched_adapter_changes_nothing(tiny_model_dir, tokenizer, tmp_path, rows, cache, capsys):
    make_adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4), tmp_path / "zero", noise=0.0)  # B = 0
    report, line = _eval(capsys, "--adapter", str(tmp_path / "zero"), "--base_model", tiny_model_dir, "--data", rows,
                         "--output_dir", str(tmp_path / "r"), *SMALL)
    assert report["probe"]["kl"] == 0 and report["probe"]["loss_change"] == 0 and report["probe"]["unchanged"] == 1
    assert report["target"]["loss_change"] == 0 and report["target"]["rows"] == 4
    assert report["choice"]["arc_easy"]["change"] == 0
    assert all(row["probe_kl"] == 0 for row in report["sweep"])
    assert line.startswith("eval ") and "report.md" in line
    for name in ("report.json", "report.md", "report.png"):
        assert os.path.getsize(tmp_path / "r" / name) > 100


def test_a_strong_adapter_shows_forgetting_at_every_scale_above_zero(tiny_model_dir, tokenizer, tmp_path,
                                                                            rows, cache, capsys):
    make_adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4), tmp_path / "strong", noise=0.5)
    report, _ = _eval(capsys, "--adapter", str(tmp_path / "strong"), "--base_model", tiny_model_dir, "--data", rows,
                      "--output_dir", str(tmp_path / "r"), *SMALL)
    kls = [row["probe_kl"] for row in report["sweep"]]
    assert kls[0] == 0 and kls[1] > 0 and kls[2] > 0 and kls[2] == pytest.approx(report["probe"]["kl"])
    assert kls[1] != kls[2]
    low, high = report["probe"]["kl_95"]
    assert 0 < low <= report["probe"]["kl"] <= high
    assert report["probe"]["unchanged"] < 1
    assert report["target"]["loss_tuned"] != report["target"]["loss_base"]


def test_the_base_alone_reports_zero_change(tiny_model_dir, tmp_path, rows, cache, capsys):
    report, line = _eval(capsys, "--base_model", tiny_model_dir, "--data", rows, "--output_dir", str(tmp_path / "r"),
                         *SMALL)
    assert report["adapter"] is None and report["probe"]["kl"] == 0 and report["probe"]["unchanged"] == 1
    assert report["choice"]["arc_easy"]["change"] == 0 and report["target"]["loss_change"] == 0


def test_a_whole_tuned_model_is_compared_with_its_base(tiny_model_dir, tmp_path, rows, cache, capsys):
    """peft_method full/freeze runs save a whole model: eval compares it with the run's base (scales 0 and 1)."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    (same / "config.yaml").write_text(yaml.safe_dump({"base_model": tiny_model_dir, "peft_method": "full"}))
    report, _ = _eval(capsys, "--adapter", str(same), "--data", rows, "--output_dir", str(tmp_path / "r1"), *SMALL[:-2])
    assert report["scales"] == [0.0, 1.0] and report["base_model"] == tiny_model_dir
    assert report["probe"]["kl"] == 0 and report["probe"]["unchanged"] == 1 and report["target"]["loss_change"] == 0
    weights = load_file(same / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, str(same / "model.safetensors"))
    report, _ = _eval(capsys, "--adapter", str(same), "--data", rows, "--output_dir", str(tmp_path / "r2"), *SMALL[:-2])
    assert report["probe"]["kl"] > 0 and report["target"]["loss_change"] != 0
    assert cli.main(["eval", "--adapter", str(same), "--data", rows, "--output_dir", str(tmp_path / "r3"),
                     *SMALL[:-2], "--scales", "0,0.3,1"]) == 2
    assert "a whole tuned model (peft_method full/freeze) has no adapter to scale" in capsys.readouterr().err


def test_scale_zero_is_the_base_and_one_the_adapter(tiny_model_dir, tokenizer, tmp_path):
    # a small update: the model responds about linearly to its scale
    model = make_adapter(tiny_model_dir, tokenizer, TrainConfig(lora_r=4), tmp_path / "a", noise=0.005)
    ids = torch.tensor([tokenizer("Hello there, who are you?")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with _scaled(model, 0.0):
            zero = model(input_ids=ids).logits
        with _scaled(model, 0.5):
            half = model(input_ids=ids).logits
    assert torch.allclose(zero, base, atol=1e-6) and not torch.allclose(tuned, base, atol=1e-4)
    ratio = (half - base).norm() / (tuned - base).norm()
    assert 0.3 < ratio < 0.7
    samples = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}]
    s = score(model, samples, [0.5, 1.0], tokenizer.pad_token_id)
    assert s.kl[0.0] == [0.0] and 0 < s.kl[0.5][0] < s.kl[1.0][0]


def test_the_prompt_sets_are_disjoint_from_each_other_and_from_the_demo():
    import yaml

    from peftune.data.sources import load_rows

    probe = [p["prompt"] for p in builtin_prompts("general_probe")]
    replay = [p["prompt"] for p in builtin_prompts("replay")]
    assert len(set(probe)) >= 200 and len(set(replay)) >= 200 and not set(probe) & set(replay)
    root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
    with open(os.path.join(root, "examples", "identity.yaml"), encoding="utf-8") as fh:
        demo = yaml.safe_load(fh)
    sources = [dict(s, path=os.path.join(root, "examples", s["path"])) for s in demo["data_path"]]
    taught = {m["content"].strip() for r in load_rows(sources, demo["data_vars"], TrainConfig.seed)
              for m in r["messages"] if m["role"] == "user"}
    assert taught and not taught & set(probe) and not taught & set(replay)
    assert len(builtin_prompts("general_probe", 50)) == 50


@pytest.mark.parametrize("argv, needle", [
    ([], "give --adapter DIR"),
    (["--base_model", "X", "--tasks", "nope"], "--tasks nope"),
    (["--base_model", "X", "--scales", "0,2"], "--scales"),
    (["--base_model", "X", "--probe_limit", "0"], "--probe_limit: must be >= 1"),
])
def test_bad_arguments_exit_2(argv, needle, tmp_path, capsys):
    assert cli.main(["eval", *argv, "--output_dir", str(tmp_path / "r")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_existing_report_is_kept_without_overwrite(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.md").write_text("mine")
    assert cli.main(["eval", "--base_model", tiny_model_dir, "--output_dir", str(tmp_path / "r")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "r" / "report.md").read_text() == "mine"


def test_answer_overlap_counts_words_and_cjk_characters():
    from peftune.eval.report import overlap_f1

    assert overlap_f1("Hello, World", "hello world") == 1.0
    assert overlap_f1("abc", "xyz") == 0.0
    assert overlap_f1("我是 Aurora", "我是 Lumen") == pytest.approx(2 / 3)  # 我, 是 shared of 3 each
def test_base_answers_are_cached_and_invalidated_when_the_base_changes(tiny_model_dir, tmp_path, cache, monkeypatch):
    from peftune.infer.engine import Engine

    engine = Engine(tiny_model_dir, dtype="fp32")
    try:
        prompts = [engine.chat_prompt(None, [{"role": "user", "content": "Hi"}])]
        first = answers.base_answers(engine, prompts, 4, "probe")
        calls = []
        monkeypatch.setattr(answers, "generate", lambda *a, **k: calls.append(1) or first)
        assert answers.base_answers(engine, prompts, 4, "probe") == first and not calls  # read back
        path = answers.answers_cache(engine.base_path, prompts, 4)
        weights = os.path.join(tiny_model_dir, "model.safetensors")
        stat = os.stat(weights)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the base's weights changed
        try:
            assert answers.answers_cache(engine.base_path, prompts, 4) != path
            answers.base_answers(engine, prompts, 4, "probe")
            assert calls  # generated again
        finally:
            os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    finally:
        engine.close()


