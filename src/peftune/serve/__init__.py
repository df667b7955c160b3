"""`peftune serve`: the command line; the routes are in app.py, the request shapes in protocol.py."""

from __future__ import annotations

import os
import sys

from ..errors import PeftuneError


def add_arguments(p) -> None:
    p.add_argument("--base_model", help="the base model (default: the one the first adapter was trained on, else the "
                   "embedded smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve an adapter as model NAME (repeatable); a bare DIR serves it under its folder name, and "
                   "a folder of runs serves every adapter in it")
    p.add_argument("--served_model_name", help="the name the base model answers to (default: --base_model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api_key", default=os.environ.get("PEFTUNE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $PEFTUNE_API_KEY; none = open)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16", "int8", "int4"),
                   help="weights: auto (default: on a CPU when the adapters are plain LoRA int8 weight-only, and 4-bit "
                   "where the base's weights already are 4-bit, as the embedded model's; else fp32; bf16 on a GPU), "
                   "fp32, bf16, fp16, int8, int4 (groups of 32)")
    p.add_argument("--engine", default="torch", choices=("torch", "llama.cpp"),
                   help="what computes: torch (default: every kind of adapter) or llama.cpp (plain LoRA adapters, "
                   "the base's GGUF file; needs llama-cpp-python: pip install 'peftune[llamacpp]')")
    p.add_argument("--max_model_len", type=int, help="longest prompt plus answer in tokens (default: the model's "
                   "context; with --engine llama.cpp at most 4096 unless given, as its cache is allocated at start)")
    p.add_argument("--max_batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--max_tokens", type=int, default=512, help="answer length when a chat request gives none")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB; 413)")
    p.add_argument("--enable_adapter_loading", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --api_key)")
    p.add_argument("--prompt_template", help="override every model's prompt template")
    p.add_argument("--trust_remote_code", action="store_true", help="run model code shipped with a hub model")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=DIR, a bare adapter DIR (named after its folder), or a folder of runs (each adapter in it)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            path = spec
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                name = os.path.basename(os.path.normpath(path))
            elif os.path.isdir(path):
                found = sorted(d for d in os.listdir(path)
                               if os.path.isfile(os.path.join(path, d, "adapter_config.json")))
                if not found:
                    raise PeftuneError(f"--adapter {path}: neither an adapter directory nor a folder of runs")
                for d in found:
                    out.setdefault(d, os.path.join(path, d))
                continue
            else:
                raise PeftuneError(f"--adapter {path}: no such directory")
        if name in out:
            raise PeftuneError(f"--adapter {spec}: the name {name} is given twice")
        out[name] = path
    return out


def run(args) -> int:
    from ..infer.engine import Engine
    from .app import Settings, create_app

    if args.enable_adapter_loading and not args.api_key:
        raise PeftuneError("--enable_adapter_loading lets clients load files from this machine: set --api_key "
                           "(or PEFTUNE_API_KEY) too")
    for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PeftuneError(f"--{name}: must be >= 1")
    engine = Engine(args.base_model, parse_adapters(args.adapter), base_name=args.served_model_name,
                    dtype=args.dtype, prompt_template=args.prompt_template, trust_remote_code=args.trust_remote_code,
                    max_batch=args.max_batch, max_queue=args.max_queue, engine=args.engine,
                    max_model_len=args.max_model_len)
    app = create_app(engine, Settings(args.api_key, args.max_body_bytes, args.enable_adapter_loading, args.max_tokens))
    import uvicorn

    names = ", ".join([engine.base.name, *engine.served])
    print(f"peftune serve: http://{args.host}:{args.port}/ (chat page), OpenAI API at /v1; models: {names}; "
          f"weights: {engine.weights}" + ("; API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0
