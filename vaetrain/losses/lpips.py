"""LPIPS (Zhang et al. 2018) with the ``lpips`` package's network, and the offline "LPIPS-like" variant.

LPIPS is never run under ``no_grad``: its net is frozen (``requires_grad=False``, always eval) but the
graph to the student's image is kept, so the student gets its gradient. Computed in fp32.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from vaetrain.formats.io import CheckpointError, read_state_dict
from vaetrain.losses.base import LossInputs, fp32
from vaetrain.losses.pixel import ImageTerm

# Caffe models take 0..255 RGB minus the ImageNet mean pixel (no std division).
_CAFFE_MEAN = (123.68, 116.779, 103.939)


def _normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise over channels. lpips' own ``x / (sqrt(sum x^2) + eps)`` has an infinite
    gradient (-> NaN) where a feature vector is exactly zero, which ReLU features often are;
    ``rsqrt(sum + eps)`` has the same value elsewhere and a finite gradient."""
    return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + eps)


class LPIPS(ImageTerm):
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
        with fp32(x.device):
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
