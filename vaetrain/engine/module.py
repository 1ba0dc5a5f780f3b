"""The training engine: one LightningModule for every vaetrain recipe.

A frozen teacher, a student, weighted loss terms and an optional discriminator, trained with manual
optimisation so that each of the classic silent GAN-autoencoder bugs is impossible by construction:

- LPIPS and every other term run with gradients on (nothing here enters ``no_grad`` around a loss);
- the discriminator has its own optimizer that is stepped explicitly after the generator step;
- the discriminator sees detached fakes (detached here *and* inside ``Adversarial.d_loss``), and is
  frozen (``toggle_optimizer``) while the generator's loss flows through it;
- the discriminator, its optimizer and scheduler, the EMA and the RNG states are in every checkpoint.

Modes (what the student learns):

``autoencode``  image -> student encoder -> (sampled) latent -> student decoder; target is the
                teacher's round trip when a teacher is given, else the image itself.
``decoder``     teacher latents (from ``batch["latent"]`` or the teacher's encoder) -> student decoder;
                target is the teacher's decoding (or the image when the teacher has no decoder).
``encoder``     image -> student encoder -> latents, compared with the teacher's latents.
``latent``      teacher A latents -> student (an interposer ``forward(z)``) -> teacher B latents.

Steps: ``global_step`` counts generator updates (after ``accumulate`` micro-batches). A non-finite loss
or gradient norm on any rank skips the update on every rank (the flag is all-reduced; gradients are
computed and discarded so DDP's reducer stays in step), is counted (``train/nonfinite_skipped``), and
``max_nonfinite_in_a_row`` of them stop the run with :class:`NonFiniteLossError`.

Validation runs the EMA student and logs PSNR and SSIM (plus LPIPS with the run's own LPIPS term, if
any) against the photo (``*_gt``) and the teacher's output (``*_teacher``); the first batch's images
go to ``vaetrain.engine.callbacks.ImageGrid``.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.convention import to_diffusion, uint8_to_model
from vaetrain.formats import describe
from vaetrain.losses import LossInputs
from vaetrain.metrics import psnr, ssim

MODES = ("autoencode", "decoder", "encoder", "latent")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row: the run cannot recover by skipping steps."""


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.

    A callable object (not a closure) so that ``LambdaLR.state_dict`` records it in checkpoints.
    """

    def __init__(self, warmup: int = 0, total: int | None = None, min_ratio: float = 0.1):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.total or self.total <= self.warmup:
            return 1.0
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class EMA(nn.Module):
    """Exponential moving average of a model's weights (buffers copied), frozen and always in eval mode.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so that early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.train(False)

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1


def select_parameters(model: nn.Module, trainable: Sequence[str] | None = None,
                      frozen: Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad`` by glob patterns on parameter names; returns the trainable names.

    ``trainable`` (default: everything) is applied first, then ``frozen`` removes from it, so
    ``trainable=["decoder.*"]`` or ``frozen=["encoder.*", "quant_conv.*"]`` both give a decoder-only
    finetune that keeps the latent space.
    """
    names = [n for n, _ in model.named_parameters()]
    for pats, what in ((trainable, "trainable"), (frozen, "frozen")):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(f"{what} pattern {pat!r} matches no parameter of {type(model).__name__} "
                                 f"(names look like {names[:3]}); fix the pattern")
    keep = []
    for n, p in model.named_parameters():
        on = trainable is None or any(fnmatch.fnmatchcase(n, pat) for pat in trainable)
        on = on and not any(fnmatch.fnmatchcase(n, pat) for pat in (frozen or ()))
        p.requires_grad_(on)
        if on:
            keep.append(n)
    if not keep:
        raise ValueError(f"no trainable parameters left in {type(model).__name__} "
                         f"(trainable={list(trainable or [])}, frozen={list(frozen or [])})")
    return keep


# what each mode never runs, hence never trains, unless the user's patterns say otherwise
_UNUSED_BY_MODE = {
    "decoder": ["encoder.*", "quant_conv.*"],
    "encoder": ["decoder.*", "post_quant_conv.*"],
}


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"teacher_dtype={name!r}: use one of {sorted(table)}")
    return table[name]


class VAETrainModule(L.LightningModule):
    """Distil / finetune / train an autoencoder. All arguments are plain objects (see ``vaetrain.train``).

    Args:
        student: an ``Autoencoder`` (modes autoencode/decoder/encoder) or any ``nn.Module`` with
            ``forward(z) -> z'`` (mode latent).
        teacher, teacher_b: frozen ``Autoencoder``s; referenced, never registered as submodules, so
            they are neither optimised nor written into checkpoints.
        losses: name -> ``LossTerm``; a ``None`` value or weight 0 disables a term.
        adversarial: ``vaetrain.losses.Adversarial`` owning the discriminator, or ``None``.
        optimizer, d_optimizer: factories ``params -> Optimizer`` (Hydra ``_partial_: true``).
        trainable, frozen: glob patterns over the student's parameter names.
        target: what pixel terms reproduce in autoencode mode: "teacher" (its round trip) or "real".
        decode_latents: encoder/latent modes: also decode the predicted latents with the (frozen) teacher
            decoder so that pixel terms can be used.
        accumulate: micro-batches per optimizer step.
        grad_clip, d_grad_clip: max grad norm (None: off).
        warmup_steps, total_steps, min_lr_ratio: LR schedule in optimizer steps (``total_steps=None``:
            set by ``vaetrain.train`` to the trainer's ``max_steps``).
        ema_decay: None disables the EMA; otherwise validation and export use the EMA weights.
        max_nonfinite_in_a_row: consecutive skipped steps that stop the run.
        seed: seeds the posterior noise as a function of (seed, step, rank), so resume and DDP are exact.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Mapping[str, nn.Module | None] | None = None,
        adversarial: nn.Module | None = None,
        mode: str = "autoencode",
        teacher_b: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        d_optimizer: OptimizerFactory | None = None,
        trainable: Sequence[str] | None = None,
        frozen: Sequence[str] | None = None,
        teacher_dtype: str = "float32",
        target: str = "teacher",
        sample_posterior: bool = True,
        decode_latents: bool = False,
        accumulate: int = 1,
        grad_clip: float | None = 1.0,
        d_grad_clip: float | None = None,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = 0.999,
        max_nonfinite_in_a_row: int = 20,
        seed: int = 0,
        grid_images: int = 4,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        if target not in ("teacher", "real"):
            raise ValueError(f"target={target!r}: use 'teacher' or 'real'")
        if mode in ("decoder", "encoder") and teacher is None:
            raise ValueError(f"mode={mode} distils a teacher: set teacher=... (e.g. teacher=taef2)")
        if mode == "latent" and (teacher is None or teacher_b is None):
            raise ValueError("mode=latent maps teacher A's latents to teacher B's: set teacher=... and teacher_b=...")
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate}: must be >= 1")
        self.automatic_optimization = False
        self.mode, self.target, self.sample_posterior, self.decode_latents = mode, target, sample_posterior, decode_latents
        self.student = student
        # a plain dict attribute: nn.Module does not register what it holds, so the teachers stay out of
        # parameters(), state_dict() and the optimizers; their weights are referenced, not copied
        self._frozen: dict[str, nn.Module] = {}
        self.teacher_dtype = _dtype(teacher_dtype)
        for name, t in (("teacher", teacher), ("teacher_b", teacher_b)):
            if t is not None:
                self._frozen[name] = t.requires_grad_(False).eval()

        pats = frozen
        if trainable is None and frozen is None and mode in _UNUSED_BY_MODE:
            names = [n for n, _ in student.named_parameters()]
            pats = [p for p in _UNUSED_BY_MODE[mode] if any(fnmatch.fnmatchcase(n, p) for n in names)]
        self.trainable_names = select_parameters(student, trainable, pats)

        # the EMA is copied before loss terms attach hooks to the student, so it carries none
        self.ema = EMA(student, ema_decay) if ema_decay is not None else None
        terms = {k: v for k, v in (losses or {}).items() if v is not None and float(getattr(v, "weight", 1.0)) != 0.0}
        if not terms and adversarial is None:
            raise ValueError("no loss terms: enable at least one (e.g. loss=[mse]) or a discriminator")
        self.losses = nn.ModuleDict(terms)
        for term in self.losses.values():
            if hasattr(term, "attach"):
                term.attach(student)
        self.adversarial = adversarial
        if adversarial is not None and mode == "latent" and not decode_latents:
            raise ValueError("a discriminator judges images: mode=latent needs decode_latents=true")

        self._optimizer = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self._d_optimizer = d_optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4, betas=(0.5, 0.9)))
        self.accumulate, self.grad_clip, self.d_grad_clip = accumulate, grad_clip, d_grad_clip
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.max_nonfinite_in_a_row, self.seed, self.grid_images = max_nonfinite_in_a_row, seed, grid_images
        self.nonfinite_total = 0
        self._nonfinite_run = 0
        self._micro = 0
        self._window_bad = False
        self._frozen_modules = [m for m in student.modules()
                                if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        self.config: dict | None = None  # set by vaetrain.train; saved into checkpoints

    # ------------------------------------------------------------------ plumbing
    @property
    def teacher(self) -> nn.Module | None:
        return self._frozen.get("teacher")

    @property
    def teacher_b(self) -> nn.Module | None:
        return self._frozen.get("teacher_b")

    def train(self, mode: bool = True):
        super().train(mode)
        for t in getattr(self, "_frozen", {}).values():
            t.eval()
        # fully frozen student parts stay in eval so their normalisation statistics (e.g. FLUX.2's latent
        # BatchNorm) cannot drift: a frozen encoder must keep producing exactly the same latent space
        for m in getattr(self, "_frozen_modules", ()):
            m.eval()
        return self

    def _move_teachers(self) -> None:
        for t in self._frozen.values():
            t.to(device=self.device, dtype=self.teacher_dtype)

    def on_fit_start(self) -> None:
        self._move_teachers()

    def on_validation_start(self) -> None:
        self._move_teachers()

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
        # loss terms hold only frozen, config-built networks (LPIPS backbones): rebuilt from the config,
        # never checkpointed; ``load_state_dict`` accepts their absence
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for k in [k for k in sd if k.startswith(prefix + "losses.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        own = super().state_dict()
        state_dict = dict(state_dict)
        for k, v in own.items():
            if k.startswith("losses.") and k not in state_dict:
                state_dict[k] = v
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain lists/tensors only, so ``torch.load(weights_only=True)`` can read the checkpoint
        np_state = np.random.get_state()
        checkpoint["vaetrain"] = {
            "student": describe(self.student),  # vaetrain.formats.build() rebuilds it: `vaetrain convert RUN.ckpt`
            "config": self.config,
            "mode": self.mode,
            "nonfinite_total": self.nonfinite_total,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
                "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vaetrain") or {}
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
            v, internal, gauss = rng["python"]
            random.setstate((v, tuple(internal), gauss))

    def on_train_end(self) -> None:
        # a cheap guard against silently diverged DDP replicas: every rank's student checksum
        with torch.no_grad():
            total = sum((p.detach().double().sum() for p in self.student.parameters()), torch.zeros((), dtype=torch.float64))
        gathered = self.all_gather(total.to(self.device))
        self.replica_checksums = [float(v) for v in gathered.reshape(-1)]
        if len(set(self.replica_checksums)) > 1:
            raise RuntimeError(f"DDP replicas diverged: student checksums per rank {self.replica_checksums}")

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt_g = self._optimizer(params)
        total = self.total_steps
        sched = [torch.optim.lr_scheduler.LambdaLR(opt_g, WarmupCosine(self.warmup_steps, total, self.min_lr_ratio))]
        opts = [opt_g]
        if self.adversarial is not None:
            opt_d = self._d_optimizer([p for p in self.adversarial.parameters() if p.requires_grad])
            opts.append(opt_d)
            sched.append(torch.optim.lr_scheduler.LambdaLR(opt_d, WarmupCosine(self.warmup_steps, total, self.min_lr_ratio)))
        return opts, sched

    # ------------------------------------------------------------------ forward per mode
    @torch.no_grad()
    def _teacher_encode(self, t: nn.Module, x: Tensor) -> Tensor:
        return t.encode(x.to(self.teacher_dtype)).float()

    @torch.no_grad()
    def _teacher_decode(self, t: nn.Module, z: Tensor) -> Tensor:
        return t.decode(z.to(self.teacher_dtype)).float()

    def _noise(self, like: Tensor, salt: int = 0) -> Tensor:
        # a function of (seed, step, micro-batch, rank): identical on resume, different across DDP ranks
        g = torch.Generator(device=like.device)
        g.manual_seed(hash((self.seed, self.global_step, self._micro, self.global_rank, salt)) % (2**63))
        return torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)

    def forward_batch(self, batch: Mapping[str, Any], model: nn.Module | None = None, train: bool = True) -> LossInputs:
        """Run the student (or ``model``, e.g. the EMA copy) on a batch the way ``mode`` says."""
        model = self.student if model is None else model
        real = batch.get("image")
        t, tb = self.teacher, self.teacher_b
        z_target = z_pred = mean = logvar = cond = recon = target = None

        def teacher_latents(key: str, teach: nn.Module | None) -> Tensor:
            if isinstance(batch.get(key), Tensor):
                return batch[key]  # cached teacher posterior mean (diffusion space)
            if teach is None or not getattr(teach, "has_encoder", True):
                raise ValueError(f"mode={self.mode} needs batch['{key}'] (a latent cache) or a teacher with an encoder")
            return self._teacher_encode(teach, real)

        if self.mode == "autoencode":
            post = model.posterior(real) if hasattr(model, "posterior") else None
            if post is not None:
                mean, logvar = post
                z_raw = mean + torch.exp(0.5 * logvar) * self._noise(mean) if (train and self.sample_posterior) else mean
            else:
                z_raw = model.encode_raw(real)
            recon = model.decode_raw(z_raw)
            cond = to_diffusion(z_raw, model.scaling_factor, model.shift_factor)
            target = real
            if t is not None and self.target == "teacher":
                z_target = teacher_latents("latent", t)
                target = self._teacher_decode(t, z_target)
                # the student's latents (posterior mean) beside the teacher's: a latent term keeps the latent space
                # of finetunes that also train the encoder (fp16-fix, midblock-attention removal)
                z_pred = to_diffusion(mean if mean is not None else z_raw, model.scaling_factor, model.shift_factor)
        elif self.mode == "decoder":
            z_target = cond = teacher_latents("latent", t)
            recon = model.decode(z_target)
            target = self._teacher_decode(t, z_target) if getattr(t, "has_decoder", True) and self.target == "teacher" else real
            if recon.shape[-2:] != target.shape[-2:]:
                # a student that decodes below full resolution (Birch-san's MLP: one pixel per latent) learns the
                # images area-averaged to its own size
                target = F.interpolate(target, size=recon.shape[-2:], mode="area")  # (B, 3, h, w)
                real = F.interpolate(real, size=recon.shape[-2:], mode="area") if real is not None else None
        elif self.mode == "encoder":
            z_target = teacher_latents("latent", t)
            post = model.posterior(real) if hasattr(model, "posterior") else None
            if post is not None:
                mean, logvar = post
                z_pred = to_diffusion(mean, model.scaling_factor, model.shift_factor)
            else:
                z_pred = model.encode(real)
            if self.decode_latents:
                recon, target, cond = t.decode(z_pred.to(self.teacher_dtype)).float(), self._teacher_decode(t, z_target), z_pred
        else:  # latent
            z_a = teacher_latents("latent", t)
            z_target = teacher_latents("latent_b", tb)
            z_pred = model(z_a)
            if self.decode_latents:
                recon, target, cond = tb.decode(z_pred.to(self.teacher_dtype)).float(), self._teacher_decode(tb, z_target), z_pred
        return LossInputs(real=real, target=target, recon=recon, z_target=z_target, z_pred=z_pred,
                          mean=mean, logvar=logvar, cond=cond, step=int(self.global_step))

    def _last_layer(self) -> Tensor | None:
        fn = getattr(self.student, "last_layer", None)
        try:
            return fn() if fn is not None else None
        except NotImplementedError:
            return None

    # ------------------------------------------------------------------ training
    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(t, reduce_op="sum") > 0) if self._trainer is not None else flag

    @staticmethod
    def _grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
        norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(norms).norm() if norms else torch.zeros(())

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_g, opt_d = opts[0], (opts[1] if len(opts) > 1 else None)
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        step = int(self.global_step)
        boundary = (self._micro + 1) % self.accumulate == 0
        adv = self.adversarial
        adv_on = adv is not None and adv.active(step)
        logs: dict[str, Tensor | float] = {}

        # ---- G step: the discriminator is frozen (requires_grad False) while its verdict trains G
        if opt_d is not None:
            self.toggle_optimizer(opt_g)
        inp = self.forward_batch(batch)
        values = {name: term(inp) for name, term in self.losses.items()}
        rec = sum((float(term.weight) * values[name] for name, term in self.losses.items()),
                  torch.zeros((), device=self.device))
        total = rec
        if adv_on:
            g = adv.g_loss(inp)
            w = adv.g_weight(rec, g, self._last_layer(), step)  # 0 before start_step; adaptive when it can be
            total = rec + w * g
            values["adv_g"] = g
            logs["train/adv_weight"] = w.detach() if isinstance(w, Tensor) else w
        # the logged total is the optimised objective (backward sees it divided by ``accumulate``,
        # which averages the micro-batches)
        self.manual_backward(total / self.accumulate)
        self._window_bad |= not bool(torch.isfinite(total.detach()))
        if opt_d is not None:
            self.untoggle_optimizer(opt_g)

        # ---- D step: fakes detached here (and again inside d_loss); student params are frozen
        d_loss = None
        if adv_on and opt_d is not None:
            self.toggle_optimizer(opt_d)
            d_inp = replace(inp, recon=inp.recon.detach(), cond=None if inp.cond is None else inp.cond.detach())
            d_loss, d_logs = adv.d_loss(d_inp)
            self.manual_backward(d_loss / self.accumulate)
            self._window_bad |= not bool(torch.isfinite(d_loss.detach()))
            self.untoggle_optimizer(opt_d)
            logs.update({f"train/d_{k}": v.detach() if isinstance(v, Tensor) else v for k, v in d_logs.items()})
            logs["train/d_loss"] = d_loss.detach()

        self._micro += 1
        if boundary:
            g_params = [p for p in self.student.parameters() if p.requires_grad]
            gnorm = self._grad_norm(g_params)
            dnorm = self._grad_norm(adv.parameters()) if adv_on else torch.zeros(())
            bad = self._window_bad or not bool(torch.isfinite(gnorm)) or not bool(torch.isfinite(dnorm))
            # every rank takes the same decision, or DDP would hang at the next all-reduce
            if self._any_rank(bad):
                self.nonfinite_total += 1
                self._nonfinite_run += 1
                opt_g.zero_grad(set_to_none=True)
                if opt_d is not None:
                    opt_d.zero_grad(set_to_none=True)
                if self._nonfinite_run >= self.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"stopped at step {step}: {self._nonfinite_run} non-finite losses/gradients in a row "
                        f"(last total={float(total.detach()):.4g}); lower the learning rate, enable grad_clip, "
                        f"or check the data and the teacher's dtype")
            else:
                self._nonfinite_run = 0
                if self.grad_clip:
                    self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                scheds[0].step()
                if adv_on:
                    if self.d_grad_clip:
                        self.clip_gradients(opt_d, gradient_clip_val=self.d_grad_clip, gradient_clip_algorithm="norm")
                    # ``global_step`` counts generator updates only (max_steps, checkpoint cadence and the LR
                    # schedule are in G steps); Lightning would count every optimizer's step, so the D
                    # optimizer's progress hooks are silenced for this call
                    opt_d._on_before_step = opt_d._on_after_step = _noop
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    scheds[1].step()  # D's schedule counts D steps (from its start step on)
                if self.ema is not None:
                    self.ema.update(self.student)
            self._window_bad = False
            self._micro = 0
            logs["train/grad_norm"] = gnorm
            if adv_on:
                logs["train/d_grad_norm"] = dnorm
            logs["train/nonfinite_skipped"] = float(self.nonfinite_total)
            logs["train/lr"] = opt_g.param_groups[0]["lr"]

        logs.update({f"train/{k}": v.detach() for k, v in values.items()})
        logs["train/total"] = total.detach()
        with torch.no_grad():
            if inp.recon is not None and inp.target is not None:
                logs["train/psnr_target"] = psnr(inp.recon, inp.target).mean()
            if inp.recon is not None and inp.real is not None and inp.recon.shape == inp.real.shape:
                logs["train/psnr_real"] = psnr(inp.recon, inp.real).mean()
        skip_stats = getattr(getattr(self.trainer, "datamodule", None), "skip_stats", None)
        if callable(skip_stats):
            logs.update({f"data/{k}" if k == "samples" else f"data/skipped_{k}": float(v)
                         for k, v in (skip_stats() or {}).items()})
        self.log_dict({k: v for k, v in logs.items() if k != "train/total"}, on_step=True, on_epoch=False,
                      batch_size=_batch_size(batch))
        self.log("train/total", total.detach(), on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=_batch_size(batch))

    # ------------------------------------------------------------------ validation
    def eval_model(self) -> nn.Module:
        """The weights validation and export use: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.student

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict | None:
        inp = self.forward_batch(batch, model=self.eval_model(), train=False)
        n = _batch_size(batch)
        out: dict[str, Tensor] = {}
        lp = next((t for t in self.losses.values() if type(t).__name__ == "LPIPS"), None)
        real = inp.real
        if inp.recon is not None:
            teacher_img = inp.target if inp.target is not None and inp.target is not real else None
            refs = {"gt": real if real is not None and real.shape == inp.recon.shape else None, "teacher": teacher_img}
            for ref_name, ref in refs.items():
                if ref is None:
                    continue
                out[f"val/psnr_{ref_name}"] = psnr(inp.recon, ref).mean()
                out[f"val/ssim_{ref_name}"] = ssim(inp.recon, ref).mean()
                if lp is not None:
                    out[f"val/lpips_{ref_name}"] = lp(LossInputs(real=ref, target=ref, recon=inp.recon)).detach()
        if inp.z_pred is not None and inp.z_target is not None:
            out["val/latent_mse"] = (inp.z_pred - inp.z_target).pow(2).mean()
        if out:
            self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        if batch_idx == 0 and inp.recon is not None and real is not None:
            k = self.grid_images
            cols = [real[:k]]
            if inp.target is not None and inp.target is not real:
                cols.append(inp.target[:k])
            cols.append(inp.recon[:k])
            return {"grid": [c.detach().float().cpu() for c in cols]}
        return None


def _noop() -> None:
    pass


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("image", "latent"):
        v = batch.get(k)
        if isinstance(v, Tensor):
            return int(v.shape[0])
    return 1
