"""`peftune export`: the fine-tuned assistant as files llama.cpp and Ollama run: the merged model as one GGUF file
(gguf.py) and an Ollama Modelfile beside it (modelfile.py), each checked before it is renamed into place."""

from __future__ import annotations

import os
import re
import sys

from .. import models
from ..adapters import human_bytes, run_config
from ..data.sources import system_prompt
from ..errors import PeftuneError
from . import gguf as gguf_writer
from .merge import merge
from .modelfile import modelfile


def _slug(path: str) -> str:
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def run(args) -> int:
    if args.format != "gguf":
        raise PeftuneError(f"--format {args.format}: only gguf is written")
    if args.adapter_only:
        raise PeftuneError("--adapter_only: the LoRA GGUF adapter format is not written yet; export the merged model "
                           "(without --adapter_only)")
    output_dir = os.path.abspath(args.output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise PeftuneError(f"--output_dir {output_dir}: cannot create it ({e.strerror})") from None
    if not os.access(output_dir, os.W_OK):
        raise PeftuneError(f"--output_dir {output_dir}: not writable")
    name = _slug(args.adapter_dir)
    path = os.path.join(output_dir, f"{name}-{args.outtype}.gguf")
    if os.path.exists(path) and not args.overwrite:
        raise PeftuneError(f"{path} exists; pass --overwrite to replace it")
    result = merge(args.adapter_dir, args.base_model, args.trust_remote_code)
    gguf_writer.check_supported(result.model.config)
    source = models.source_gguf(result.base_model)
    gguf_writer.write_model(result.model, result.tokenizer, path, args.outtype, source_gguf=source, name=name)
    run_cfg = run_config(args.adapter_dir, flag="export")
    system = system_prompt(run_cfg.get("system_prompt"), run_cfg.get("data_vars") or {})
    text, notes = modelfile(os.path.basename(path), result.tokenizer, system)
    from ..io import atomic_write_text

    atomic_write_text(os.path.join(output_dir, "Modelfile"), text)
    for note in result.notes + notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {path} ({human_bytes(os.path.getsize(path))}, {args.outtype}"
          f"{', header and tokenizer from ' + source if source else ''}) and {os.path.join(output_dir, 'Modelfile')}")
    print(f"merge self-check: max |logit difference| {result.max_diff:.2e} (the adapter moves logits by up to "
          f"{result.effect:.3g})")
    print("run it:")
    print(f"  llama-cli -m {path} -cnv")
    print(f"  cd {output_dir} && ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("adapter_dir", help="a directory written by `peftune train` (or any PEFT adapter directory)")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="gguf (llama.cpp, Ollama)")
    p.add_argument("--output_dir", required=True, help="where the .gguf file and the Modelfile go")
    p.add_argument("--outtype", default="f16", choices=tuple(gguf_writer.OUTTYPES),
                   help="weights in the file: f32, f16 (default), bf16, q8_0, q4_0 (norms stay f32)")
    p.add_argument("--adapter_only", action="store_true", help="the adapter alone as a LoRA GGUF (not written yet)")
    p.add_argument("--base_model", help="the base (default: the one the adapter was trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .gguf of the same name")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")
