"""The training engine: one LightningModule for every vaetrain recipe, read top to bottom.

A frozen teacher, a student, weighted loss terms and an optional discriminator, trained with manual
optimisation so that the classic silent GAN-autoencoder bugs are impossible by construction: LPIPS and
every term run with gradients on; the discriminator (D) has its own optimizer, sees detached fakes and is
frozen while its verdict trains the generator (G), whose adversarial gradient reaches the encoder only
through the image (the latent condition is detached); the teacher runs in exactly ``teacher_dtype`` with
autocast off; D, EMA, both optimizers and schedules, the RNG states and the step guard are checkpointed.

Steps: ``global_step`` counts generator updates (after ``accumulate`` micro-batches); D's steps do not
count. A non-finite loss or gradient on any rank skips the update on every rank (one all-reduced
decision per step); under ``16-mixed`` that is the GradScaler's own skip, which also lowers its scale.
Gradient norms and clipping are computed in ``on_before_optimizer_step``, after Lightning unscaled the
gradients. The mode functions are in ``vaetrain.engine.modes``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vaetrain.convention import uint8_to_model
from vaetrain.engine import rng
from vaetrain.engine.ema import EMA
from vaetrain.engine.guards import StepGuard, all_finite, checksum, grads_of, total_norm
from vaetrain.engine.modes import MODES, STUDENT_DECODES, Setup, Teacher, dtype_of
from vaetrain.engine.params import default_frozen, fully_frozen_modules, select_parameters
from vaetrain.engine.schedule import warmup_cosine
from vaetrain.losses import LPIPS, LossInputs
from vaetrain.metrics import psnr, ssim

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


class VAETrainModule(L.LightningModule):
    """Distil / finetune / train an autoencoder. Arguments are plain objects (``vaetrain.commands.train`` builds
    them from the config): ``losses`` name -> ``LossTerm`` (None or weight 0 disables one), ``adversarial`` a
    ``vaetrain.losses.Adversarial``, ``optimizer``/``d_optimizer`` factories ``params -> Optimizer``; the other
    options are ``module.*`` in ``conf/train.yaml`` (documented there)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, losses: Mapping | None = None,
                 adversarial: nn.Module | None = None, mode: str = "autoencode", teacher_b: nn.Module | None = None,
                 optimizer: OptimizerFactory | None = None, d_optimizer: OptimizerFactory | None = None,
                 trainable: Sequence[str] | None = None, frozen: Sequence[str] | None = None,
                 teacher_dtype: str = "float32", target: str = "teacher", sample_posterior: bool = True,
                 decode_latents: bool = False, accumulate: int = 1, grad_clip: float | None = 1.0,
                 d_grad_clip: float | None = None, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, ema_decay: float | None = 0.999, max_nonfinite_in_a_row: int = 20,
                 seed: int = 0, grid_images: int = 4):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {tuple(MODES)}")
        if target not in ("teacher", "real"):
            raise ValueError(f"module.target={target!r}: use 'teacher' or 'real'")
        if mode in ("decoder", "encoder") and teacher is None:
            raise ValueError(f"mode={mode} distils a teacher: set teacher=... (e.g. teacher=taef2)")
        if mode == "latent" and (teacher is None or teacher_b is None):
            raise ValueError("mode=latent maps teacher A's latents to teacher B's: set teacher=... and teacher_b=...")
        if accumulate < 1:
            raise ValueError(f"module.accumulate={accumulate}: must be >= 1")
        if adversarial is not None and mode in ("encoder", "latent") and not decode_latents:
            raise ValueError(f"a discriminator judges images: mode={mode} needs module.decode_latents=true")
        self.automatic_optimization = False
        self.mode, self.forward_mode = mode, MODES[mode]
        self.student = student
        # plain attributes, not submodules: the teachers stay out of parameters(), state_dict() and optimizers
        dt = dtype_of(teacher_dtype)
        self.teachers = [Teacher(t, dt) for t in (teacher, teacher_b) if t is not None]
        self.setup_ = Setup(self.teachers[0] if teacher is not None else None,
                            self.teachers[-1] if teacher_b is not None else None,
                            target, sample_posterior, decode_latents, self._noise)
        pats = default_frozen(student, mode) if trainable is None and frozen is None else frozen
        self.trainable_names = select_parameters(student, trainable, pats)
        self._frozen_modules = fully_frozen_modules(student)
        # copied before loss terms attach hooks to the student, so the EMA carries none
        self.ema = EMA(student, ema_decay) if ema_decay is not None else None
        terms = {k: v for k, v in (losses or {}).items() if v is not None and float(getattr(v, "weight", 1.0)) != 0}
        if not terms and adversarial is None:
            raise ValueError("no loss terms: enable at least one (e.g. loss=[mse]) or a discriminator")
        self.losses = nn.ModuleDict(terms)
        for term in self.losses.values():
            if hasattr(term, "attach"):
                term.attach(student)
        self.adversarial = adversarial
        self._optimizer = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self._d_optimizer = d_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4, betas=(0.5, 0.9)))
        self.accumulate, self.grad_clip, self.d_grad_clip = accumulate, grad_clip, d_grad_clip
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.seed, self.grid_images = seed, grid_images
        self.guard = StepGuard(max_nonfinite_in_a_row)
        self._micro, self._window, self._norms = 0, [], {}
        self.config: dict | None = None  # the resolved run config, saved into checkpoints (set by the train command)
        self.description: dict | None = None  # how to rebuild the student (vaetrain.formats.describe)

    # ------------------------------------------------------------------ plumbing
    @property
    def teacher(self) -> nn.Module | None:
        return self.setup_.teacher.model if self.setup_.teacher is not None else None

    @property
    def at_step_boundary(self) -> bool:
        """No accumulation window is open (pre-emption checkpoints only here)."""
        return self._micro == 0

    @property
    def nonfinite_total(self) -> int:
        return self.guard.total

    def train(self, mode: bool = True):
        super().train(mode)
        for t in getattr(self, "teachers", ()):
            t.model.eval()
        for m in getattr(self, "_frozen_modules", ()):
            m.eval()
        return self

    def on_fit_start(self) -> None:
        for t in self.teachers:
            t.to(self.device)
        if self.adversarial is not None and self.adversarial.adaptive and self._last_layer() is None:
            rank_zero_info(f"vaetrain: mode={self.mode}: the student's decoder does not produce the judged image, so "
                           f"the adaptive GAN weight is off; the adversarial term uses discriminator.weight as is")

    def on_validation_start(self) -> None:
        for t in self.teachers:
            t.to(self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, Mapping):
            raise ValueError(f"batches must be dicts with an 'image' entry (got {type(batch).__name__})")
        batch = dict(batch)
        img = batch.get("image")
        if img is not None:
            batch["image"] = uint8_to_model(img) if img.dtype == torch.uint8 else img.float()
        for k in ("latent", "latent_b", "logvar"):
            if isinstance(batch.get(k), Tensor):
                batch[k] = batch[k].float()
        return batch

    def state_dict(self, *args, **kwargs):
        # loss terms hold only frozen networks built from the config (LPIPS backbones): never checkpointed
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return type(sd)((k, v) for k, v in sd.items() if not k.startswith(prefix + "losses."))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        state_dict.update({k: v for k, v in super().state_dict().items() if k.startswith("losses.")})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain lists/tensors only, so ``torch.load(weights_only=True)`` reads the checkpoint
        checkpoint["vaetrain"] = {"config": self.config, "mode": self.mode, "student": self.description,
                                  "guard": self.guard.state_dict(), "rng": rng.get_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vaetrain") or {}
        self.guard.load_state_dict(state.get("guard") or {"total": state.get("nonfinite_total", 0)})
        if state.get("rng"):
            rng.set_state(state["rng"])

    def on_train_end(self) -> None:
        # a cheap guard against silently diverged DDP replicas: every rank's student checksum
        gathered = self.all_gather(checksum(self.student).to(self.device))
        self.replica_checksums = [float(v) for v in gathered.reshape(-1)]
        if len(set(self.replica_checksums)) > 1:
            raise RuntimeError(f"DDP replicas diverged: student checksums per rank {self.replica_checksums}")

    def _noise(self, like: Tensor) -> Tensor:
        # a function of (seed, step, micro-batch, rank): identical on resume, different across DDP ranks
        g = torch.Generator(device=like.device)
        g.manual_seed(hash((self.seed, self.global_step, self._micro, self.global_rank)) % (2**63))
        return torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)

    def _last_layer(self) -> Tensor | None:
        """The student's final decoder weight when the judged image comes out of it (taming's adaptive weight)."""
        if self.mode not in STUDENT_DECODES or not getattr(self.student, "has_decoder", False):
            return None
        try:
            w = self.student.last_layer()
        except NotImplementedError:
            return None
        return w if w.requires_grad else None

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        opt_g = self._optimizer([p for p in self.student.parameters() if p.requires_grad])
        scheds = [warmup_cosine(opt_g, self.warmup_steps, self.total_steps, self.min_lr_ratio)]
        if self.adversarial is None:
            return [opt_g], scheds
        opt_d = self._d_optimizer([p for p in self.adversarial.parameters() if p.requires_grad])
        # D's schedule is in D steps, which start at its own start step: it spans the D steps the run will take
        d_start = self.adversarial.d_start_step
        d_total = None if self.total_steps is None else max(self.total_steps - d_start, 1)
        scheds.append(warmup_cosine(opt_d, self.warmup_steps, d_total, self.min_lr_ratio))
        return [opt_g, opt_d], scheds

    def _scaler(self):
        """Lightning's GradScaler under ``16-mixed``; None otherwise."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after unscaling (16-mixed): norms, clipping and their logs see the true gradients
        is_d = self.adversarial is not None and optimizer is self.trainer.optimizers[1]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = total_norm(grads_of(params), self.device)
        clip = self.d_grad_clip if is_d else self.grad_clip
        if clip:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)
        self._norms["train/d_grad_norm" if is_d else "train/grad_norm"] = norm

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        step, adv = self.global_step, self.adversarial
        boundary = (self._micro + 1) % self.accumulate == 0
        g_adv, d_on = adv is not None and adv.g_active(step), adv is not None and adv.d_active(step)
        logs: dict[str, Tensor | float] = {}

        # ---- G step: D frozen (toggle_model); between accumulation boundaries DDP does not all-reduce
        with opt_g.toggle_model(sync_grad=boundary):
            inp = self.forward_mode(self.student, batch, self.setup_, True)
            values = {name: term(inp) for name, term in self.losses.items()}
            total = sum((term.weight * values[name] for name, term in self.losses.items()),
                        torch.zeros((), device=self.device))
            if g_adv:
                # the condition is detached: G's adversarial gradient reaches the encoder only through the image
                values["adv_g"] = g = adv.g_loss(replace(inp, cond=_detached(inp.cond)))
                w = adv.g_weight(total, g, self._last_layer(), step)  # 0 before its start; adaptive when possible
                total = total + w * g
                logs["train/adv_weight"] = w
            # the logged total is the optimised objective; backward averages the micro-batches
            self.manual_backward(total / self.accumulate)
        self._window.append(total.detach())

        # ---- D step: fakes and condition detached; the student is frozen
        if d_on:
            with opt_d.toggle_model(sync_grad=boundary):
                d_loss, d_stats = adv.d_loss(replace(inp, recon=inp.recon.detach(), cond=_detached(inp.cond)))
                self.manual_backward(d_loss / self.accumulate)
            self._window.append(d_loss.detach())
            logs.update({f"train/d_{k}": v for k, v in d_stats.items()}, **{"train/d_loss": d_loss.detach()})

        self._micro += 1
        if boundary:
            self._micro = 0
            self._optimizer_step(opt_g, opt_d if d_on else None, step)
            logs.update(self._norms, **{"train/lr": opt_g.param_groups[0]["lr"],
                                         "train/nonfinite_skipped": float(self.guard.total)})
            if (step + 1) % self.trainer.log_every_n_steps == 0:
                logs.update(self._train_psnr(inp))  # uint8 PSNR only as often as it is logged
        logs.update({f"train/{k}": v.detach() for k, v in values.items()}, **{"train/total": total.detach()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=_batch_size(batch))

    def _optimizer_step(self, opt_g, opt_d, step: int) -> None:
        g_params = [p for p in self.student.parameters() if p.requires_grad]
        d_params = list(self.adversarial.parameters()) if opt_d is not None else []
        finite = all_finite(self._window + grads_of(g_params) + grads_of(d_params), self.device)
        self._window = []
        skip = self.guard.decide(finite, lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if not (skip and self._scaler() is None):
            # with a GradScaler a non-finite step is an fp16 overflow: the scaler skips it and lowers its scale
            opt_g.step()
            self.lr_schedulers_list()[0].step()
            if opt_d is not None:
                # through the strategy's public optimizer_step, so precision/scaler handling applies but Lightning's
                # manual loop does not count it: global_step (max_steps, checkpoint cadence, schedule) is G steps
                self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure, model=self)
                self.lr_schedulers_list()[1].step()
            if self.ema is not None and not skip:
                self.ema.update(self.student)
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        self.guard.check(step, "the last total loss or gradients were inf/NaN")

    def lr_schedulers_list(self) -> list:
        s = self.lr_schedulers()
        return s if isinstance(s, list) else [s]

    @torch.no_grad()
    def _train_psnr(self, inp: LossInputs) -> dict[str, Tensor]:
        out = {}
        if inp.recon is not None and inp.target is not None:
            out["train/psnr_target"] = psnr(inp.recon, inp.target).mean()
        if inp.recon is not None and inp.real is not None and inp.recon.shape == inp.real.shape:
            out["train/psnr_real"] = psnr(inp.recon, inp.real).mean()
        return out

    # ------------------------------------------------------------------ validation
    def eval_model(self) -> nn.Module:
        """The weights validation and export use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.student

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict | None:
        inp = self.forward_mode(self.eval_model(), batch, self.setup_, False)
        lp = next((t for t in self.losses.values() if isinstance(t, LPIPS)), None)
        refs = {"gt": inp.real, "teacher": inp.teacher}
        out: dict[str, Tensor] = {}
        for name, ref in refs.items():
            if inp.recon is None or ref is None or ref.shape != inp.recon.shape:
                continue
            out[f"val/psnr_{name}"] = psnr(inp.recon, ref).mean()
            out[f"val/ssim_{name}"] = ssim(inp.recon, ref).mean()
            if lp is not None:
                out[f"val/lpips_{name}"] = lp.distance(inp.recon, ref).mean()
        if inp.z_pred is not None and inp.z_target is not None:
            out["val/latent_mse"] = (inp.z_pred - inp.z_target).pow(2).mean()
        if out:
            self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True, batch_size=_batch_size(batch))
        if batch_idx != 0 or inp.recon is None:
            return None
        k = self.grid_images
        cols = {name: ref[:k] for name, ref in (("photo", inp.real), ("teacher", inp.teacher)) if ref is not None}
        cols["student"] = inp.recon[:k]
        return {"grid": {name: c.detach().float().cpu() for name, c in cols.items()}}


def _no_closure() -> None:
    return None


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("image", "latent"):
        v = batch.get(k)
        if isinstance(v, Tensor):
            return int(v.shape[0])
    return 1
