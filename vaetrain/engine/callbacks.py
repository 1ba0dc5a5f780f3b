"""Lightning plumbing around ``VAETrainModule``: atomic checkpoints, pre-emption, image grids, throughput."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vaetrain.convention import model_to_uint8


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace``.

    A crash or kill during the write leaves the previous checkpoint of that name untouched (and no
    partial file under the final name).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class Checkpoint(ModelCheckpoint):
    """Every ``every_n_steps`` generator steps (``step=NNNNNNN.ckpt``, newest ``keep`` kept) and ``last.ckpt``."""

    def __init__(self, run_dir: str, every_n_steps: int = 500, keep: int = 2):
        super().__init__(dirpath=str(Path(run_dir) / "checkpoints"), filename="step={step:07d}",
                         auto_insert_metric_name=False, every_n_train_steps=every_n_steps, save_top_k=keep,
                         monitor="step", mode="max", save_last=True)


class Preemption(L.Callback):
    """SIGTERM / SIGUSR1 (SLURM's ``--signal=USR1@90``) -> checkpoint at the next step boundary, then stop.

    The handler only sets a flag; all ranks agree on it (any rank signalled -> all stop) at the end of
    the batch, save ``last.ckpt`` together, and stop cleanly. Under SLURM the job is requeued.
    """

    def __init__(self, run_dir: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.run_dir, self.signals, self.requeue = Path(run_dir), signals, requeue
        self.received: int | None = None
        self.saved_to: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning's own handlers are installed, so ours replaces them for the run
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        path = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else self.run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(str(path))
        self.saved_to = path
        trainer.should_stop = True
        rank_zero_info(f"vaetrain: pre-empted (signal {self.received}) at step {trainer.global_step}; "
                       f"checkpoint written to {path}; continue with resume={path}")
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            subprocess.call(["scontrol", "requeue", os.environ.get("SLURM_ARRAY_JOB_ID", job)])

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}


class _IgnorePreemptionSignals:
    """``worker_init_fn`` for DataLoader workers: ignore SIGTERM/SIGUSR1 (then run the loader's own init).

    Schedulers signal every process of a job, and torch's workers die on SIGTERM (and by default on
    SIGUSR1), which kills the main process's next fetch before it can write its checkpoint. Workers still
    exit with the main process (sentinel or torch's parent watchdog).
    """

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def shield_loader_workers(datamodule) -> None:
    """Make the workers of ``datamodule``'s training loader survive pre-emption signals (see above)."""
    make = getattr(datamodule, "train_dataloader", None)
    if make is None or getattr(make, "_vaetrain_shielded", False):
        return

    def train_dataloader():
        loader = make()
        if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, _IgnorePreemptionSignals):
            loader.worker_init_fn = _IgnorePreemptionSignals(loader.worker_init_fn)
        return loader

    train_dataloader._vaetrain_shielded = True
    datamodule.train_dataloader = train_dataloader


class ImageGrid(L.Callback):
    """Saves the validation grid (rows: images; columns: input | teacher | student) as a PNG in
    ``<run_dir>/images`` and logs it to every logger that takes images (wandb)."""

    def __init__(self, run_dir: str):
        self.dir = Path(run_dir) / "images"
        self.last: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or not isinstance(outputs, dict) or "grid" not in outputs:
            return
        cols = outputs["grid"]
        h = min(c.shape[-2] for c in cols)
        cols = [torch.nn.functional.interpolate(c, size=(h, h * c.shape[-1] // c.shape[-2]), mode="nearest")
                if c.shape[-2] != h else c for c in cols]
        rows = torch.cat([torch.cat(list(r), dim=-1) for r in zip(*cols)], dim=-2)  # (3, k*H, n_cols*W)
        arr = model_to_uint8(rows).permute(1, 2, 0).numpy()  # (k*H, n_cols*W, 3)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"val_step{trainer.global_step:07d}.png"
        Image.fromarray(arr).save(path)
        self.last = path
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="val/grid", images=[str(path)], step=trainer.global_step,
                             caption=["input | teacher | student"])


class Throughput(L.Callback):
    """Images per second over the training steps (excluding validation), logged and on the progress bar."""

    def __init__(self, window: int = 20):
        self.window = window
        self._times: list[tuple[float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        img = batch.get("image") if isinstance(batch, dict) else None
        n = int(img.shape[0]) if isinstance(img, torch.Tensor) else 0
        self._times = (self._times + [(time.perf_counter() - self._t0, n)])[-self.window:]
        secs = sum(t for t, _ in self._times)
        if secs > 0:
            ips = sum(n for _, n in self._times) * trainer.world_size / secs
            pl_module.log("train/images_per_s", ips, on_step=True, prog_bar=True, batch_size=max(n, 1),
                          rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._times = []
