"""The adversarial term: a discriminator with its own optimizer, taming's adaptive weight, and the
stabilisers TAESD-style training uses.

The discriminator loss detaches the fakes itself; the generator loss runs the discriminator with its
parameters' ``requires_grad`` switched off, so backpropagating a G loss can never leave gradients on
(and thus step) the discriminator, and it detaches the latent condition, so the generator's
adversarial gradient reaches an encoder only through the image.

Stabilisers (all off by default):
- D warm-up: the discriminator trains from ``d_start_step``, its verdict reaches G from ``start_step``;
- a linear ramp of the G weight over ``ramp_steps`` after ``start_step``;
- R1 (Mescheder et al. 2018) on the images D learns as real, lazily every ``r1_every`` steps (StyleGAN2);
- spectral norm: ``NLayerDiscriminator(spectral_norm=True)``;
- Seraena (madebyollin/seraena): a replay buffer of past fakes (:mod:`vaetrain.losses.replay`) and the
  discriminator-corrected target (:func:`corrected_target`) as the G objective.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.losses.base import LossInputs, fp32, need
from vaetrain.losses.replay import ReplayBuffer
from vaetrain.safe import UserError


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's ``||grad_last rec_loss|| / (||grad_last g_loss|| + 1e-4)``, clamped to [0, max_weight],
    detached, in fp32 (the norms overflow in fp16). A loss that does not reach ``last_layer``
    counts as a zero gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    with fp32(last_layer.device):
        n_rec = g_rec.float().norm() if g_rec is not None else last_layer.new_zeros((), dtype=torch.float32)
        n_adv = g_adv.float().norm() if g_adv is not None else last_layer.new_zeros((), dtype=torch.float32)
        return (n_rec / (n_adv + 1e-4)).clamp(0.0, max_weight).detach()


def r1_penalty(logits: Tensor, real: Tensor) -> Tensor:
    """R1: ``mean_i ||grad_{x_i} s_i||^2`` over the batch, ``s_i`` the mean patch logit of image ``i``.

    ``logits`` (B, 1, h, w) must come from ``real`` (B, 3, H, W) with ``real.requires_grad``. The
    graph is kept (``create_graph``) so that the penalty trains D. StyleGAN2 differentiates one
    logit per image; a PatchGAN has a map, and its mean (the quantity its loss averages) keeps the
    penalty independent of the resolution, where the map's sum would grow with the patch count.
    Exact for discriminators that treat images independently (GroupNorm or no norm; BatchNorm in
    training mode couples the images of a batch). Squares and sums in fp32."""
    score = logits.float().flatten(1).mean(1)  # (B,)
    (grad,) = torch.autograd.grad(score.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def corrected_target(discriminator, fake: Tensor, real: Tensor, scale: float = 2.0) -> Tensor:
    """Seraena's discriminator-corrected target for ``fake``, detached, fp32.

    Follows ``Seraena._make_correction`` (madebyollin/seraena, seraena.py): ``d`` = squared distance
    between D's output on the fake and on the paired real image (same latent), per image; the
    correction is ``-grad_fake d``, divided by its standard deviation over the whole batch
    (population std, + 1e-5), so that its size no longer depends on how confident D is; the target
    is ``fake + scale * correction``. Seraena's images are in [0, 1] with unit-std corrections:
    ``scale=2`` is the same step in our [-1, 1] images. We backpropagate the distance summed over
    the patch map, where Seraena averages it, and divide the gradient by the map size after: the
    same correction, but a half-precision backward through D stays clear of underflow.

    ``discriminator`` is a callable ``image -> logits`` (condition already bound); run it frozen and
    in eval mode (Seraena's ``disc.eval()``) so no D parameter is touched. Where we depart: the
    engine runs the G step first, so the correction uses D before this batch's D step (Seraena
    steps D on the batch, then corrects), and D's output is our one-channel logit map, not
    Seraena's stack of per-layer projections."""
    with torch.no_grad():
        ref = discriminator(real.detach()).float()
    with torch.enable_grad():  # the correction is a gradient even where the caller runs without autograd
        x = fake.detach().requires_grad_(True)
        dist = (discriminator(x).float() - ref).pow(2).flatten(1).sum(1)  # (B,) one distance per image
        (grad,) = torch.autograd.grad(dist.sum(), x)
    with fp32(fake.device):
        step = -grad.float() / ref[0].numel()  # the gradient of Seraena's per-image mean
        step = step / (step.std(correction=0) + 1e-5)
        return (fake.detach().float() + scale * step).detach()


@contextmanager
def evaluating(module: nn.Module):
    """``module.eval()`` for the block, restoring every submodule's own mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def frozen(module: nn.Module):
    """Switch off ``requires_grad`` of ``module``'s parameters for the block, restoring it after."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class Adversarial(nn.Module):
    """GAN term: owns the discriminator (give it its own optimizer: ``adversarial.discriminator.parameters()``).

    Called by the engine, per step:

    - ``d_active(step)``: the D step runs (from ``d_start_step``; ``None``: ``start_step``).
    - ``g_active(step)`` (alias ``active``): the G term enters the generator's loss (from ``start_step``).
      ``d_start_step < start_step`` is a D warm-up: D learns before its verdict reaches G.
    - ``g_loss(inp)``: generator term (unweighted). The discriminator runs inside :func:`frozen`,
      so the graph holds no edge to its parameters: the G loss's backward leaves their ``.grad``
      untouched (gradient still flows through D to the student's image). ``inp.cond`` is detached.
      With ``corrected_target`` it is Seraena's objective: the MSE to :func:`corrected_target`.
    - ``d_loss(inp)``: detaches real, fake and latent itself; returns ``(loss, stats)`` with the
      mean logits on real and fake, and ``r1`` on the steps that add the R1 penalty. With a replay
      buffer, part of the fake batch comes from past fakes (:class:`ReplayBuffer`).
    - ``g_weight(rec_loss, g_loss, last_layer, step)``: ``weight`` (times the adaptive weight when
      ``adaptive``) times :meth:`ramp`; 0 before ``start_step``.

    ``conditional``: the discriminator also sees ``inp.cond`` (the latent the student decoded), see
    :class:`vaetrain.models.patchgan.NLayerDiscriminator`. ``real`` picks the images the
    discriminator learns as real: ``"real"`` (ground truth) or ``"teacher"`` (teacher decodings).
    ``r1_weight`` is R1's gamma: ``gamma / 2 * E||grad D(real)||^2``, added every ``r1_every`` steps
    (counted from ``d_start_step``) times ``r1_every`` (StyleGAN2's lazy regularisation keeps the
    penalty's average strength). ``replay_size`` > 0 keeps that many past fakes, ``replay_fraction``
    of each D batch drawn from them.
    """

    LOSSES = ("hinge", "non_saturating", "lsgan")

    def __init__(self, discriminator: nn.Module, weight: float = 0.5, loss: str = "hinge", start_step: int = 0,
                 adaptive: bool = True, conditional: bool = False, max_adaptive: float = 1e4, real: str = "real",
                 d_start_step: int | None = None, ramp_steps: int = 0, r1_weight: float = 0.0, r1_every: int = 16,
                 replay_size: int = 0, replay_fraction: float = 0.5, corrected_target: bool = False,
                 correction_scale: float = 2.0):
        super().__init__()
        if loss not in self.LOSSES:
            raise UserError(f"Adversarial: loss={loss!r} must be one of {self.LOSSES}")
        if real not in ("real", "teacher"):
            raise UserError(f"Adversarial: real={real!r} must be 'real' or 'teacher'")
        cond_ch = getattr(discriminator, "cond_channels", None)
        if cond_ch is not None and bool(cond_ch) != conditional:
            raise UserError(f"Adversarial: conditional={conditional} but the discriminator has cond_channels="
                            f"{cond_ch}; use a conditional discriminator config (e.g. discriminator=patchgan_cond) "
                            f"with conditional=true, or neither")
        d_start_step = int(start_step) if d_start_step is None else int(d_start_step)
        if d_start_step > start_step:
            raise UserError(f"Adversarial: d_start_step={d_start_step} is after start_step={start_step}: the generator "
                            f"would follow an untrained discriminator; set d_start_step <= start_step (a D warm-up) "
                            f"or leave it null")
        if ramp_steps < 0 or r1_weight < 0 or r1_every < 1 or replay_size < 0 or correction_scale <= 0:
            raise UserError(f"Adversarial: need ramp_steps >= 0, r1_weight >= 0, r1_every >= 1, replay_size >= 0 and "
                            f"correction_scale > 0; got {ramp_steps}, {r1_weight}, {r1_every}, {replay_size}, "
                            f"{correction_scale}")
        self.discriminator = discriminator
        self.weight, self.loss, self.start_step = float(weight), loss, int(start_step)
        self.adaptive, self.conditional, self.max_adaptive, self.real = adaptive, conditional, float(max_adaptive), real
        self.d_start_step, self.ramp_steps = d_start_step, int(ramp_steps)
        self.r1_weight, self.r1_every = float(r1_weight), int(r1_every)
        self.corrected_target, self.correction_scale = bool(corrected_target), float(correction_scale)
        self.replay = ReplayBuffer(replay_size, replay_fraction) if replay_size else None
        self.name = "adversarial"

    # ---------------------------------------------------------------- schedule
    def d_active(self, step: int) -> bool:
        return step >= self.d_start_step

    def g_active(self, step: int) -> bool:
        return step >= self.start_step

    def active(self, step: int) -> bool:
        """Old name of :meth:`g_active`."""
        return self.g_active(step)

    def ramp(self, step: int) -> float:
        """0 before ``start_step``; then ``k / ramp_steps`` at the k-th G step (k = 1, 2, ...), 1 from the
        ``ramp_steps``-th on (1 at once when ``ramp_steps`` is 0)."""
        if not self.g_active(step):
            return 0.0
        if self.ramp_steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step + 1) / self.ramp_steps)

    def r1_step(self, step: int) -> bool:
        return self.r1_weight > 0 and self.d_active(step) and (step - self.d_start_step) % self.r1_every == 0

    # ---------------------------------------------------------------- losses
    def _logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        out = self.discriminator(x, cond) if self.conditional else self.discriminator(x)
        return out.float()

    def _cond(self, inp: LossInputs) -> Tensor | None:
        """The latent the discriminator sees, detached: a condition is given, not generated, so no
        generator gradient may flow back through it (into an encoder that produced it)."""
        if not self.conditional:
            return None
        return need(inp, "Adversarial(conditional)", "cond")[0].detach()

    def _real(self, inp: LossInputs, who: str) -> Tensor:
        return need(inp, who, "real" if self.real == "real" else "target")[0]

    def g_loss(self, inp: LossInputs) -> Tensor:
        (recon,) = need(inp, "Adversarial", "recon")
        cond = self._cond(inp)
        if self.corrected_target:
            real = self._real(inp, "Adversarial(corrected_target)")
            with frozen(self.discriminator), evaluating(self.discriminator):
                target = corrected_target(lambda x: self._logits(x, cond), recon, real, self.correction_scale)
            with fp32(recon.device):
                return F.mse_loss(recon.float(), target)
        with frozen(self.discriminator):
            fake = self._logits(recon, cond)
        with fp32(fake.device):
            if self.loss == "hinge":
                return -fake.mean()
            if self.loss == "non_saturating":
                return F.softplus(-fake).mean()
            return (fake - 1).pow(2).mean()

    def d_loss(self, inp: LossInputs) -> tuple[Tensor, dict]:
        (recon,) = need(inp, "Adversarial", "recon")
        real = self._real(inp, "Adversarial").detach()
        cond = self._cond(inp)
        fake, fake_cond = recon.detach(), cond
        if self.replay is not None:
            fake, fake_cond = self.replay.mix(fake, cond)
        r1_now = self.r1_step(inp.step)
        if r1_now:
            # the R1 pass runs in fp32 with autocast off: its double backward through half-precision
            # activations loses (fp16: underflows) the small input gradients it squares
            real = real.float().requires_grad_(True)
            with fp32(real.device):
                logits_real = self._logits(real, None if cond is None else cond.float())
        else:
            logits_real = self._logits(real, cond)
        logits_fake = self._logits(fake, fake_cond)
        with fp32(logits_real.device):
            if self.loss == "hinge":
                loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            elif self.loss == "non_saturating":
                loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
            else:
                loss = 0.5 * ((logits_real - 1).pow(2).mean() + logits_fake.pow(2).mean())
            stats = {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
            if r1_now:
                r1 = r1_penalty(logits_real, real)
                loss = loss + 0.5 * self.r1_weight * self.r1_every * r1
                stats["r1"] = r1.detach()
        return loss, stats

    def g_weight(self, rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None, step: int) -> Tensor:
        device = g_loss.device
        ramp = self.ramp(step)
        if ramp == 0.0:
            return torch.zeros((), device=device)
        if (self.adaptive and last_layer is not None and torch.is_grad_enabled()
                and rec_loss.requires_grad and g_loss.requires_grad):
            return adaptive_weight(rec_loss, g_loss, last_layer, self.max_adaptive) * (self.weight * ramp)
        return torch.full((), self.weight * ramp, device=device)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, loss={self.loss!r}, start_step={self.start_step}, "
                f"d_start_step={self.d_start_step}, ramp_steps={self.ramp_steps}, adaptive={self.adaptive}, "
                f"conditional={self.conditional}, real={self.real!r}, r1_weight={self.r1_weight}, "
                f"r1_every={self.r1_every}, corrected_target={self.corrected_target}")
