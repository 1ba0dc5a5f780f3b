"""Lightning checkpoints that survive kills: atomic writes, a cadence in generator steps, and ``last.ckpt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vaetrain.safe import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``vaetrain.safe.atomic_open``: a crash or kill during the write leaves the
    previous checkpoint of that name untouched (and no partial file under the final name)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_open(Path(path)) as f:
            torch.save(checkpoint, f)


class Checkpoint(ModelCheckpoint):
    """Every ``every_n_steps`` generator steps (``step=NNNNNNN.ckpt``, newest ``keep`` kept) and ``last.ckpt``."""

    def __init__(self, run_dir: str, every_n_steps: int = 500, keep: int = 2):
        super().__init__(dirpath=str(Path(run_dir) / "checkpoints"), filename="step={step:07d}",
                         auto_insert_metric_name=False, every_n_train_steps=every_n_steps, save_top_k=keep,
                         monitor="step", mode="max", save_last=True)
