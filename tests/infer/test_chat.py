"""Generation for virtual-token adapters equals, step by step, what peft's training forward computes."""

import pytest
import torch

from peftune import methods
from peftune.config import TrainConfig
from peftune.infer.chat import generate


class Recorder:
    """A logits processor that keeps the scores generate sees at each step."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning", "lora"])
def test_generate_matches_the_training_forward(method, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    torch.manual_seed(0)
    cfg = TrainConfig(peft_method=method, num_virtual_tokens=4) if method != "lora" else TrainConfig(lora_r=4)
    model = methods.Adapter(cfg, 10, tiny_model_dir, tokenizer).attach(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=2.0)  # a strong adapter, so a dropped or repeated prompt shows
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    recorder = Recorder()
    new = generate(model, ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([recorder]))
    assert new.shape == (1, 5)
    seq = ids
    with torch.no_grad():
        for k in range(5):
            reference = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            assert torch.allclose(recorder.scores[k][0], reference, atol=1e-4), f"step {k}"
            seq = torch.cat([seq, new[:, k:k + 1]], dim=1)
