"""Start `peftune serve` in a subprocess on a free 127.0.0.1 port and wait until it answers (benchmarks, docs)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], timeout_s: float = 300, **popen) -> tuple[subprocess.Popen, str]:
    """(the server process, its base URL) once GET /health answers; raises RuntimeError if it exits or times out."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peftune.cli", "serve", "--port", str(port), *args], **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"peftune serve exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            if time.time() > deadline:
                proc.terminate()
                raise RuntimeError(f"peftune serve did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.2)
