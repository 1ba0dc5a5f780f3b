"""Loss terms for distilling and finetuning autoencoders.

Every term is a small ``nn.Module`` with a ``weight`` that returns its UNWEIGHTED scalar from one
:class:`LossInputs`; the training module multiplies by ``weight`` and logs each term. The
adversarial term is different (it owns a discriminator that has its own optimizer) and lives in
:class:`Adversarial`.

Guards against the silent failures users of other VAE trainers report (REFERENCE.md section 5):

- LPIPS is never run under ``no_grad``: its net is frozen (``requires_grad=False``, always eval)
  but the graph to the student's image is kept, so the student gets its gradient.
- Everything numerically delicate runs in fp32 with autocast off: LPIPS' feature normalisation,
  the KL, the adaptive GAN weight, the discriminator losses.
- The discriminator loss detaches the fakes itself; the generator loss runs the discriminator with
  its parameters' ``requires_grad`` switched off, so backpropagating a G loss can never leave
  gradients on (and thus step) the discriminator.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.formats.io import CheckpointError, read_state_dict

__all__ = ["LossInputs", "LossTerm", "MSE", "L1", "LPIPS", "KL", "LatentMSE", "ActivationPenalty",
           "Adversarial", "adaptive_weight"]


@dataclass
class LossInputs:
    """Everything a term may look at, for one generator step. Images (B, 3, H, W) in [-1, 1]."""

    real: Tensor | None  # ground-truth image
    target: Tensor | None  # what the student should reproduce (teacher decode or real)
    recon: Tensor | None  # the student's output image
    z_target: Tensor | None = None  # teacher latents (diffusion space)
    z_pred: Tensor | None = None  # student latents (encoder distillation / interposer output)
    mean: Tensor | None = None  # student raw posterior mean (KL)
    logvar: Tensor | None = None  # student raw posterior logvar (KL)
    cond: Tensor | None = None  # latents the decoder was conditioned on (conditional discriminator)
    step: int = 0


def _need(inp: LossInputs, who: str, *fields: str) -> list[Tensor]:
    missing = [f for f in fields if getattr(inp, f) is None]
    if missing:
        raise ValueError(f"{who}: LossInputs.{', '.join(missing)} is None; this term needs "
                         f"{', '.join(fields)} (disable the term or train a mode that provides them)")
    return [getattr(inp, f) for f in fields]


@contextmanager
def _fp32(device: torch.device):
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class LossTerm(nn.Module):
    """Base: ``forward(inp) -> unweighted scalar``; ``weight`` is applied by the caller."""

    name: str = "loss"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__()
        self.weight = float(weight)
        if name is not None:
            self.name = name

    def forward(self, inp: LossInputs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class _ImageTerm(LossTerm):
    """A term comparing the student's image with the teacher's decoding or the real image."""

    def __init__(self, weight: float = 1.0, target: str = "teacher", name: str | None = None):
        super().__init__(weight, name)
        if target not in ("teacher", "real"):
            raise ValueError(f"{type(self).__name__}: target={target!r} must be 'teacher' or 'real'")
        self.target = target

    def pair(self, inp: LossInputs) -> tuple[Tensor, Tensor]:
        recon, ref = _need(inp, type(self).__name__, "recon", "target" if self.target == "teacher" else "real")
        if recon.shape != ref.shape:
            raise ValueError(f"{type(self).__name__}: student image {tuple(recon.shape)} and "
                             f"{self.target} image {tuple(ref.shape)} differ in shape")
        return recon, ref

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target={self.target!r}"


class MSE(_ImageTerm):
    name = "mse"

    def forward(self, inp: LossInputs) -> Tensor:
        recon, ref = self.pair(inp)
        return F.mse_loss(recon.float(), ref.float())


class L1(_ImageTerm):
    name = "l1"

    def forward(self, inp: LossInputs) -> Tensor:
        recon, ref = self.pair(inp)
        return F.l1_loss(recon.float(), ref.float())


# --- LPIPS ---------------------------------------------------------------------------------------

# Caffe models take 0..255 RGB minus the ImageNet mean pixel (no std division).
_CAFFE_MEAN = (123.68, 116.779, 103.939)


def _normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise over channels. lpips' own ``x / (sqrt(sum x^2) + eps)`` has an infinite
    gradient (-> NaN) where a feature vector is exactly zero, which ReLU features often are;
    ``rsqrt(sum + eps)`` has the same value elsewhere and a finite gradient."""
    return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + eps)


class LPIPS(_ImageTerm):
    """Perceptual distance with the ``lpips`` package's network (Zhang et al. 2018).

    ``mode``:

    - ``"lpips"``: official LPIPS. Backbone from ``backbone_weights`` (a torchvision ``alexnet`` /
      ``vgg16`` / ``squeezenet1_1`` state dict, whole model or ``.features`` only) or, with
      ``pretrained``, torchvision's ImageNet download/cache. Linear layers from ``lpips_weights`` or,
      with ``pretrained``, the v0.1 weights shipped inside the lpips package (no download).
    - ``"caffe_squeeze"``: "LPIPS-like": ``backbone_weights`` is the Caffe SqueezeNet 1.1 features
      file (torchvision ``squeezenet1_1().features`` layout), fed Caffe-style input (0..255 RGB minus
      the mean pixel). Without ``lpips_weights`` every layer gets unit weights (lpips' ``lpips=False``
      baseline: summed squared distance of channel-normalised features). Not comparable with
      published LPIPS numbers; a real perceptual loss nonetheless.
    - ``"random"``: random backbone, unit weights. For plumbing tests only: NOT a perceptual metric.

    The resulting setup is named in ``self.mode_name`` (log it next to any LPIPS number).
    The net is frozen and always in eval mode; inputs in [-1, 1]; computed in fp32.
    """

    name = "lpips"

    def __init__(self, weight: float = 1.0, target: str = "teacher", net: str = "alex", pretrained: bool = True,
                 backbone_weights: str | None = None, lpips_weights: str | None = None, mode: str = "lpips",
                 name: str | None = None):
        super().__init__(weight, target, name)
        import lpips as lpips_pkg

        if net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"LPIPS: net={net!r} must be 'alex', 'vgg' or 'squeeze'")
        if mode not in ("lpips", "caffe_squeeze", "random"):
            raise ValueError(f"LPIPS: mode={mode!r} must be 'lpips', 'caffe_squeeze' or 'random'")
        if mode == "caffe_squeeze":
            if net != "squeeze":
                raise ValueError(f"LPIPS: mode='caffe_squeeze' needs net='squeeze', got net={net!r}")
            if backbone_weights is None:
                raise ValueError("LPIPS: mode='caffe_squeeze' needs backbone_weights=PATH to the Caffe SqueezeNet "
                                 "features (e.g. ${assets:weights/squeezenet1_1_caffe_features.pth})")
        if mode == "random" and (backbone_weights or lpips_weights):
            raise ValueError("LPIPS: mode='random' takes no weight files; use mode='lpips' or 'caffe_squeeze'")
        self.net_name, self.mode = net, mode

        if mode == "lpips" and lpips_weights is None and pretrained:
            lpips_weights = str(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / f"{net}.pth")
        if mode == "lpips" and lpips_weights is None:
            raise ValueError("LPIPS: mode='lpips' with pretrained=False needs lpips_weights=PATH (the linear layers); "
                             "for an uncalibrated test net use mode='random'")
        use_lins = lpips_weights is not None
        torchvision_backbone = mode == "lpips" and backbone_weights is None
        if torchvision_backbone and not pretrained:
            raise ValueError("LPIPS: mode='lpips' needs backbone_weights=PATH or pretrained=True")
        try:
            # pnet_rand=True: never let lpips/torchvision download; pretrained=False: we load the lins ourselves
            self.net = lpips_pkg.LPIPS(pretrained=False, net=net, lpips=use_lins, pnet_rand=not torchvision_backbone,
                                       verbose=False)
        except Exception as e:  # torchvision raises URLError/RuntimeError/OSError offline
            raise ValueError(f"LPIPS: torchvision's ImageNet {net} weights are not available ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}); pass backbone_weights=PATH to a local torchvision "
                             f"state dict, or use mode='caffe_squeeze' / 'random'") from None
        if backbone_weights is not None:
            self._load_backbone(backbone_weights)
        if use_lins:
            self._load_lins(lpips_weights)
        if mode == "caffe_squeeze":
            # (x - shift) / scale == (x + 1) * 127.5 - mean  for x in [-1, 1]
            mean = torch.tensor(_CAFFE_MEAN)[None, :, None, None]
            self.net.scaling_layer.scale.fill_(1 / 127.5)
            self.net.scaling_layer.shift.copy_(mean / 127.5 - 1)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()
        if mode == "random":
            self.mode_name = f"LPIPS-random({net}; plumbing only, not a perceptual metric)"
        elif mode == "caffe_squeeze":
            self.mode_name = f"LPIPS-like(Caffe SqueezeNet 1.1, {'given linear' if use_lins else 'unit'} weights)"
        else:
            self.mode_name = f"LPIPS({net}, v0.1{'' if lpips_weights.endswith(f'v0.1/{net}.pth') else ', local lins'})"

    def _load_backbone(self, path: str) -> None:
        sd = read_state_dict(path)
        if any(k.startswith("features.") for k in sd):  # a whole torchvision model: keep its features
            sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        # lpips splits torchvision's ``features`` Sequential into slices whose children keep the original
        # indices (slice2.3 is features.3), so the key map comes from the slices themselves.
        where = {idx: sname for sname, sl in self.net.net.named_children() for idx, _ in sl.named_children()}
        mapped, unknown = {}, []
        for k, v in sd.items():
            idx, _, rest = k.partition(".")
            if idx in where:
                mapped[f"{where[idx]}.{idx}.{rest}"] = v
            else:
                unknown.append(k)
        own = self.net.net.state_dict()
        missing = sorted(set(own) - set(mapped))
        bad = [k for k in mapped if k in own and own[k].shape != mapped[k].shape]
        unknown += [k for k in mapped if k not in own]
        if missing or unknown or bad:
            what = (f"missing {missing[:3]}" if missing else f"unexpected {unknown[:3]}" if unknown
                    else f"shape mismatch at {bad[0]}: {tuple(mapped[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
            raise CheckpointError(f"{path}: not a torchvision {self.net_name} backbone for LPIPS ({what})")
        self.net.net.load_state_dict(mapped)

    def _load_lins(self, path: str) -> None:
        sd = read_state_dict(path)
        # lpips registers each lin twice (lin0 and lins.0); files hold the lin0 names
        own = {k: v for k, v in self.net.state_dict().items() if re.match(r"lin\d+\.", k)}
        if set(sd) != set(own) or any(sd[k].shape != own[k].shape for k in own):
            raise CheckpointError(f"{path}: not LPIPS linear weights for net={self.net_name!r} "
                                  f"(expected keys {sorted(own)[:2]}..., got {sorted(sd)[:2]}...)")
        self.net.load_state_dict(sd, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # the frozen net never trains: lpips' dropout must stay off
        return self

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance, (B,). Gradient flows to ``x`` and ``y``, never into the net."""
        n = x.shape[0]
        with _fp32(x.device):
            xy = self.net.scaling_layer(torch.cat([x, y]).float())  # (2B, 3, H, W): one backbone pass
            total = x.new_zeros(n, dtype=torch.float32)
            for k, feat in enumerate(self.net.net(xy)):
                fx, fy = _normalize(feat[:n]), _normalize(feat[n:])
                diff = (fx - fy).pow(2)  # (B, C_k, H_k, W_k)
                diff = self.net.lins[k](diff) if self.net.lpips else diff.sum(dim=1, keepdim=True)  # (B, 1, H_k, W_k)
                total = total + diff.mean(dim=(1, 2, 3))
        return total

    def forward(self, inp: LossInputs) -> Tensor:
        recon, ref = self.pair(inp)
        return self.distance(recon, ref).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target={self.target!r}, mode={self.mode_name!r}"


# --- latent terms --------------------------------------------------------------------------------

class KL(LossTerm):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over C, H, W and averaged over the batch (latent-diffusion)."""

    name = "kl"

    def forward(self, inp: LossInputs) -> Tensor:
        mean, logvar = _need(inp, "KL", "mean", "logvar")
        with _fp32(mean.device):
            mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C, h, w)
            return kl.flatten(1).sum(1).mean()


class LatentMSE(LossTerm):
    """MSE between the student's latents and the teacher's (diffusion space)."""

    name = "latent_mse"

    def forward(self, inp: LossInputs) -> Tensor:
        z_pred, z_target = _need(inp, "LatentMSE", "z_pred", "z_target")
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
                    with _fp32(a.device):
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


# --- adversarial ---------------------------------------------------------------------------------

def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's ``||grad_last rec_loss|| / (||grad_last g_loss|| + 1e-4)``, clamped to [0, max_weight],
    detached, in fp32 (the norms overflow in fp16). A loss that does not reach ``last_layer``
    counts as a zero gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    with _fp32(last_layer.device):
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

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def _logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        out = self.discriminator(x, cond) if self.conditional else self.discriminator(x)
        return out.float()

    def _cond(self, inp: LossInputs) -> Tensor | None:
        if not self.conditional:
            return None
        return _need(inp, "Adversarial(conditional)", "cond")[0]

    def g_loss(self, inp: LossInputs) -> Tensor:
        (recon,) = _need(inp, "Adversarial", "recon")
        cond = self._cond(inp)
        with frozen(self.discriminator):
            fake = self._logits(recon, cond)
        with _fp32(fake.device):
            if self.loss == "hinge":
                return -fake.mean()
            if self.loss == "non_saturating":
                return F.softplus(-fake).mean()
            return (fake - 1).pow(2).mean()

    def d_loss(self, inp: LossInputs) -> tuple[Tensor, dict]:
        recon, real = _need(inp, "Adversarial", "recon", "real" if self.real == "real" else "target")
        cond = self._cond(inp)
        cond = cond.detach() if cond is not None else None
        logits_real = self._logits(real.detach(), cond)
        logits_fake = self._logits(recon.detach(), cond)
        with _fp32(logits_real.device):
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

