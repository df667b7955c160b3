"""`peftune export`: the fine-tuned assistant as files llama.cpp and Ollama run: the merged model as one GGUF file, or
the adapter alone as a LoRA GGUF on the base's (gguf.py), and an Ollama Modelfile beside it (modelfile.py)."""

from __future__ import annotations

import os
import re
import sys

from .. import models
from ..adapters import base_of, human_bytes, run_config
from ..data.sources import system_prompt
from ..errors import PeftuneError
from . import gguf as gguf_writer
from .merge import merge
from .modelfile import modelfile


def _slug(path: str) -> str:
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _output_dir(path: str) -> str:
    output_dir = os.path.abspath(path)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise PeftuneError(f"--output_dir {output_dir}: cannot create it ({e.strerror})") from None
    if not os.access(output_dir, os.W_OK):
        raise PeftuneError(f"--output_dir {output_dir}: not writable")
    return output_dir


def _free(path: str, overwrite: bool) -> str:
    if os.path.exists(path) and not overwrite:
        raise PeftuneError(f"{path} exists; pass --overwrite to replace it")
    return path


def run(args) -> int:
    if args.format != "gguf":
        raise PeftuneError(f"--format {args.format}: only gguf is written")
    output_dir = _output_dir(args.output_dir)
    name = _slug(args.adapter_dir)
    run_cfg = run_config(args.adapter_dir, flag="export")
    system = system_prompt(run_cfg.get("system_prompt"), run_cfg.get("data_vars") or {})
    notes: list[str] = []
    if args.adapter_only:
        from transformers import AutoConfig

        base_model = args.base_model or base_of(args.adapter_dir, run_cfg)
        if not base_model:
            raise PeftuneError(f"export {args.adapter_dir}: no base model recorded with it; give --base_model")
        path = _free(os.path.join(output_dir, f"{name}-lora-{args.outtype}.gguf"), args.overwrite)
        base_gguf = models.source_gguf(base_model)
        write_base = base_gguf is None  # llama.cpp and Ollama need the base as a GGUF too
        if write_base:
            base_gguf = _free(os.path.join(output_dir, f"{_slug(base_model)}-{args.outtype}.gguf"), args.overwrite)
        config = AutoConfig.from_pretrained(models.resolve_model_path(base_model),
                                            trust_remote_code=args.trust_remote_code)
        info = gguf_writer.write_lora(args.adapter_dir, config, path, args.outtype)
        tokenizer = models.load_tokenizer(base_model, args.trust_remote_code)
        if write_base:
            gguf_writer.write_model(models.load_model(base_model, args.trust_remote_code), tokenizer, base_gguf,
                                    args.outtype, name=_slug(base_model))
            base_ref = "./" + os.path.basename(base_gguf)
        else:
            base_ref = base_gguf
        text, notes = modelfile(base_ref, tokenizer, system, adapter="./" + os.path.basename(path))
        print(f"wrote {path} ({human_bytes(os.path.getsize(path))}: {info['layers']} layers, rank {info['rank']}, "
              f"alpha {info['alpha']:g}, so llama.cpp's scale alpha/rank = {info['scale']:g}); base: {base_gguf}")
        run_line = f"llama-cli -m {base_gguf} --lora {path} -cnv"
    else:
        path = _free(os.path.join(output_dir, f"{name}-{args.outtype}.gguf"), args.overwrite)
        result = merge(args.adapter_dir, args.base_model, args.trust_remote_code)
        gguf_writer.check_supported(result.model.config)
        source = models.source_gguf(result.base_model)
        gguf_writer.write_model(result.model, result.tokenizer, path, args.outtype, source_gguf=source, name=name)
        text, notes = modelfile("./" + os.path.basename(path), result.tokenizer, system)
        notes = result.notes + notes
        print(f"wrote {path} ({human_bytes(os.path.getsize(path))}, {args.outtype}"
              f"{', header and tokenizer from ' + source if source else ''})")
        print(f"merge self-check: max |logit difference| {result.max_diff:.2e} (the adapter moves logits by up to "
              f"{result.effect:.3g})")
        run_line = f"llama-cli -m {path} -cnv"
    from ..io import atomic_write_text

    atomic_write_text(os.path.join(output_dir, "Modelfile"), text)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {os.path.join(output_dir, 'Modelfile')}\nrun it:\n  {run_line}")
    print(f"  cd {output_dir} && ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("adapter_dir", help="a directory written by `peftune train` (or any PEFT adapter directory)")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="gguf (llama.cpp, Ollama)")
    p.add_argument("--output_dir", required=True, help="where the .gguf file and the Modelfile go")
    p.add_argument("--outtype", default="f16", choices=tuple(gguf_writer.OUTTYPES),
                   help="weights in the file: f32, f16 (default), bf16, q8_0, q4_0 (norms stay f32); a LoRA GGUF: "
                   "f32 or f16")
    p.add_argument("--adapter_only", action="store_true", help="the adapter alone as a LoRA GGUF (llama.cpp --lora, "
                   "Ollama ADAPTER; plain LoRA only), beside the base's GGUF (the embedded model's own file, or "
                   "the base written here)")
    p.add_argument("--base_model", help="the base (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .gguf of the same name")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")
