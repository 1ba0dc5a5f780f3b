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
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vaetrain.engine import optim, performance, rng, validation
from vaetrain.engine.ema import EMA
from vaetrain.engine.guards import StepGuard, all_finite, checksum
from vaetrain.engine.modes import MODES, STUDENT_DECODES, Setup, Teacher, check_mode, dtype_of, prepare_batch
from vaetrain.engine.params import default_frozen, fully_frozen_modules, select_parameters
from vaetrain.formats import describe
from vaetrain.losses import LPIPS, LossInputs
from vaetrain.metrics import psnr
from vaetrain.models.base import HasParams


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


class VAETrainModule(L.LightningModule):
    """Distil / finetune / train an autoencoder. Arguments are plain objects (``vaetrain.commands.train`` builds
    them from the config): ``losses`` name -> ``LossTerm`` (None or weight 0 disables one), ``adversarial`` a
    ``vaetrain.losses.Adversarial``, ``optimizer``/``d_optimizer`` factories ``params -> Optimizer``; the other
    options are ``module.*`` in ``conf/train.yaml`` (documented there)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, losses: Mapping | None = None,
                 adversarial: nn.Module | None = None, mode: str = "autoencode", teacher_b: nn.Module | None = None,
                 optimizer: optim.OptimizerFactory | None = None, d_optimizer: optim.OptimizerFactory | None = None,
                 trainable: Sequence[str] | None = None, frozen: Sequence[str] | None = None,
                 teacher_dtype: str = "float32", target: str = "teacher", sample_posterior: bool = True,
                 decode_latents: bool = False, accumulate: int = 1, grad_clip: float | None = 1.0,
                 d_grad_clip: float | None = None, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, ema_decay: float | None = 0.999, max_nonfinite_in_a_row: int = 20,
                 seed: int = 0, grid_images: int = 4, channels_last: bool = False, compile: str | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        check_mode(mode, target, teacher, teacher_b, adversarial, decode_latents, accumulate)
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
        if grad_checkpointing:
            if not hasattr(student, "set_gradient_checkpointing"):
                raise ValueError(f"module.grad_checkpointing: {type(student).__name__} does not support it (the KL "
                                 f"autoencoders do; tiny students need no checkpointing)")
            student.set_gradient_checkpointing(True)
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
        self._optimizer = optimizer or optim.default_g_optimizer
        self._d_optimizer = d_optimizer or optim.default_d_optimizer
        self.accumulate, self.grad_clip, self.d_grad_clip = accumulate, grad_clip, d_grad_clip
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.seed, self.grid_images = seed, grid_images
        self.channels_last, self.compile_backend = channels_last, compile
        self.guard = StepGuard(max_nonfinite_in_a_row)
        self._micro, self._window, self._norms, self._norms_before = 0, [], {}, {}
        self.wrappers: dict[str, nn.Module] = {}  # DDP wrappers of the parts, set by TwoWrapperDDPStrategy
        self.config: dict | None = None  # the resolved run config, saved into checkpoints (set by the train command)
        # how to rebuild the student from a checkpoint alone (`vaetrain convert RUN.ckpt`, `vaetrain eval`)
        self.description = describe(student) if isinstance(student, HasParams) else None

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

    def parallel_parts(self) -> dict[str, nn.Module]:
        """The networks that train, each in a DDP wrapper of its own under ``trainer.strategy=ddp_two_wrappers``."""
        return {"student": self.student, **({"adversarial": self.adversarial} if self.adversarial is not None else {})}

    def through(self, part: str, fn):
        """``fn(part)`` for a step's forward: through the part's own DDP wrapper when there is one (DDP prepares its
        reducer for the backward in forward)."""
        wrapper = self.wrappers.get(part)
        return fn(getattr(self, part)) if wrapper is None else wrapper(fn)

    def train(self, mode: bool = True):
        super().train(mode)
        for t in getattr(self, "teachers", ()):
            t.model.eval()
        for m in getattr(self, "_frozen_modules", ()):
            m.eval()
        return self

    def configure_model(self) -> None:
        # before the strategy wraps the networks in DDP, whose gradient buckets take the parameters' layout then
        # (converted later, every gradient would be copied into a bucket of the other layout)
        if self.channels_last:
            performance.to_channels_last([self.student, *(t.model for t in self.teachers),
                                          *([self.ema] if self.ema is not None else []),
                                          *([self.adversarial] if self.adversarial is not None else [])])

    def on_fit_start(self) -> None:
        for t in self.teachers:
            t.to(self.device)
        if self.compile_backend:
            performance.compile_in_place(performance.compiled_parts(self.student, self.adversarial, self.losses),
                                         self.compile_backend)
        if self.adversarial is not None and self.adversarial.adaptive and self._last_layer() is None:
            rank_zero_info(f"vaetrain: mode={self.mode}: the student's decoder does not produce the judged image, so "
                           f"the adaptive GAN weight is off; the adversarial term uses discriminator.weight as is")

    def on_validation_start(self) -> None:
        for t in self.teachers:
            t.to(self.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return prepare_batch(batch, self.channels_last)

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
        return optim.build(self.student, self.adversarial, self._optimizer, self._d_optimizer, self.warmup_steps,
                           self.total_steps, self.min_lr_ratio)

    def _scaler(self):
        """Lightning's GradScaler under ``16-mixed``; None otherwise."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _norm_key(self, optimizer: torch.optim.Optimizer) -> str:
        is_d = self.adversarial is not None and optimizer is self.trainer.optimizers[1]
        return "train/d_grad_norm" if is_d else "train/grad_norm"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after Lightning unscaled the gradients (16-mixed): clipping and the logged norms see the true values
        key = self._norm_key(optimizer)
        norm = self._norms_before.pop(key, None)
        if norm is None:
            norm = optim.grad_norm(optimizer, self.device)
        optim.clip(optimizer, self.d_grad_clip if key == "train/d_grad_norm" else self.grad_clip, norm)
        self._norms[key] = norm

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
            inp = self.through("student", lambda s: self.forward_mode(s, batch, self.setup_, True))
            inp.step = step  # the terms that act on a schedule (R1's cadence) read the global step
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
                d_inp = replace(inp, recon=inp.recon.detach(), cond=_detached(inp.cond))
                d_loss, d_stats = self.through("adversarial", lambda a: a.d_loss(d_inp))
                self.manual_backward(d_loss / self.accumulate)
            self._window.append(d_loss.detach())
            logs.update({f"train/d_{k}": v for k, v in d_stats.items()}, **{"train/d_loss": d_loss.detach()})

        self._micro += 1
        if boundary:
            self._micro = 0
            self._optimizer_step(opt_g, opt_d if d_on else None, step)
            logs.update(self._norms)
            if (step + 1) % self.trainer.log_every_n_steps == 0:
                # host numbers and the uint8 PSNR only as often as they are logged: each would cost a sync (or a
                # host-to-device copy) per step; the tensors above are read only when Lightning logs them
                logs.update(self._train_psnr(inp), **{"train/lr": opt_g.param_groups[0]["lr"],
                                                      "train/nonfinite_skipped": float(self.guard.total)})
        logs.update({f"train/{k}": v.detach() for k, v in values.items()}, **{"train/total": total.detach()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=_batch_size(batch))

    def _optimizer_step(self, opt_g, opt_d, step: int) -> None:
        opts = [o for o in (opt_g, opt_d) if o is not None]
        scaler = self._scaler()
        # the gradient norms, once: the finiteness test here, clipping and logging in on_before_optimizer_step
        # (recomputed there only under a GradScaler, whose unscaling comes in between)
        norms = {self._norm_key(o.optimizer): optim.grad_norm(o.optimizer, self.device) for o in opts}
        self._norms_before = norms if scaler is None else {}
        # several processes: DDP has already all-reduced the gradients, so their finiteness is the same on every
        # rank and the decision needs no collective of its own (a NaN loss anywhere gives NaN gradients everywhere)
        losses = self._window if self.trainer.world_size == 1 else []
        finite = all_finite([*norms.values(), *losses])
        self._window = []
        if scaler is None and self.trainer.world_size == 1 and all(optim.skips_on_device(o.optimizer) for o in opts):
            # no host sync at all: fused optimizers drop the update themselves where ``found_inf`` is set (what
            # GradScaler uses), and the EMA follows on the device; the step still counts
            self.guard.record(finite)
            with optim.found_inf(opts, ~finite):
                self._step(opt_g, opt_d)
            if self.ema is not None:
                self.ema.update(self.student, keep=finite)
            if (step + 1) % self.trainer.log_every_n_steps == 0:
                self.guard.check(step, "inf/NaN losses or gradients")
        else:
            skip = self.guard.decide(finite, lambda t: t)
            # with a GradScaler a non-finite step is an fp16 overflow: the scaler skips it and lowers its scale
            if not (skip and scaler is None):
                self._step(opt_g, opt_d)
                if self.ema is not None and not skip:
                    self.ema.update(self.student)
            self.guard.check(step, "inf/NaN losses or gradients")
        for o in opts:
            o.zero_grad(set_to_none=True)

    def _step(self, opt_g, opt_d) -> None:
        opt_g.step()  # counted: global_step (max_steps, checkpoint cadence, schedule) is G steps
        self.lr_schedulers_list()[0].step()
        if opt_d is not None:
            # through the strategy's public optimizer_step: precision/scaler handling applies, but Lightning's
            # manual loop counts only LightningOptimizer.step() calls, so D's steps are not global steps
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_no_closure, model=self)
            self.lr_schedulers_list()[1].step()

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
        lpips = next((t for t in self.losses.values() if isinstance(t, LPIPS)), None)
        out = validation.metrics(inp, lpips)
        if out:
            self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True, batch_size=_batch_size(batch))
        grid = validation.grid_columns(inp, self.grid_images) if batch_idx == 0 else None
        return {"grid": grid} if grid else None


def _no_closure() -> None:
    return None


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("image", "latent"):
        v = batch.get(k)
        if isinstance(v, Tensor):
            return int(v.shape[0])
    return 1
