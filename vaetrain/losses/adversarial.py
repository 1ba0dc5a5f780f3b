"""The adversarial term: a discriminator with its own optimizer, and taming's adaptive weight.

The discriminator loss detaches the fakes itself; the generator loss runs the discriminator with its
parameters' ``requires_grad`` switched off, so backpropagating a G loss can never leave gradients on
(and thus step) the discriminator.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.losses.base import LossInputs, fp32, need


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

    - ``g_loss(inp)``: generator term (unweighted). The discriminator runs inside :func:`frozen`,
      so the graph holds no edge to its parameters: the G loss's backward leaves their ``.grad``
      untouched (gradient still flows through D to the student's image).
    - ``d_loss(inp)``: detaches real, fake and latent itself; returns ``(loss, stats)`` with the
      mean logits on real and fake.
    - ``g_weight(rec_loss, g_loss, last_layer, step)``: ``weight`` (times the adaptive weight when
      ``adaptive``), 0 before ``start_step``.

    ``conditional``: the discriminator also sees ``inp.cond`` (the latent the student decoded), see
    :class:`vaetrain.models.patchgan.NLayerDiscriminator`. ``real`` picks the images the
    discriminator learns as real: ``"real"`` (ground truth) or ``"teacher"`` (teacher decodings).
    """

    LOSSES = ("hinge", "non_saturating", "lsgan")

    def __init__(self, discriminator: nn.Module, weight: float = 0.5, loss: str = "hinge", start_step: int = 0,
                 adaptive: bool = True, conditional: bool = False, max_adaptive: float = 1e4, real: str = "real"):
        super().__init__()
        if loss not in self.LOSSES:
            raise ValueError(f"Adversarial: loss={loss!r} must be one of {self.LOSSES}")
        if real not in ("real", "teacher"):
            raise ValueError(f"Adversarial: real={real!r} must be 'real' or 'teacher'")
        cond_ch = getattr(discriminator, "cond_channels", None)
        if cond_ch is not None and bool(cond_ch) != conditional:
            raise ValueError(f"Adversarial: conditional={conditional} but the discriminator has cond_channels="
                             f"{cond_ch}; use a conditional discriminator config (e.g. discriminator=patchgan_cond) "
                             f"with conditional=true, or neither")
        self.discriminator = discriminator
        self.weight, self.loss, self.start_step = float(weight), loss, int(start_step)
        self.adaptive, self.conditional, self.max_adaptive, self.real = adaptive, conditional, float(max_adaptive), real
        self.name = "adversarial"

    @property
    def d_start_step(self) -> int:
        return self.start_step

    def d_active(self, step: int) -> bool:
        """The D step runs."""
        return step >= self.d_start_step

    def g_active(self, step: int) -> bool:
        """The adversarial term enters the generator's loss."""
        return step >= self.start_step

    active = g_active

    def _logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        out = self.discriminator(x, cond) if self.conditional else self.discriminator(x)
        return out.float()

    def _cond(self, inp: LossInputs) -> Tensor | None:
        if not self.conditional:
            return None
        return need(inp, "Adversarial(conditional)", "cond")[0]

    def g_loss(self, inp: LossInputs) -> Tensor:
        (recon,) = need(inp, "Adversarial", "recon")
        cond = self._cond(inp)
        with frozen(self.discriminator):
            fake = self._logits(recon, cond)
        with fp32(fake.device):
            if self.loss == "hinge":
                return -fake.mean()
            if self.loss == "non_saturating":
                return F.softplus(-fake).mean()
            return (fake - 1).pow(2).mean()

    def d_loss(self, inp: LossInputs) -> tuple[Tensor, dict]:
        recon, real = need(inp, "Adversarial", "recon", "real" if self.real == "real" else "target")
        cond = self._cond(inp)
        cond = cond.detach() if cond is not None else None
        logits_real = self._logits(real.detach(), cond)
        logits_fake = self._logits(recon.detach(), cond)
        with fp32(logits_real.device):
            if self.loss == "hinge":
                loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            elif self.loss == "non_saturating":
                loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
            else:
                loss = 0.5 * ((logits_real - 1).pow(2).mean() + logits_fake.pow(2).mean())
        return loss, {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}

    def g_weight(self, rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None, step: int) -> Tensor:
        device = g_loss.device
        if not self.active(step):
            return torch.zeros((), device=device)
        if (self.adaptive and last_layer is not None and torch.is_grad_enabled()
                and rec_loss.requires_grad and g_loss.requires_grad):
            return adaptive_weight(rec_loss, g_loss, last_layer, self.max_adaptive) * self.weight
        return torch.full((), self.weight, device=device)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, loss={self.loss!r}, start_step={self.start_step}, adaptive={self.adaptive}, "
                f"conditional={self.conditional}, real={self.real!r}")
