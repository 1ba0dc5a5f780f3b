"""Safe writes and safe failures, shared by every part of vaetrain.

- Atomic writes: data goes to a temporary file in the target folder, is flushed and fsynced, then
  renamed over the final name, so a crash or kill never leaves a half-written file under it. The
  file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the umask), not
  ``mkstemp``'s private 0600.
- :class:`UserError`: a failure caused by the user's input (config, files, data). Its message is one
  line that says what was wrong and how to fix it; the command line prints it without a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


class UserError(ValueError):
    """Bad input; ``str(e)`` is one line naming what is wrong and how to fix it."""


def one_line(e: BaseException | str, limit: int = 500) -> str:
    """An exception (or text) as one line of at most ``limit`` characters."""
    return " ".join(str(e).split())[:limit]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")
