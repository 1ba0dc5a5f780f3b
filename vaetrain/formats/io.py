"""Safe weight I/O and the one-line errors users see when a checkpoint is wrong."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from vaetrain.safe import UserError, atomic_write


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_checkpoint(path: str | os.PathLike, mmap: bool = False):
    """The object stored in a .safetensors file (its tensor dict) or a torch pickle (``weights_only=True`` only):
    the one reader of every weights file and training checkpoint vaetrain opens.

    ``mmap=True`` maps a zip-format pickle's storages instead of reading them (a cheap look inside a big ``.ckpt``).
    Every failure is a one-line ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (a killed write? use an older checkpoint)")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON header
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several error types for bad headers
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = _one_line(e)
        # torch wraps every weights_only failure in the same boilerplate; the reason follows this marker
        msg = msg.split("WeightsUnpickler error:")[-1].strip()
        wanted = re.search(r"GLOBAL ([\w.]+)", msg)
        if wanted or "Unsupported global" in msg:
            # torch's own text goes on to explain how to switch the safety off: never pass that on
            raise CheckpointError(
                f"{path}: refused to unpickle: it holds objects other than tensors ({wanted[1] if wanted else 'a global'}), "
                f"which could run code; only open it if you made it, and convert it to safetensors first") from None
        raise CheckpointError(f"{path}: not a checkpoint ({_first_sentence(msg)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        why = _first_sentence(_one_line(e))
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({why})") from None
    except Exception as e:  # the weights_only unpickler fails on arbitrary bytes with IndexError, KeyError, ...
        raise CheckpointError(f"{path}: not a checkpoint ({type(e).__name__}: {_first_sentence(_one_line(e))})") from None


def _first_sentence(msg: str) -> str:
    """torch's load errors go on after the cause with advice (documentation links, how to disable weights_only)
    that does not belong in a one-line error."""
    return re.split(r"\.\s|\s(?=Check the documentation)", msg)[0].rstrip(".")[:200]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from .safetensors or a torch pickle (``weights_only=True`` only).

    Nesting under ``state_dict`` (Lightning) is unwrapped; non-tensor entries are dropped.
    """
    return flatten_state_dict(read_checkpoint(path), path)


def float_dtype(*sds: Mapping[str, torch.Tensor]) -> str | None:
    """The one floating dtype of every floating tensor in ``sds`` ("float16", "float32", ...), None if mixed/none."""
    dtypes = {v.dtype for sd in sds for v in sd.values() if v.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def flatten_state_dict(obj, path: str | os.PathLike = "<memory>") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def check_and_load(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """Strict ``load_state_dict`` with an error naming the first missing/unexpected/misshaped keys.

    ``allow_missing`` / ``allow_unexpected`` are key prefixes tolerated on purpose (the caller
    reports them, e.g. midblock attention dropped with an explicit option).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(allow_missing)]
    unexpected = [k for k in sd if k not in own and not k.startswith(allow_unexpected)]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes (file vs model): {_first(shapes, 3)}")
    if problems:
        raise CheckpointError(f"{path}: does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def write_safetensors(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (temp file + rename) so a kill never leaves a half-written file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    return atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's string metadata (header only); ``{}`` for other or unreadable files (``read_state_dict``
    reports those properly)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # safetensors raises several error types for bad headers
        return {}


def read_json_metadata(path: str | os.PathLike, key: str) -> dict:
    """The JSON dict stored under ``key`` in a safetensors header; ``{}`` for other files or when absent/unreadable
    (callers then fall back to the keys, which ``read_state_dict`` checks)."""
    meta = read_metadata(path)
    try:
        value = json.loads(meta[key]) if key in meta else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
