"""Lightning checkpoints that survive kills and full disks, and the choice of the one to resume from.

- Writes go through ``vaetrain.safe.atomic_open``: a crash, kill or full disk during a save leaves the
  previous checkpoint of that name untouched; the error names the path and the cause in one line.
- Reads go through ``vaetrain.formats.io.read_checkpoint``, the reader of every model file too: ``weights_only``
  always, one-line errors for empty, truncated, foreign and code-carrying files.
- ``resume=auto`` picks the newest loadable checkpoint of the run (``last``, periodic ``step=`` or
  pre-emption), by the step stored inside, skipping (and naming) broken ones; fragments of killed saves
  (``.NAME.*.tmp``) are removed before the run starts.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vaetrain.formats.io import CheckpointError, read_checkpoint
from vaetrain.safe import UserError, atomic_open, one_line

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic, safe ``save_checkpoint`` / ``load_checkpoint`` for Lightning's Trainer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        try:
            with atomic_open(path) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: could not write the checkpoint ({disk_cause(path, e)}); the previous checkpoint "
                            f"there is unchanged: free space or point run_dir elsewhere, then resume=auto") from None

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_training_checkpoint(path)


def disk_cause(path: Path, e: BaseException) -> str:
    """Why a write under ``path`` failed, in words (torch reports a full disk as a cryptic zip-writer error)."""
    err = getattr(e, "errno", None)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if err == errno.ENOSPC or (free is not None and free < 64 << 20 and "write" in str(e)):
        return "no space left on device" + (f", {free >> 20} MiB free" if free is not None else "")
    if err in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err == errno.EROFS:
        return "read-only file system"
    return os.strerror(err) if err else one_line(e, 200)


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A vaetrain/Lightning training checkpoint, or ``CheckpointError`` in one line."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict/global_step: a model file? load it "
                              f"with student=finetune student.source=...); resume= takes a run's .ckpt or run folder")
    return ckpt


def checkpoint_position(path: str | os.PathLike) -> tuple[int, int]:
    """(global_step, training batches seen) stored in a checkpoint, read without loading its tensors."""
    ckpt = read_checkpoint(path, mmap=True)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (no global_step)")
    loop = (ckpt.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(ckpt["global_step"]), int(loop.get("_batches_that_stepped", ckpt["global_step"]))


def remove_stale_fragments(folder: Path) -> list[Path]:
    """Delete what killed atomic writes left behind (``.NAME.XXXX.tmp``); returns what was removed."""
    gone = []
    for p in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def find_resume(resume: str | None, run_dir: Path) -> str | None:
    """``resume``: None/"" (fresh), "auto" (the newest loadable checkpoint of ``run_dir``, or fresh when there
    is none), a run folder (the same, but it must have one) or a ``.ckpt`` file."""
    if resume in (None, "", False):
        return None
    if resume != "auto" and Path(resume).is_file():
        checkpoint_position(resume)  # one line now if it is empty, truncated, foreign or unsafe
        return str(resume)
    folder = run_dir if resume == "auto" else Path(resume)
    if resume != "auto" and not folder.is_dir():
        raise UserError(f"resume={resume}: no checkpoint there (expected a .ckpt file or a run folder)")
    ckpts = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    found, broken = [], []
    for p in sorted(ckpts.glob("*.ckpt")):
        try:
            found.append((checkpoint_position(p)[0], p.name == LAST, p.name, p))
        except CheckpointError as e:
            broken.append(str(e))
    for msg in broken:
        print(f"vaetrain train: skipping an unusable checkpoint: {msg}", flush=True)
    if not found:
        if resume == "auto":
            return None
        raise UserError(f"resume={resume}: no loadable checkpoint in {ckpts}" + (f" ({broken[0]})" if broken else ""))
    # the newest step wins; at equal steps last.ckpt (written last), then the name: deterministic
    return str(max(found)[3])


class Checkpoint(ModelCheckpoint):
    """Every ``every_n_steps`` generator steps (``step=NNNNNNN.ckpt``, newest ``keep`` kept) and ``last.ckpt``."""

    def __init__(self, run_dir: str, every_n_steps: int = 500, keep: int = 2):
        super().__init__(dirpath=str(Path(run_dir) / "checkpoints"), filename="step={step:07d}",
                         auto_insert_metric_name=False, every_n_train_steps=every_n_steps, save_top_k=keep,
                         monitor="step", mode="max", save_last=True)
