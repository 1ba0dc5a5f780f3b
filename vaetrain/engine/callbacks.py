"""Lightning callbacks around ``VAETrainModule``: pre-emption, labelled image grids, throughput, data statistics."""

from __future__ import annotations

import atexit
import functools
import io
import multiprocessing
# imported before the hook below is registered, so that its own exit hook (registered at import) runs after ours
import multiprocessing.util  # noqa: F401
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image, ImageDraw
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from vaetrain.convention import model_to_uint8
from vaetrain.engine.performance import StepFlops, device_peak_flops
from vaetrain.safe import atomic_write


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
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # only between optimizer steps: a checkpoint inside an accumulation window would hold the effect of
        # half-accumulated gradients that a resumed run cannot reproduce (every rank is at the same micro-batch)
        if not getattr(pl_module, "at_step_boundary", True):
            return
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
    exit with the main process (sentinel or torch's parent watchdog), and at interpreter exit
    (``_end_shielded_workers``).
    """

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _ignores_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ignored = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    except (OSError, StopIteration, ValueError):
        return True  # no /proc (macOS): assume it is one of ours
    return bool(ignored >> (signal.SIGTERM - 1) & 1)


def _end_shielded_workers() -> None:
    """At interpreter exit, before multiprocessing's own exit hook (atexit runs the later registration first):
    that hook ends daemonic children with SIGTERM and then joins them, which waits forever for a worker that
    ignores SIGTERM, when a loader iterator outlived the training (persistent workers referenced from a cycle,
    a notebook, a test session). Those workers have nothing left to do: end them with SIGKILL."""
    for p in multiprocessing.active_children():
        if p.daemon and _ignores_sigterm(p.pid):
            p.kill()
            p.join(5)


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_end_shielded_workers)


def shield_loader_workers(datamodule) -> None:
    """Make the workers of ``datamodule``'s training loader survive pre-emption signals (see above)."""
    make = getattr(datamodule, "train_dataloader", None)
    if make is None or getattr(make, "_vaetrain_shielded", False):
        return
    _register_exit_hook()

    def train_dataloader():
        loader = make()
        if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, _IgnorePreemptionSignals):
            loader.worker_init_fn = _IgnorePreemptionSignals(loader.worker_init_fn)
        return loader

    train_dataloader._vaetrain_shielded = True
    datamodule.train_dataloader = train_dataloader


class ImageGrid(L.Callback):
    """Saves the validation grid as a PNG in ``<run_dir>/images`` (rows: images; labelled columns: photo |
    teacher | student; small images upscaled by pixel repetition to at least ``min_tile`` pixels, so 32 px
    validation images can be judged) and logs it to every logger that takes images (wandb)."""

    def __init__(self, run_dir: str, min_tile: int = 128):
        self.dir = Path(run_dir) / "images"
        self.min_tile = min_tile
        self.last: Path | None = None

    def render(self, cols: dict[str, torch.Tensor]) -> Image.Image:
        """``cols``: label -> (k, 3, H, W) images in [-1, 1] -> one labelled PIL image."""
        h = max(max(c.shape[-2] for c in cols.values()), self.min_tile)
        tiles = {}
        for name, c in cols.items():
            rep = max(1, round(h / c.shape[-2]))
            c = c.repeat_interleave(rep, -2).repeat_interleave(rep, -1) if rep > 1 else c
            if c.shape[-2] != h:
                c = torch.nn.functional.interpolate(c, size=(h, h * c.shape[-1] // c.shape[-2]), mode="nearest")
            tiles[name] = c
        rows = torch.cat([torch.cat(list(r), dim=-1) for r in zip(*tiles.values())], dim=-2)  # (3, k*H, n*W)
        body = Image.fromarray(model_to_uint8(rows).permute(1, 2, 0).numpy())  # (k*H, n*W, 3)
        header = 16
        out = Image.new("RGB", (body.width, body.height + header), (255, 255, 255))
        out.paste(body, (0, header))
        draw, x = ImageDraw.Draw(out), 0
        for name, c in tiles.items():
            draw.text((x + 4, 2), name, fill=(0, 0, 0))
            x += c.shape[-1]
        return out

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or not isinstance(outputs, dict) or "grid" not in outputs:
            return
        img = self.render(outputs["grid"])
        path = self.dir / f"val_step{trainer.global_step:07d}.png"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(path, buf.getvalue())
        self.last = path
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key="val/grid", images=[str(path)], step=trainer.global_step,
                             caption=[" | ".join(outputs["grid"])])


class DataStats(L.Callback):
    """Logs the data module's skip statistics (``skip_stats()``: samples delivered, skips per reason)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(trainer.datamodule, "skip_stats", None)
        if not callable(stats) or (trainer.global_step % max(trainer.log_every_n_steps, 1)):
            return
        pl_module.log_dict({f"data/{k}" if k == "samples" else f"data/skipped_{k}": float(v)
                            for k, v in (stats() or {}).items()}, on_step=True, on_epoch=False, batch_size=1)


class Throughput(L.Callback):
    """Images per second and model FLOP utilisation over the training steps (validation excluded).

    The FLOPs of one real step (student, teacher, loss nets, discriminator, forward and backward) are counted
    once per run, at global step ``count_flops_at`` (after warm-up), with ``torch.utils.flop_counter``; MFU is
    those FLOPs per second of step time over the device's dense bf16 peak (``peak_flops``, else a table of known
    GPUs; none on CPU unless given). Logged every ``trainer.log_every_n_steps`` steps.

    The counter is a dispatch mode, under which a step's last bits can differ (kernels dispatch another way), so
    the counted step is fixed by the global step, not by the batch of this process, and the count is saved in
    checkpoints: a resumed run neither counts again nor departs, bitwise, from one that was never stopped."""

    def __init__(self, window: int = 20, count_flops_at: int | None = 2, peak_flops: float | None = None):
        self.window, self.count_flops_at, self.peak_flops = window, count_flops_at, peak_flops
        self.flops = StepFlops()
        self._times: list[tuple[float, int]] = []
        self._counting = False

    def state_dict(self) -> dict:
        return {"flops": self.flops.flops}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops.flops = state_dict.get("flops")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counting = self.flops.flops is None and trainer.global_step == self.count_flops_at
        if self._counting:
            self.flops.start()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self._t0
        if self._counting:  # the counted step ran slower: keep it out of the timing
            self._counting = False
            self.flops.stop()
            return
        first = next((v for k, v in batch.items() if k in ("image", "latent") and isinstance(v, torch.Tensor)), None)
        n = int(first.shape[0]) if first is not None else 0
        self._times = (self._times + [(dt, n)])[-self.window:]
        secs = sum(t for t, _ in self._times)
        if secs <= 0 or trainer.global_step % max(trainer.log_every_n_steps, 1):
            return
        logs = {"train/images_per_s": sum(n for _, n in self._times) * trainer.world_size / secs}
        if self.flops.flops:
            per_s = self.flops.flops * len(self._times) / secs  # per device
            logs["train/tflops_per_s"] = per_s / 1e12
            peak = self.peak_flops or device_peak_flops(pl_module.device)
            if peak:
                logs["train/mfu"] = per_s / peak
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=max(n, 1), rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._times = []
