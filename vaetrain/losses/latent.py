"""Latent terms: the KL of the posterior, the latent MSE to the teacher, and the activation penalty."""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.losses.base import LossInputs, LossTerm, fp32, need


class KL(LossTerm):
    """KL(N(mean, exp(logvar)) || N(0, 1)) of the student's posterior, summed over the latent's C, h, w.

    ``reduction`` says what that sum is divided by:

    - ``"image_mean"`` (default): the batch size times the IMAGE's element count (3 H W), the units of
      vaetrain's pixel terms, which are means over every image element. latent-diffusion / sgm sum their
      pixel NLL over C, H, W and divide only by the batch, like their KL: dividing both by 3 H W keeps their
      ratio, so a weight copied from them (kl-f8: 1e-6) pulls exactly as hard here as it did there.
    - ``"sum"``: the batch size only (latent-diffusion's own number). Next to mean pixel losses its weight
      is 3 H W times stronger (196,608x at 256 px): use it only with summed pixel terms.
    """

    name = "kl"
    REDUCTIONS = ("image_mean", "sum")

    def __init__(self, weight: float = 1.0, reduction: str = "image_mean", name: str | None = None):
        super().__init__(weight, name)
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"KL: reduction={reduction!r} must be one of {self.REDUCTIONS}")
        self.reduction = reduction

    def forward(self, inp: LossInputs) -> Tensor:
        mean, logvar = need(inp, "KL", "mean", "logvar")
        with fp32(mean.device):
            mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C, h, w)
            per_image = kl.flatten(1).sum(1)  # (B,)
            if self.reduction == "image_mean":
                image = next((t for t in (inp.recon, inp.real) if t is not None), None)
                if image is None:
                    raise ValueError("KL: reduction='image_mean' needs the image (LossInputs.recon or .real) for its "
                                     "element count; use reduction='sum'")
                per_image = per_image / image[0].numel()
            return per_image.mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"


class LatentMSE(LossTerm):
    """MSE between the student's latents and the teacher's (diffusion space)."""

    name = "latent_mse"

    def forward(self, inp: LossInputs) -> Tensor:
        z_pred, z_target = need(inp, "LatentMSE", "z_pred", "z_target")
        if z_pred.shape != z_target.shape:
            raise ValueError(f"LatentMSE: student latents {tuple(z_pred.shape)} and teacher latents "
                             f"{tuple(z_target.shape)} differ in shape")
        return F.mse_loss(z_pred.float(), z_target.float())


class ActivationPenalty(LossTerm):
    """Penalise large activations inside the student, to make it safe in fp16 (fp16-fix style).

    ``attach(student)`` hooks every module whose qualified name matches one of ``patterns``
    (fnmatch globs, e.g. ``"decoder.*.conv2"``). Each hooked output adds, scale-free in units of
    ``threshold``:

    - ``"hinge_sq"``: ``mean(relu(|a| / threshold - 1) ** 2)``: zero while every activation is
      below ``threshold``, smooth above it;
    - ``"logmax"``: ``relu(log(max |a| / threshold))``: only the largest value counts.

    ``forward`` returns the mean over the hooked outputs seen since the last call and resets.
    Outputs produced with grad disabled (validation, teacher passes) are not collected. The last
    per-module maxima are in ``self.maxima`` (for logging).
    """

    name = "activation"

    def __init__(self, weight: float = 1.0, patterns: list[str] | tuple[str, ...] = ("*",),
                 threshold: float = 1000.0, mode: str = "hinge_sq", name: str | None = None):
        super().__init__(weight, name)
        if mode not in ("hinge_sq", "logmax"):
            raise ValueError(f"ActivationPenalty: mode={mode!r} must be 'hinge_sq' or 'logmax'")
        if threshold <= 0:
            raise ValueError(f"ActivationPenalty: threshold must be > 0, got {threshold}")
        self.patterns, self.threshold, self.mode = list(patterns), float(threshold), mode
        self._handles: list = []
        self._terms: list[Tensor] = []
        self.maxima: dict[str, float] = {}
        self.hooked: list[str] = []

    def attach(self, student: nn.Module) -> list[str]:
        """Hook the matching modules of ``student``; returns their names. Re-attaching replaces old hooks."""
        self.remove_hooks()
        names = [n for n, _ in student.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]
        if not names:
            raise ValueError(f"ActivationPenalty: no module of {type(student).__name__} matches {self.patterns}; "
                             f"names look like {[n for n, _ in student.named_modules() if n][:4]}")
        modules = dict(student.named_modules())
        for n in names:
            self._handles.append(modules[n].register_forward_hook(self._hook(n, modules[n])))
        self.hooked = names
        return names

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.hooked = [], []

    def _hook(self, module_name: str, owner: nn.Module):
        def hook(module, _args, output):
            # a deepcopy of the student (an EMA copy) carries this hook along: only the original counts
            if module is not owner or not torch.is_grad_enabled():
                return
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for a in outs:
                if isinstance(a, Tensor) and a.is_floating_point():
                    with fp32(a.device):
                        mag = a.float().abs()
                        if self.mode == "hinge_sq":
                            term = F.relu(mag / self.threshold - 1).pow(2).mean()
                            peak = mag.detach().max()
                        else:
                            peak = mag.max()
                            term = F.relu(torch.log(peak.clamp_min(1e-30) / self.threshold))
                    self._terms.append(term)
                    self.maxima[module_name] = float(peak.detach())
        return hook

    def forward(self, inp: LossInputs) -> Tensor:
        if not self._handles:
            raise RuntimeError("ActivationPenalty: call attach(student) before computing the loss")
        terms, self._terms = self._terms, []
        if not terms:
            ref = next((t for t in (inp.recon, inp.z_pred, inp.real) if t is not None), None)
            return torch.zeros((), device=ref.device if ref is not None else None)
        return torch.stack(terms).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, patterns={self.patterns}, threshold={self.threshold}, mode={self.mode!r}"
