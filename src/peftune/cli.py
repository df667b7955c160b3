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
  data inspect PATH... [options]          validate and tokenize data as training would, and report
                                          (--json, --show K, --plot FILE.png, --format F, any train key)
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
    from .config import help_text, load_config, parse_overrides

    if any(a in ("-h", "--help") for a in argv):
        print("usage: peftune train [CONFIG.yaml] [--key value ...]\n\nEvery key works in the YAML file and as an "
              "option; dotted keys set mappings (--data_vars.name Aurora); lists take repeated flags or commas.\n")
        print(help_text())
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    cfg = load_config(path, parse_overrides(argv[1:] if path else argv))
    _quiet_libraries()
    from .train.recipe import train

    train(cfg)
    return 0


def cmd_chat(argv: list[str]) -> int:
    from .infer import chat

    parser = argparse.ArgumentParser(prog="peftune chat", description="Chat with a base model and an adapter.")
    chat.add_arguments(parser)
    args = parser.parse_args(argv)
    _quiet_libraries()
    return chat.run(args)


def cmd_data(argv: list[str]) -> int:
    from .config import load_config, parse_overrides

    if not argv or argv[0] != "inspect" or any(a in ("-h", "--help") for a in argv):
        print("usage: peftune data inspect PATH... [--json] [--show K] [--plot FILE.png] [--format F]\n"
              "                            [--base_model M] [--cutoff_len N] [--prompt_template T] [--data_vars.X V] ...")
        return 0 if argv and argv[0] == "inspect" else 2
    rest = argv[1:]
    paths = []
    while rest and not rest[0].startswith("--"):
        paths.append(rest.pop(0))
    if not paths:
        raise PeftuneError("data inspect: give at least one data file")
    opts: dict = {"json": False, "show": 0, "plot": None, "format": None}
    passthrough = []
    while rest:
        arg = rest.pop(0)
        name = arg[2:].split("=", 1)[0]
        if name == "json":
            opts["json"] = True
        elif name in ("show", "plot", "format"):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else None)
            if value is None:
                raise PeftuneError(f"--{name}: needs a value")
            opts[name] = value
        else:
            passthrough.append(arg)
    try:
        show = int(opts["show"])
    except ValueError:
        raise PeftuneError(f"--show: expected a number of samples, got {opts['show']!r}") from None
    sources = [{"path": p, "format": opts["format"]} if opts["format"] else p for p in paths]
    cfg = load_config(None, {**parse_overrides(passthrough), "data_path": sources})
    _quiet_libraries()
    from .data.inspect import format_report, inspect

    say = (lambda msg: print(msg, file=sys.stderr)) if opts["json"] else print
    result = inspect(cfg, show=show, plot=opts["plot"], say=say)
    if opts["json"]:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_report(result))
    return 0


def cmd_docs(argv: list[str]) -> int:
    from .config import markdown_docs
    from .io import atomic_write_text

    target = argv[0] if argv else os.path.join("docs", "config.md")
    atomic_write_text(target, markdown_docs())
    print(f"wrote {target}")
    return 0


COMMANDS = {"train": cmd_train, "chat": cmd_chat, "data": cmd_data, "docs": cmd_docs}


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
