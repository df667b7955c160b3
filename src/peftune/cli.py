"""The `peftune` command: parses, then calls one function per verb."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import PeftuneError, TrainingInterrupted

USAGE = """usage: peftune <command> [options]

commands:
  train [CONFIG.yaml] [--key value ...]   fine-tune an adapter (peftune train --help lists every key)
  chat --adapter DIR [options]            talk to the base model + adapter (peftune chat --help)
  serve [--adapter NAME=DIR ...] [options] an OpenAI-compatible API and a chat page, many adapters on one base
                                          (peftune serve --help)
  merge ADAPTER_DIR --output_dir DIR      the adapter folded into its base: a plain transformers model, checked
                                          (peftune merge --help)
  export ADAPTER_DIR --format gguf --output_dir DIR
                                          the merged model as one GGUF file and an Ollama Modelfile, for llama.cpp
                                          and Ollama (peftune export --help)
  eval --adapter DIR --output_dir R       what the adapter learned and what it forgot, base against tuned: a
                                          report with intervals and a chart (peftune eval --help)
  curves RUN_DIR                          the run's loss, eval loss, learning rate and tokens/s as curves.png
  data inspect CONFIG.yaml|FILE... [opts] validate and tokenize data as training would, and report
                                          (peftune data inspect --help)
  docs [FILE]                             write the config reference (docs/config.md)
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # raised inside peft/accelerate for a renamed transformers API; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft's prefix tuning still passes the `past_key_values` that transformers 5 renamed `cache` (handled for us)
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    # AdaLoRA adapters: peft checks their rank_pattern (one flag per rank) as if it were LoRA's (one rank per
    # module), and calls a module pruned to rank 0 a ZeRO-3 shard; both adapters load and work (tests/test_methods.py)
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
    warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
    # bitsandbytes (imported by peft whenever installed) asks for an optional hub kernel package on every import;
    # its CPU path works without it
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes' 8-bit matmul says this on every layer call
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(argv: list[str]) -> int:
    from .options import help_text, load_config, parse_overrides

    if any(a in ("-h", "--help") for a in argv):
        print("usage: peftune train [CONFIG.yaml] [--key value ...]\n\nEvery key works in the YAML file and as an "
              "option; dotted keys set mappings (--data_vars.name Aurora); lists take repeated flags or commas.\n")
        print(help_text())
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    cfg = load_config(path, parse_overrides(argv[1:] if path else argv))
    from .train.distributed import launched_processes
    from .train.recipe import train

    if cfg.num_processes > 1 and not launched_processes():
        return launch_processes(cfg.num_processes, argv)
    _quiet_libraries()

    try:
        train(cfg)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}. Resume with:\n  {resume_command(argv)}", e.exit_code) from None
    return 0


def launch_processes(n: int, argv: list[str]) -> int:
    """`peftune train ... --num_processes N`: the same command in N processes through torch's own launcher (what
    `torchrun --standalone --nproc_per_node N` runs, on this machine); they find themselves launched and train
    together. Returns the first failed process's exit status (2 for bad input, 128 + the signal for a killed one)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    print(f"peftune: starting {n} training processes (torchrun --standalone --nproc_per_node={n})", file=sys.stderr,
          flush=True)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={n}", "-m", "peftune.cli", "train", *argv]))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        failed = next((c for c in codes if c > 0), None) or next((128 - c for c in codes if c < 0), 1)
        return failed
    return 0


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same arguments, with --resume_from_checkpoint auto."""
    import shlex

    kept, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--resume_from_checkpoint") or argv[i].startswith("--resume-from-checkpoint"):
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    return shlex.join(["peftune", "train", *kept, "--resume_from_checkpoint", "auto"])


def _verb(module, prog: str, description: str, argv: list[str]) -> int:
    """A command that is a module's add_arguments(parser) and run(args)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    _quiet_libraries()
    return module.run(args)


def cmd_chat(argv: list[str]) -> int:
    from .infer import chat

    return _verb(chat, "peftune chat", "Chat with a base model and an adapter.", argv)


def cmd_merge(argv: list[str]) -> int:
    from .export import merge

    return _verb(merge, "peftune merge", "Fold an adapter into its base model and write a plain transformers model "
                 "directory (checked before it is written).", argv)


def cmd_export(argv: list[str]) -> int:
    from .export import export

    return _verb(export, "peftune export", "Export the fine-tuned model for llama.cpp and Ollama: one GGUF file and "
                 "a Modelfile.", argv)


DATA_USAGE = """usage: peftune data inspect CONFIG.yaml [--key value ...] [options]
       peftune data inspect FILE... [--format F] [--columns.OURS THEIRS ...] [--key value ...] [options]

Reads, validates and tokenizes the data exactly as `peftune train` would, and reports per source and for the
mix: format, rows, bad rows, token-length percentiles, rows truncated at cutoff_len, the share of tokens that
carry loss, and duplicate rows.

  CONFIG.yaml              a training config: its data_path (mixtures, column maps, weights), data_vars,
                           base_model, prompt_template, system_prompt, cutoff_len ... exactly as train reads them
  FILE...                  data files instead of a config (.json, .jsonl, .csv, .parquet, save_to_disk dirs)
  --format F               with FILEs: alpaca, sharegpt, openai, prompt_completion or text (else detected)
  --columns.OURS THEIRS    with FILEs: map a field, e.g. --columns.instruction question --columns.output answer
  --json                   print one machine-readable JSON object
  --show K                 print K rendered samples with the trained text marked
  --plot FILE.png          write a histogram of sample lengths with cutoff_len marked
  --key value              any `peftune train` key (--base_model, --cutoff_len, --data_vars.name, ...)"""


def _inspect_options(rest: list[str]) -> tuple[dict, list[str], dict]:
    """Splits inspect's own options (--json, --show, --plot, --format, --columns.X) from train keys."""
    opts: dict = {"json": False, "show": "0", "plot": None, "format": None}
    columns: dict[str, str] = {}
    passthrough: list[str] = []
    while rest:
        arg = rest.pop(0)
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name == "json":
            opts["json"] = True
        elif name in ("show", "plot", "format") or name.startswith("columns."):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else None)
            if value is None:
                raise PeftuneError(f"--{name}: needs a value")
            if name.startswith("columns."):
                columns[name.split(".", 1)[1]] = value
            else:
                opts[name] = value
        else:
            passthrough.append(arg)
    try:
        opts["show"] = int(opts["show"])
    except ValueError:
        raise PeftuneError(f"--show: expected a number of samples, got {opts['show']!r}") from None
    return opts, passthrough, columns


def cmd_curves(argv: list[str]) -> int:
    from .train import curves

    return _verb(curves, "peftune curves", "Draw a run's metrics.jsonl (loss, eval loss, learning rate, tokens/s "
                 "by step) as curves.png.", argv)


def cmd_eval(argv: list[str]) -> int:
    from .eval import run

    return _verb(run, "peftune eval", "What an adapter learned (its target rows) and what it forgot (a general "
                 "probe against the base's own answers, multiple-choice tasks), base against tuned, and the adapter "
                 "scaled from 0 to 1.", argv)


def cmd_serve(argv: list[str]) -> int:
    from . import serve

    parser = argparse.ArgumentParser(prog="peftune serve", description="Serve the base model and adapters over an "
                                     "OpenAI-compatible API, with a chat page at /.")
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    _quiet_libraries()
    return serve.run(args)


def cmd_data(argv: list[str]) -> int:
    from . import hints
    from .options import load_config, parse_overrides

    if not argv or argv[0] != "inspect" or any(a in ("-h", "--help") for a in argv):
        print(DATA_USAGE)
        return 0 if argv and argv[0] == "inspect" else 2
    rest = argv[1:]
    paths = []
    while rest and not rest[0].startswith("--"):
        paths.append(rest.pop(0))
    if not paths:
        raise PeftuneError("data inspect: give a training config (.yaml) or at least one data file")
    opts, passthrough, columns = _inspect_options(rest)
    configs = [p for p in paths if p.lower().endswith((".yaml", ".yml"))]
    if configs:
        if len(paths) > 1:
            raise PeftuneError("data inspect: give one config file, or data files, not both (add data to the "
                               "config's data_path)")
        if opts["format"] or columns:
            raise PeftuneError("data inspect: --format and --columns.X are for bare data files; with a config, "
                               "set format/columns in its data_path entries")
        cfg = load_config(paths[0], parse_overrides(passthrough))
        hints.set_style(paths[0], "inspect")
    else:
        spec = {**({"format": opts["format"]} if opts["format"] else {}), **({"columns": columns} if columns else {})}
        sources = [{"path": p, **spec} if spec else p for p in paths]
        cfg = load_config(None, {**parse_overrides(passthrough), "data_path": sources})
        hints.set_style(None, "inspect")
    _quiet_libraries()
    from .data.inspect import format_report, inspect

    say = (lambda msg: print(msg, file=sys.stderr)) if opts["json"] else print
    result = inspect(cfg, show=opts["show"], plot=opts["plot"], say=say)
    if opts["json"]:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_report(result))
    if opts["plot"]:
        print(f"wrote the length histogram to {os.path.abspath(opts['plot'])}", file=sys.stderr)
    return 0


def cmd_docs(argv: list[str]) -> int:
    from .options import markdown_docs
    from .io import atomic_write_text

    if argv and argv[0] in ("-h", "--help"):
        print("usage: peftune docs [FILE]   write the config reference (every train setting, its default and its "
              "meaning) as Markdown to FILE (default docs/config.md)")
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(f"error: peftune docs takes one file name, not {' '.join(argv)}", file=sys.stderr)
        return 2
    target = argv[0] if argv else os.path.join("docs", "config.md")
    atomic_write_text(target, markdown_docs())
    print(f"wrote {target}")
    return 0


COMMANDS = {"train": cmd_train, "chat": cmd_chat, "serve": cmd_serve, "merge": cmd_merge, "export": cmd_export, "eval": cmd_eval, "curves": cmd_curves,
            "data": cmd_data, "docs": cmd_docs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"peftune: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except TrainingInterrupted as e:
        print(f"peftune: {e}", file=sys.stderr)
        return e.exit_code
    except PeftuneError as e:
        print(f"peftune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\npeftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
