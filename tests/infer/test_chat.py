"""The engine generates what peft's training forward computes, step by step, for layer adapters and for
virtual-token adapters (whose learned tokens go in once, at prefill), alone and batched with other requests."""

import pytest
import torch

from peftune import methods
from peftune.config import TrainConfig
from peftune.infer.engine import Engine
from peftune.infer.sampling import SamplingParams


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning", "lora"])
def test_engine_generates_what_the_training_forward_computes(method, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = TrainConfig(peft_method=method, num_virtual_tokens=4) if method != "lora" else TrainConfig(lora_r=4)
    model = methods.Adapter(cfg, 10, tiny_model_dir, tokenizer).attach(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=2.0)  # a strong adapter, so a dropped or repeated prompt shows
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    engine = Engine(tiny_model_dir, {"x": str(tmp_path / "adapter")}, dtype="fp32")  # exact: peft's own arithmetic
    try:
        messages = [{"role": "user", "content": "Hello"}]
        ids = engine.chat_prompt("x", messages)
        greedy = SamplingParams(max_tokens=6, temperature=0)
        text, _, usage = engine.generate("x", messages, greedy)
        assert usage["completion_tokens"] == 6
        # the reference: argmax of peft's own forward (the training computation) on the growing sequence
        seq = torch.tensor([ids])
        expected = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax())
                expected.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        assert text == engine.tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
        # the same answer while other requests (the base) share the batch
        import threading

        others = [threading.Thread(target=engine.generate, args=(None, messages, SamplingParams(max_tokens=12)))
                  for _ in range(3)]
        for t in others:
            t.start()
        assert engine.generate("x", messages, greedy)[0] == text
        for t in others:
            t.join()
    finally:
        engine.close()
