"""Atomic file writes: a file either exists whole or not at all (write to a temp file, fsync, rename)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or directory) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def publish(tmp: str, path: str) -> None:
    """fsync a finished temporary file, give it normal permissions (mkstemp makes 0600), rename it into place."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; on success it is renamed over `path`, on error removed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def sha256_files(*paths: str) -> str:
    """The sha256 of the files' contents one after another, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
