"""``vaetrain train``: build the Trainer, loggers and callbacks around ``VAETrainModule``; fit; resume; export.

Called by the CLI with instantiated objects (teacher, student, loss terms, discriminator, data module,
optimizer factories) and plain dicts (trainer kwargs, module options); usable from Python as is.

Launching beyond one process (Lightning picks the cluster environment up from the variables the
launcher sets; always give a fixed ``run_dir`` so that every rank and every restart agree on it):

- one machine, all GPUs: ``vaetrain train trainer=gpu run_dir=runs/x`` (Lightning starts the local ranks
  by re-running the command; rank 0 hands them its run folder through ``$VAETRAIN_RUN_DIR``);
- torchrun, N nodes: ``torchrun --nnodes N --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
  -m vaetrain.cli train trainer=gpu trainer.num_nodes=N trainer.devices=8 run_dir=/shared/runs/x resume=auto``;
- SLURM: ``#SBATCH --nodes N --ntasks-per-node 8 --gpus-per-node 8 --signal=USR1@120 --requeue`` and
  ``srun vaetrain train trainer=gpu trainer.num_nodes=N trainer.devices=8 run_dir=/shared/runs/x resume=auto``.
  On SIGUSR1/SIGTERM every rank finishes its step, ``last.ckpt`` is written, the job is requeued
  (``scontrol requeue``) and the restarted job continues with ``resume=auto``.

DDP (``trainer.strategy=ddp``) wraps the student and the discriminator apart (``vaetrain.engine.parallel``), so a
GAN step needs no unused-parameter search; ``trainer.strategy=ddp_one_wrapper`` is Lightning's wrapper of the whole
module (with the search for a GAN; ``scripts/bench_ddp.py`` compares the two).

Resume is exact (same weights as an uninterrupted run on CPU) from any checkpoint, mid-epoch included:
weights, EMA, discriminator, both optimizers and schedules, the step, the RNG states and every rank's and
loader worker's data position are restored, and the posterior noise is a function of (seed, step, rank).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
import torch
from torch import nn

from vaetrain.arguments import check_call
from vaetrain.commands.audit_fp16 import audit_fp16
from vaetrain.commands.cache_latents import ensure_latent_cache
from vaetrain.engine.callbacks import ImageGrid, Preemption, shield_loader_workers
from vaetrain.engine.checkpoints import AtomicCheckpointIO, checkpoint_position, find_resume, remove_stale_fragments
from vaetrain.engine.guards import NonFiniteLossError
from vaetrain.engine.module import VAETrainModule
from vaetrain.engine.parallel import TwoWrapperDDPStrategy
from vaetrain.formats import ExportInfo, latent_space, save_autoencoder
from vaetrain.formats.io import CheckpointError
from vaetrain.models.base import Autoencoder
from vaetrain.safe import UserError, atomic_write_json

# set by rank 0 before Lightning starts the other local ranks (which re-run the command), so that every
# rank writes into the same run folder even when it is named after the clock
_RUN_DIR_ENV = "VAETRAIN_RUN_DIR"


def _resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    inherited = os.environ.get(_RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    path = Path(run_dir).resolve()
    os.environ[_RUN_DIR_ENV] = str(path)
    return path


def _build(obj: Any, run_dir: Path, resume_at: int | None = None) -> Any:
    """Loggers and callbacks arrive as objects or as ``_partial_`` factories that want the run folder (and, for
    the loggers that keep their history across resumes, the batch position resumed from)."""
    if obj is None or not callable(obj) or isinstance(obj, nn.Module):
        return obj
    fn = getattr(obj, "func", obj)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return obj
    extra = {"resume_at": resume_at} if "resume_at" in params else {}
    if "run_dir" in params:
        return obj(run_dir=str(run_dir), **extra)
    if "save_dir" in params:
        return obj(save_dir=str(run_dir), **extra)
    return obj() if hasattr(obj, "func") else obj


# the DDP strategies Lightning may pick (or be told to use), with their process start methods; the last two are
# vaetrain's: the whole module in one DDP wrapper (Lightning's layout), or the student and the discriminator apart
_DDP_START = {"auto": "popen", "ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork",
              "ddp_find_unused_parameters_true": "popen", "ddp_find_unused_parameters_false": "popen",
              "ddp_one_wrapper": "popen", "ddp_two_wrappers": "popen"}
_ONE_WRAPPER = ("ddp_one_wrapper", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def _processes(trainer_kwargs: Mapping) -> int:
    """How many training processes the trainer settings ask for (devices x nodes)."""
    devices, accel = trainer_kwargs.get("devices", "auto"), str(trainer_kwargs.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif str(devices) in ("-1", "auto"):
        n = torch.cuda.device_count() if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        n = int(devices)
    return n * int(trainer_kwargs.get("num_nodes", 1) or 1)


def resolve_strategy(trainer_kwargs: Mapping, gan: bool, accumulate: int = 1):
    """Any multi-process DDP strategy (including ``auto`` with several devices) as one of vaetrain's two DDP
    layouts. ``ddp_two_wrappers`` (what ``ddp``, ``auto`` & co. give) wraps the student and the discriminator
    apart, each used only in its own backward: no unused-parameter search. ``ddp_one_wrapper`` and Lightning's
    ``ddp_find_unused_parameters_*`` wrap the whole module at once: the G backward leaves the frozen
    discriminator without gradients and the D backward leaves the student without, so DDP must search for unused
    parameters then (a graph traversal per backward), and DDP cannot combine that search with ``no_sync``
    accumulation. Gradients live in DDP's buckets (``gradient_as_bucket_view``: no copy)."""
    strategy = trainer_kwargs.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in _DDP_START or _processes(trainer_kwargs) <= 1:
        return strategy
    start = _DDP_START[strategy]
    if strategy not in _ONE_WRAPPER:
        return TwoWrapperDDPStrategy(start_method=start, find_unused_parameters=False, gradient_as_bucket_view=True)
    if gan and accumulate > 1:
        raise UserError(f"trainer.strategy={strategy}: a discriminator with module.accumulate={accumulate} cannot "
                        f"train in one DDP wrapper (DDP's unused-parameter search fails with no_sync accumulation); "
                        f"use trainer.strategy=ddp_two_wrappers (what ddp gives)")
    return DDPStrategy(start_method=start, find_unused_parameters=gan or strategy == "ddp_find_unused_parameters_true",
                       gradient_as_bucket_view=True)


def manual_optimisation_options(trainer_kwargs: dict, opts: dict) -> None:
    """Lightning's own clipping and accumulation do not run under manual optimisation (it raises): map them
    onto the module's ``grad_clip`` / ``accumulate``, saying so, or refuse what the module cannot do."""
    algo = trainer_kwargs.pop("gradient_clip_algorithm", None)
    clip = trainer_kwargs.pop("gradient_clip_val", None)
    acc = trainer_kwargs.pop("accumulate_grad_batches", None)
    if algo not in (None, "norm"):
        raise UserError(f"trainer.gradient_clip_algorithm={algo}: vaetrain clips by norm only; set module.grad_clip "
                        f"(max gradient norm) instead")
    if clip is not None:
        opts["grad_clip"] = float(clip) or None
        print(f"vaetrain train: trainer.gradient_clip_val={clip} applied as module.grad_clip", flush=True)
    if acc not in (None, 1):
        opts["accumulate"] = int(acc)
        print(f"vaetrain train: trainer.accumulate_grad_batches={acc} applied as module.accumulate", flush=True)


def export_model(model: nn.Module, out_dir: Path, formats: list[str] | tuple[str, ...],
                 info: ExportInfo | None = None) -> dict[str, str]:
    """Write ``model`` (the EMA student) in each format it supports; returns format -> path (or skip reason)."""
    model = model.float().eval()
    if not isinstance(model, Autoencoder):
        # interposers and other latent->latent nets: vaetrain's own safetensors (load_autoencoder reads it back)
        return {"safetensors": str(save_autoencoder(model, out_dir, format="safetensors", info=info))}
    out: dict[str, str] = {}
    for fmt in formats:
        try:
            out[fmt] = str(save_autoencoder(model, out_dir / fmt, format=fmt, info=info))
        except (CheckpointError, ValueError, NotImplementedError) as e:
            out[fmt] = f"skipped: {' '.join(str(e).split())[:200]}"
    return out


def train(
    student: nn.Module,
    data,
    teacher: nn.Module | None = None,
    teacher_b: nn.Module | None = None,
    loss: Mapping[str, nn.Module | None] | None = None,
    discriminator: nn.Module | None = None,
    mode: str = "autoencode",
    optimizer: Callable | None = None,
    d_optimizer: Callable | None = None,
    module: Mapping[str, Any] | None = None,
    trainer: Mapping[str, Any] | None = None,
    logger: Mapping[str, Any] | None = None,
    callbacks: Mapping[str, Any] | None = None,
    run_dir: str = "runs/default",
    seed: int = 0,
    resume: str | None = None,
    export: list[str] | tuple[str, ...] | None = ("original", "diffusers"),
    export_fp16_audit: list[int] | None = None,
    config: dict | None = None,
) -> dict[str, Any]:
    """Train and return where everything went: ``{"run_dir", "checkpoint", "exports", "logs", "images", ...}``.

    Argument names are the config groups of ``conf/train.yaml``: ``data`` is the LightningDataModule,
    ``loss`` a dict name -> ``LossTerm`` (``None`` or weight 0 disables one), ``discriminator`` a
    ``vaetrain.losses.Adversarial`` (or None), ``module`` the keyword options of ``VAETrainModule``,
    ``trainer`` Lightning ``Trainer`` kwargs, ``logger`` / ``callbacks`` dicts of objects or factories
    taking ``save_dir`` / ``run_dir``. ``resume``: None, "auto" or a checkpoint / run folder.
    """
    datamodule, losses, adversarial = data, loss, discriminator
    # expected with this design (frozen teacher/LPIPS/EMA in eval; checkpoints after the manual step)
    for msg in (".*module\\(s\\) in eval mode.*", ".*ModelCheckpoint with manual optimization.*",
                ".*overridden `on_after_batch_transfer`.*"):
        warnings.filterwarnings("ignore", message=msg)

    run_dir = _resolve_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True, verbose=False)
    trainer_kwargs = dict(trainer or {})
    check_call(L.Trainer, trainer_kwargs, "trainer")  # a typo or a wrong type: one line naming the key
    max_steps = int(trainer_kwargs.get("max_steps", -1))
    opts = dict(module or {})
    manual_optimisation_options(trainer_kwargs, opts)
    if opts.get("total_steps") is None and max_steps > 0:
        opts["total_steps"] = max_steps
    if isinstance(losses, (list, tuple)):
        losses = {getattr(t, "name", type(t).__name__.lower()): t for t in losses}
    if isinstance(losses, Mapping) and "_target_" in losses:
        raise SystemExit("vaetrain train: `loss` must be a dict name -> term (e.g. loss: {mse: {...}})")
    # an experiment may set e.g. loss.lpips.weight while the user removed the term (~loss@loss.lpips): what
    # is left is a plain dict of settings, not a term; the removal wins
    leftovers = {k: v for k, v in (losses or {}).items() if isinstance(v, Mapping)}
    if isinstance(adversarial, Mapping):
        leftovers["discriminator"], adversarial = adversarial, None
    for name, rest in leftovers.items():
        print(f"vaetrain train: {name} was removed; ignoring its leftover settings {dict(rest)}", flush=True)
    losses = {k: v for k, v in (losses or {}).items() if k not in leftovers}
    # data.latent_cache: the teacher's encoder runs once per cached sample instead of once per step
    datamodule = ensure_latent_cache(datamodule, teacher, teacher_b, run_dir)
    try:
        pl_module = VAETrainModule(student, teacher=teacher, teacher_b=teacher_b, losses=losses,
                                   adversarial=adversarial, mode=mode, optimizer=optimizer, d_optimizer=d_optimizer,
                                   seed=seed, **opts)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"vaetrain train: {' '.join(str(e).split())}") from None
    pl_module.config = config
    if hasattr(datamodule, "expect_teacher") and getattr(datamodule, "source", None) == "cached" and teacher is not None:
        datamodule.expect_teacher(teacher, teacher_b)

    ckpt_path = find_resume(resume, run_dir)
    resume_at = checkpoint_position(ckpt_path)[1] if ckpt_path else None
    loggers = [lg for lg in (_build(v, run_dir, resume_at) for v in (logger or {}).values()) if lg is not None]
    cbs = [cb for cb in (_build(v, run_dir) for v in (callbacks or {}).values()) if cb is not None]
    if any(isinstance(cb, Preemption) for cb in cbs):
        shield_loader_workers(datamodule)
    trainer_kwargs["strategy"] = resolve_strategy(trainer_kwargs, adversarial is not None,
                                                 int(opts.get("accumulate", 1) or 1))
    trainer_kwargs.setdefault("default_root_dir", str(run_dir))
    trainer_kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in cbs))
    plugins = list(trainer_kwargs.pop("plugins", None) or []) + [AtomicCheckpointIO()]
    pl_trainer = L.Trainer(logger=loggers or False, callbacks=cbs, plugins=plugins, **trainer_kwargs)

    if pl_trainer.is_global_zero:
        for p in remove_stale_fragments(run_dir / "checkpoints") + remove_stale_fragments(run_dir):
            print(f"vaetrain train: removed {p.name}, a fragment of a killed save", flush=True)
        if config is not None:
            atomic_write_json(run_dir / "config.json", config)
            for lg in loggers:  # wandb's run config, the CSV logger's hparams.yaml
                lg.log_hyperparams(config)
        print(f"vaetrain train: mode={mode}, run folder {run_dir}"
              + (f", resuming from {ckpt_path}" if ckpt_path else ""), flush=True)
    t0 = time.time()
    try:
        try:
            pl_trainer.fit(pl_module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except BaseException:
            _finish_wandb(loggers, exit_code=1)  # else the next run in this process would log into this one
            raise
    except NonFiniteLossError as e:
        raise SystemExit(f"vaetrain train: {e}") from None
    except RuntimeError as e:
        if ckpt_path and "loading state_dict" in str(e):
            raise SystemExit(f"vaetrain train: resume={ckpt_path} does not match the configured student/discriminator "
                             f"(resume with the run's own config, {run_dir / 'config.json'}): "
                             f"{' '.join(str(e).split())[:300]}") from None
        raise

    preempt = next((c for c in cbs if isinstance(c, Preemption)), None)
    preempted = preempt is not None and preempt.saved_to is not None
    ckpt_cb = next((c for c in cbs if isinstance(c, ModelCheckpoint)), None)
    last = Path(ckpt_cb.dirpath) / "last.ckpt" if ckpt_cb is not None and ckpt_cb.dirpath else None
    if last is not None and not preempted:
        pl_trainer.save_checkpoint(str(last), weights_only=False)  # the end state, whatever the cadence
    result: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(last) if last else None,
                              "steps": int(pl_trainer.global_step), "preempted": preempted,
                              "seconds": round(time.time() - t0, 1),
                              "nonfinite_skipped": pl_module.nonfinite_total, "world_size": pl_trainer.world_size,
                              "replica_checksums": getattr(pl_module, "replica_checksums", None),
                              "exports": {}, "logs": {}}
    if not pl_trainer.is_global_zero:
        return result
    metrics = {k: round(float(v), 4) for k, v in pl_trainer.callback_metrics.items() if k.startswith("val/")}
    if export and not preempted:
        # the model card and config.json: the latent space the student speaks (its teacher's), the training size
        final = pl_module.eval_model()
        # the exports then carry the fp16 verdict and headroom per size (diffusers force_upcast false when safe)
        audit = audit_fp16(final, size=list(export_fp16_audit), limit=1, mode="emulate", quiet=True,
                           device=str(next(final.parameters()).device),
                           out=str(run_dir / "fp16_audit.json")) if export_fp16_audit else None
        info = ExportInfo(latent_space=latent_space(teacher) if teacher is not None else None,
                          sample_size=getattr(getattr(datamodule, "spec", None), "image_size", None),
                          command=" ".join(sys.argv), config=config, metrics=metrics, fp16_audit=audit)
        result["exports"] = export_model(final, run_dir / "export", list(export), info)
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            result["logs"]["csv"] = str(Path(lg.log_dir) / "metrics.csv")
        elif isinstance(lg, WandbLogger):
            exp = lg.experiment
            result["logs"]["wandb"] = str(getattr(exp, "dir", None) and Path(exp.dir).parent)
    grid = next((c for c in cbs if isinstance(c, ImageGrid)), None)
    if grid is not None and grid.last is not None:
        result["images"] = str(grid.last.parent)
    result["val"] = metrics
    atomic_write_json(run_dir / "result.json", result)
    _finish_wandb(loggers, exit_code=0)
    _print_summary(result)
    return result


def _finish_wandb(loggers: list, exit_code: int) -> None:
    """Close this run's wandb run (Lightning leaves it open until the process exits)."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None) if isinstance(lg, WandbLogger) else None
        if run is not None and hasattr(run, "finish"):
            run.finish(exit_code=exit_code)


def _print_summary(r: dict) -> None:
    lines = [f"vaetrain train: {'pre-empted' if r['preempted'] else 'done'}: {r['steps']} steps in {r['seconds']} s"
             + (f", {r['nonfinite_skipped']} non-finite steps skipped" if r["nonfinite_skipped"] else ""),
             f"  run folder   {r['run_dir']}",
             f"  checkpoint   {r['checkpoint']}" + ("  (continue with resume=auto or resume=PATH)" if r["checkpoint"] else "")]
    for fmt, path in r["exports"].items():
        lines.append(f"  export       {fmt}: {path}")
    for kind, path in r["logs"].items():
        lines.append(f"  logs         {kind}: {path}")
    if r.get("images"):
        lines.append(f"  images       {r['images']}")
    if r.get("val"):
        lines.append("  validation   " + ", ".join(f"{k[4:]}={v}" for k, v in sorted(r["val"].items())))
    print("\n".join(lines), flush=True)
