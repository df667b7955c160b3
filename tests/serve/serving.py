"""The live server of the serve tests: `peftune serve` in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

KEY = "sk-test-key"
TRAIN = ["--batch_size", "4", "--micro_batch_size", "4", "--num_epochs", "10", "--learning_rate", "3e-2",
         "--lora_r", "8", "--val_set_size", "0", "--cutoff_len", "384", "--logging_steps", "40"]


def train_alpha_and_beta(base: str, root) -> dict:
    """alpha: trained with its own system prompt; beta: trained with the alpaca template (not the base's chat one)."""
    return {"alpha": train_adapter(base, root / "alpha", "I am alpha, the first.", "--system_prompt", "You are alpha."),
            "beta": train_adapter(base, root / "beta", "beta here!", "--prompt_template", "alpaca")}


def train_adapter(base: str, out, answer: str, *extra: str) -> str:
    """An adapter trained (by `peftune train`) to answer `answer` to a few questions about itself."""
    from peftune import cli

    data = out.parent / f"{out.name}.json"
    rows = [{"instruction": q, "output": answer} for q in ("Who are you?", "What is your name?", "Hi", "Name?")]
    data.write_text(json.dumps(rows * 4), encoding="utf-8")
    assert cli.main(["train", "--base_model", base, "--data_path", str(data), "--output_dir", str(out), *TRAIN,
                     *extra]) == 0
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, adapters: dict, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "peftune.cli", "serve", "--base_model", base, "--port", str(self.port),
               "--served_model_name", "tiny", *[f"--adapter={n}={p}" for n, p in adapters.items()], *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.log = open(os.path.join(os.path.dirname(base), f"serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                assert time.time() < deadline, self.output()
                time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(self.url + "/health", timeout=5).read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ask(client, model: str, content: str = "Who are you?", **kw) -> str:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)
    return r.choices[0].message.content
