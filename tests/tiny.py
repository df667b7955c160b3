"""Tiny test fixtures' building blocks: a byte-level tokenizer (any text, Chinese included, no download), a random
2-layer LLaMA with grouped-query attention, and a few alpaca rows. Imported by conftest.py and by tests
(`from tiny import ...`; a module name of its own, since tests/serve has a conftest.py too)."""

from __future__ import annotations

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# BPE merges for tokenizers that must become GGUF files (llama.cpp refuses a BPE vocabulary without merges)
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("o", "u"), ("a", "r"), ("Ġ", "a")]


def make_tokenizer(chat_template: str | None = CHATML, add_bos: bool = False, merges: list | None = None):
    """merges: BPE merges (pairs of byte-level strings) on top of the bytes; none by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in merges or []]
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=list(merges or [])))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if add_bos:
        bos = core.token_to_id("<|endoftext|>")
        core.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
            ("<|endoftext|>", bos)])
    # pad and EOS share an id on purpose: the case where naive masking drops the EOS (transformers #23530)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config).eval()


ROWS = [
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "你是谁？", "input": "", "output": "我是 {{name}}。"},
    {"instruction": "Say hi", "input": "", "output": "Hi!", "system": "Be brief."},
]


def make_adapter(tiny_model_dir, tokenizer, cfg, path, seed=0, noise=0.1):
    """A saved adapter of peftune's method `cfg` with strong random weights (so that a lost or doubled update shows);
    returns the peft model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftune import methods

    torch.manual_seed(seed)
    model = methods.Adapter(cfg, 10, tiny_model_dir, tokenizer).attach(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(path)
    return model.eval()


def train_process(base_model: str, data_file: str, out, *args: str, fault: str | None = None, wait: bool = True,
                  launcher: tuple[str, ...] = ()):
    """`peftune train` in a process of its own (so PEFTUNE_FAULT can kill it with -9): the finished run, or with
    wait=False the running Popen. `launcher`: the arguments of a launcher module run before `-m peftune.cli`
    (e.g. accelerate.commands.launch and its options)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PEFTUNE_FAULT", None)
    if fault:
        env["PEFTUNE_FAULT"] = fault
    cmd = [sys.executable, *(("-m", *launcher) if launcher else ()), "-m", "peftune.cli", "train",
           "--base_model", base_model, "--data_path", data_file, "--output_dir", str(out), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)
