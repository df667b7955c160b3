"""`peftune merge`: an adapter folded into its base, written as a plain transformers model directory that loads
with `AutoModelForCausalLM.from_pretrained` alone, checked before anything is written.

peft's `merge_and_unload` does the folding for every method that can merge (LoRA and its variants, DoRA, rsLoRA,
PiSSA/OLoRA once converted, AdaLoRA, IA3, LoHa, LoKr). What this adds is what goes wrong in practice around it:
virtual-token adapters refused with the reason, a QLoRA adapter merged into the full-precision base (merging into
4-bit weights rounds the update away, peft #2321) with a note, tied input/output embeddings untied first when the
adapter changes one of them (peft #2777), the merged model's logits compared with the adapter-on-base logits, the
written directory loaded back and compared again, and the directory renamed into place only then.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from .. import models
from ..adapters import base_of, human_bytes, run_config
from ..errors import PeftuneError
from ..io import default_mode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# a few prompts in the languages our users write (the check compares every position's logits)
CHECK_PROMPTS = ["Hello! Who are you?", "Write a Python function that adds two numbers.", "你是谁？请用中文回答。"]
TOLERANCE = 1e-4  # fp32 merged vs adapter-on-base, max |logit difference| (for logits up to 10)


@dataclass
class Merged:
    model: object  # the merged transformers model (fp32)
    tokenizer: object
    base_model: str
    peft_type: str
    max_diff: float  # the self-check: max |logit difference| merged vs adapter on base
    effect: float  # max |logit difference| adapter on base vs base: what the merge must keep
    notes: list[str]


def _check_adapter_dir(adapter_dir: str) -> dict:
    run = run_config(adapter_dir, flag="merge")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise PeftuneError(f"merge {adapter_dir}: no adapter_model.safetensors there (peftune loads adapter weights "
                           "only from safetensors, never from pickled .bin files)")
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as e:
        raise PeftuneError(f"merge {adapter_dir}: adapter_config.json is unreadable ({e})") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise PeftuneError(f"merge {adapter_dir}: adapter_config.json has no peft_type (not a PEFT adapter)")
    return run


def _logits(model, tokenizer) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out.append(model(input_ids=ids).logits[0].float())
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _untie_if_adapted(model, adapted: set[str], notes: list[str]) -> None:
    """When input and output embeddings share one tensor and the adapter changes either, the merge would change
    both: give the output layer its own copy first."""
    base = model.get_base_model()
    config = base.config
    text = getattr(config, "get_text_config", lambda: config)()
    if not getattr(text, "tie_word_embeddings", False):
        return
    names = {"lm_head", "embed_tokens", "wte", "word_embeddings"}
    if not any(part in names for name in adapted for part in name.split(".")):
        return
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # peft's layer around it, when the adapter targets the head
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    text.tie_word_embeddings = False
    config.tie_word_embeddings = False
    notes.append("the adapter changes the tied embeddings, so the merged model unties them (input and output "
                 "embeddings are separate tensors)")


def merge(adapter_dir: str, base_model: str | None = None, trust_remote_code: bool = False) -> Merged:
    """The adapter folded into its base, in fp32, after checking the merged logits against adapter-on-base."""
    from peft import PeftModel

    run = _check_adapter_dir(adapter_dir)
    base_model = base_model or base_of(adapter_dir, run)
    if not base_model:
        raise PeftuneError(f"merge {adapter_dir}: no base model recorded with it; give --base_model")
    notes = []
    if run.get("load_in_4bit") or run.get("load_in_8bit"):
        notes.append("trained as QLoRA on a quantized base; merged into the full-precision base (merging into "
                     "quantized weights would round the update away), so the merged model differs from the "
                     "quantized base + adapter by the base's quantization error")
    tokenizer = models.load_tokenizer(base_model, trust_remote_code)
    model = models.load_model(base_model, trust_remote_code, dtype=torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    except Exception as e:  # safetensors, peft and torch each raise their own kinds for a damaged or foreign file
        raise PeftuneError(f"merge {adapter_dir}: cannot load it onto {base_model} "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})") from None
    config = peft_model.active_peft_config
    if getattr(config, "is_prompt_learning", False):
        raise PeftuneError(f"merge {adapter_dir}: {config.peft_type.value.lower()} learns virtual tokens that go in "
                           "front of every prompt; no weight of the base can hold them, so it cannot merge. Serve it "
                           "with `peftune serve --adapter` or `peftune chat --adapter` instead")
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "base_layer")}
    _untie_if_adapted(peft_model, adapted, notes)
    expected = _logits(peft_model, tokenizer)
    with peft_model.disable_adapter():
        effect = _max_diff(expected, _logits(peft_model, tokenizer))
    try:
        merged = peft_model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError) as e:
        raise PeftuneError(f"merge {adapter_dir}: peft cannot merge this {config.peft_type.value} adapter "
                           f"({str(e).splitlines()[0][:300]})") from None
    merged.eval()
    diff = _max_diff(expected, _logits(merged, tokenizer))
    # fp32 rounding grows with the logits' size: 1e-4 for logits up to 10, relative beyond (the embedded model's
    # logits reach ~30, and its merges differ by up to ~1e-4)
    allowed = TOLERANCE * max(1.0, max(float(t.abs().max()) for t in expected) / 10)
    if not diff <= allowed:
        raise PeftuneError(f"merge {adapter_dir}: the merged model's logits differ from the adapter's by {diff:.3g} "
                           f"(allowed {allowed:.3g}); nothing was written")
    if effect == 0.0:
        notes.append("the adapter does not change the base's logits at all (an untrained adapter?)")
    return Merged(merged, tokenizer, base_model, config.peft_type.value, diff, effect, notes)


def save_merged(result: Merged, output_dir: str, dtype: str, source: str, overwrite: bool = False) -> dict:
    """Writes the merged model to output_dir (through a temporary directory beside it, renamed into place once the
    written model, loaded back, computes exactly what the one in memory does)."""
    from transformers import AutoModelForCausalLM

    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)) and not overwrite:
        raise PeftuneError(f"--output_dir {output_dir}: exists and is not empty; choose another directory or pass "
                           "--overwrite")
    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    except OSError as e:
        raise PeftuneError(f"--output_dir {output_dir}: cannot write there ({e.strerror})") from None
    try:
        model = result.model.to(DTYPES[dtype])
        model.save_pretrained(tmp, safe_serialization=True)
        result.tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype], use_safetensors=True).eval()
        written, held = reloaded.state_dict(), model.state_dict()
        lost = [k for k in held if k not in written or not torch.equal(written[k], held[k])]
        # in fp32 the logits too (other dtypes: `.to` above also rounded in-memory buffers such as rotary
        # frequencies, which a loaded model computes afresh)
        if not lost and dtype == "fp32" and _max_diff(_logits(model, result.tokenizer),
                                                      _logits(reloaded, result.tokenizer)) != 0.0:
            lost = ["(logits)"]
        if lost:
            raise PeftuneError(f"merge: the written model differs from the merged one ({', '.join(lost[:5])}); "
                               "nothing was written")
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        note = {"merged_by": "peftune merge", "adapter": os.path.abspath(source), "base_model":
                models.portable_ref(result.base_model), "peft_type": result.peft_type, "dtype": dtype,
                "self_check": {"prompts": len(CHECK_PROMPTS), "max_abs_logit_diff_fp32": result.max_diff,
                               "adapter_effect_max_abs_logit_diff": result.effect},
                "notes": result.notes}
        with open(os.path.join(tmp, "peftune_merge.json"), "w", encoding="utf-8") as fh:
            json.dump(note, fh, indent=2, ensure_ascii=False)
        mode = default_mode()
        for name in os.listdir(tmp):  # some writers make private files; a model directory is the user's usual kind
            os.chmod(os.path.join(tmp, name), mode)
        os.chmod(tmp, default_mode(directory=True))
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except OSError as e:
        raise PeftuneError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**note, "output_dir": output_dir, "bytes": size}


def run(args) -> int:
    result = merge(args.adapter_dir, args.base_model, args.trust_remote_code)
    report = save_merged(result, args.output_dir, args.dtype, args.adapter_dir, args.overwrite)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"merged {result.peft_type} adapter {args.adapter_dir} into {result.base_model}: {report['output_dir']} "
          f"({human_bytes(report['bytes'])}, {args.dtype})\nself-check on {len(CHECK_PROMPTS)} prompts: the merged "
          f"model's logits differ from the adapter-on-base ones by at most {result.max_diff:.2e}; the adapter itself "
          f"moves the base's by up to {result.effect:.3g}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({report['output_dir']!r})")
    return 0


def add_arguments(p) -> None:
    p.add_argument("adapter_dir", help="a directory written by `peftune train` (or any PEFT adapter directory)")
    p.add_argument("--output_dir", required=True, help="where the merged model goes (a new or empty directory)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights of the merged model (default "
                   "fp32; the merge itself is computed in fp32)")
    p.add_argument("--base_model", help="the base to merge into (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")
