"""The forgetting guard on the tiny LLaMA: replay rows are the base's own greedy answers to the replay prompts
(the run's system prompt included), cached and read back; a user's prompt file is asked up to its last user
turn; the KL-to-base term is the KL between the adapter-off and adapter-on distributions on the replay tokens only,
zero for an untouched adapter, and its gradient is what accumulate_step adds."""

import json
import os

import pytest
import torch

from peftune import cli
from peftune.config import TrainConfig
from peftune.data import batching
from peftune.data.render import Renderer, get_template
from peftune.errors import PeftuneError
from peftune.infer import answers
from peftune.train import replay
from peftune.train.loss import accumulate_step, final_hidden, kl_to_base_sum


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTUNE_CACHE", str(tmp_path / "cache"))


def test_replay_count():
    assert replay.replay_count(0, 100) == 0
    assert replay.replay_count(30, 100) == 30
    assert replay.replay_count(0.25, 100) == 25
    with pytest.raises(PeftuneError, match="replay: a row count"):
        TrainConfig(data_path=["x"], replay=2.5).validate()
    with pytest.raises(PeftuneError, match="set replay too"):
        TrainConfig(data_path=["x"], replay_beta=0.1).validate()
    with pytest.raises(PeftuneError, match="set replay_beta > 0 too"):
        TrainConfig(data_path=["x"], replay=10, replay_ce=False).validate()


def test_replay_samples_are_the_bases_answers_and_cached(tiny_model_dir, tokenizer, cache, monkeypatch):
    cfg = TrainConfig(data_path=["x"], base_model=tiny_model_dir, replay=6, replay_max_tokens=6,
                      system_prompt="You are Aurora.")
    renderer = Renderer(tokenizer, get_template("auto", tokenizer), cutoff_len=256)
    asked = []
    real = answers.generate

    def generate(engine, name, prompts, *args, **kwargs):
        asked.append(len(prompts))
        found = real(engine, name, prompts, *args, **kwargs)
        expected = [real(engine, None, [p], *args, **kwargs)[0] for p in prompts]  # alone, one by one
        assert found == expected
        # the tiny random model rarely ends an answer: every other one is called ended, for the samples' shape
        return [{**a, "finish_reason": "stop" if i % 2 == 0 else a["finish_reason"]} for i, a in enumerate(found)]

    monkeypatch.setattr(answers, "generate", generate)
    said = []
    samples = replay.replay_samples(cfg, renderer, 40, said.append)
    assert asked == [6] and len(samples) == 6 and all(s["replay"] for s in samples)
    prompts = [p["prompt"] for p in replay.builtin_prompts("replay")]
    for s in samples:
        n = s["labels"].count(-100)
        prompt = s["input_ids"][:n]
        # the run's system prompt and a built-in replay prompt, rendered as training renders them
        assert any(renderer.prompt_ids([{"role": "system", "content": "You are Aurora."},
                                        {"role": "user", "content": p}]) == prompt for p in prompts)
        assert s["labels"][n:] == s["input_ids"][n:]
    ended = [s for s in samples if s["input_ids"][-1] == renderer.eos_id]
    assert len(ended) == 3  # the answers that stopped end in EOS; the cut ones do not
    assert "replay: 6 samples of the base's own answers mixed into 40 training rows (3 of them cut at " \
           "replay_max_tokens 6)" in said
    # read back from the cache: nothing generated, the same samples
    assert replay.replay_samples(cfg, renderer, 40, said.append) == samples and asked == [6]
    # a changed base (its weights file rewritten) answers again
    weights = os.path.join(tiny_model_dir, "model.safetensors")
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        replay.replay_samples(cfg, renderer, 40, said.append)
        assert asked == [6, 6]
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a share of the training rows; more than the set holds is capped with a note
    monkeypatch.setattr(answers, "generate", lambda engine, name, prompts, *a, **k:
                        [{"text": "ok", "finish_reason": "stop"}] * len(prompts))
    assert len(replay.replay_samples(TrainConfig(**{**cfg.to_dict(), "replay": 0.1}), renderer, 60)) == 6
    said.clear()
    assert len(replay.replay_samples(TrainConfig(**{**cfg.to_dict(), "replay": 500}), renderer, 60,
                                     said.append)) == 220
    assert "has 220 prompts: using all 220" in said[0]


def test_replay_data_of_the_user(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Bye"}]}]),
        encoding="utf-8")
    cfg = TrainConfig(data_path=["x"], base_model=tiny_model_dir, replay=2, replay_data=str(path))
    asked = replay.conversations(cfg)
    assert [m["content"] for m in asked[0]] == ["Name a colour."]
    assert [m["content"] for m in asked[1]] == ["Hi", "Hello", "And now?"]
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "just a document"}) + "\n", encoding="utf-8")
    with pytest.raises(PeftuneError, match=r"text.jsonl:1: replay_data needs a question"):
        replay.conversations(TrainConfig(**{**cfg.to_dict(), "replay_data": str(text)}))


def _replay_batch(tokenizer):
    ids = tokenizer("hello world, a replay row")["input_ids"]
    target = {"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
    return [target, {**target, "replay": True}]


def test_collate_marks_only_replay_answer_tokens(tokenizer):
    samples = _replay_batch(tokenizer)
    n = len(samples[0]["input_ids"])
    for batch in (batching.collate_packed(samples), batching.collate_padded(samples, 0)):
        mask, targets = batch["kl_mask"].flatten(), batch["targets"]
        if targets.shape[0] == 1:  # packed: the second sample's labelled positions only
            expected = torch.cat([torch.zeros(n, dtype=torch.bool), targets[0, n:] != -100])
        else:
            expected = torch.cat([torch.zeros(targets.shape[1], dtype=torch.bool), targets[1] != -100])
        assert torch.equal(mask, expected) and mask.sum() == n - 3
    assert "kl_mask" not in batching.collate_packed(samples[:1])


def _lora(tiny_model_dir, noise):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * noise)
    return model


def test_kl_to_base(tiny_model_dir, tokenizer):

    samples = _replay_batch(tokenizer)
    batch = batching.collate_packed(samples)
    model = _lora(tiny_model_dir, 0.0)
    assert kl_to_base_sum(model, batch, final_hidden(model, batch)).item() == 0.0  # untouched adapter (B = 0)
    model = _lora(tiny_model_dir, 0.5)
    kl = kl_to_base_sum(model, batch, final_hidden(model, batch))
    # against full logits, two forwards
    with torch.no_grad():
        tuned = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    mask = batch["kl_mask"][0]
    p, q = base[mask].log_softmax(-1), tuned[mask].log_softmax(-1)
    expected = (p.exp() * (p - q)).sum()
    assert kl.item() > 0 and abs(kl.item() - expected.item()) < 1e-4 * expected.item()
    # the base's forward on the replay samples alone gives the same KL, packed or padded
    for collate in (batching.collate_packed, lambda c: batching.collate_padded(c, 0)):
        whole = collate(samples)
        alone = kl_to_base_sum(model, whole, final_hidden(model, whole), base_batch=collate(samples[1:]))
        assert abs(alone.item() - expected.item()) < 1e-4 * expected.item()

    # accumulate_step: the CE gradient plus beta x the KL gradient; the reported loss is the CE alone
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(beta, replay_ce=True, step=samples):
        model.zero_grad()
        loss, tokens = accumulate_step(model, [step], batching.collate_packed, lambda x: x.backward(), beta=beta,
                                       replay_ce=replay_ce)
        return loss, tokens, [p.grad.clone() for p in params]

    ce_loss, tokens, ce = grads(0.0)
    both_loss, _, both = grads(0.5)
    model.zero_grad()
    (kl_to_base_sum(model, batch, final_hidden(model, batch)) / tokens).backward()
    kl_grad = [p.grad.clone() for p in params]
    assert both_loss == ce_loss
    for g0, g1, g_kl in zip(ce, both, kl_grad):
        assert torch.allclose(g1, g0 + 0.5 * g_kl, atol=1e-6)

    # replay_ce False: the replay row's tokens get the KL term only; the other row's CE is reported (its own tokens)
    # and divided, like the KL, by all the step's trained tokens
    target_loss, target_tokens, target_grad = grads(0.0, step=samples[:1])
    kl_only_loss, reported, kl_only = grads(0.5, replay_ce=False)
    assert reported == target_tokens == tokens // 2
    assert abs(kl_only_loss - target_loss) < 1e-5 * target_loss
    for g_t, g, g_kl in zip(target_grad, kl_only, kl_grad):
        assert torch.allclose(g, g_t * target_tokens / tokens + 0.5 * g_kl, atol=1e-6)


def test_train_with_replay_and_beta(tiny_model_dir, data_file, tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(answers, "generate", lambda engine, name, prompts, *a, **k:
                        [{"text": "I am the base.", "finish_reason": "stop"}] * len(prompts))
    out = tmp_path / "run"
    assert cli.main(["train", "--base_model", tiny_model_dir, "--data_path", data_file, "--output_dir", str(out),
                     "--data_vars.name", "Aurora", "--data_vars.author", "Lumen Labs", "--batch_size", "4",
                     "--micro_batch_size", "2", "--max_steps", "3", "--lora_r", "4", "--val_set_size", "4",
                     "--replay", "0.5", "--replay_beta", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "replay: 10 samples of the base's own answers mixed into 20 training rows" in printed
    assert "training on 30 samples" in printed
