"""PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

Layer layout and parameter names (``main.{i}``) follow taming so its discriminator checkpoints
load as-is. Two additions: ``norm`` may be ``"group"`` or ``"none"`` instead of BatchNorm (BatchNorm
statistics differ per DDP rank unless synced, and real and fake batches pass separately), and
``cond_channels`` makes it latent-conditioned the Seraena/TAESD way: the latent is
nearest-upsampled to the image size and concatenated to the RGB input, so the discriminator judges
"is this a plausible decoding of *this* latent" rather than "is this a plausible image".
``spectral_norm`` (SN-GAN, Miyato et al. 2018) divides every conv's weight by its top singular value;
the weights are then stored as ``main.{i}.parametrizations.weight.original`` (taming's checkpoints
load only without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from vaetrain.models.base import HasParams


def conv(n_in: int, n_out: int, stride: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=4, stride=stride, padding=1, bias=bias)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)  # channels are ndf * 2^k: divisible for ndf >= 32
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"NLayerDiscriminator: norm={kind!r} is not one of 'batch', 'group', 'none'")


@dataclass(frozen=True)
class NLayerDiscriminatorParams:
    in_channels: int = 3
    cond_channels: int = 0
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    spectral_norm: bool = False

    def __post_init__(self):
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        if self.norm == "group" and self.ndf % min(32, self.ndf):
            raise ValueError(f"NLayerDiscriminator: norm='group' needs ndf divisible by {min(32, self.ndf)}, "
                             f"got {self.ndf}")


class NLayerDiscriminator(HasParams, nn.Module):
    """(B, 3, H, W) image in [-1, 1] (+ (B, C, h, w) latent) -> (B, 1, H/8 - 2, W/8 - 2) real/fake logits.

    ``n_layers`` stride-2 4x4 convs (the first without norm), one stride-1 4x4 conv, and a 4x4
    conv to one channel; LeakyReLU(0.2); weights N(0, 0.02) as in taming's ``weights_init``.
    """

    Params = NLayerDiscriminatorParams

    def __init__(self, in_channels: int = 3, cond_channels: int = 0, ndf: int = 64, n_layers: int = 3,
                 norm: str = "batch", spectral_norm: bool = False):
        super().__init__()
        self.params = NLayerDiscriminatorParams(in_channels, cond_channels, ndf, n_layers, norm, spectral_norm)
        self.in_channels, self.cond_channels = in_channels, cond_channels
        bias = norm != "batch"  # a conv followed by BatchNorm needs no bias (taming)
        layers: list[nn.Module] = [conv(in_channels + cond_channels, ndf, 2), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [conv(ndf * prev, ndf * mult, 2, bias), norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [conv(ndf * prev, ndf * mult, 1, bias), norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [conv(ndf * mult, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()
        if spectral_norm:  # after the init, which it then normalises (one power iteration per training forward)
            for m in self.main:
                if isinstance(m, nn.Conv2d):
                    parametrizations.spectral_norm(m)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_channels:
            if cond is None:
                raise ValueError("NLayerDiscriminator: built with cond_channels > 0 but called without a latent")
            if cond.shape[1] != self.cond_channels:
                raise ValueError(f"NLayerDiscriminator: latent has {cond.shape[1]} channels, built for "
                                 f"{self.cond_channels}; set cond_channels to the student's latent_channels")
            cond = F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="nearest")  # (B, C, H, W)
            x = torch.cat([x, cond], dim=1)  # (B, 3 + C, H, W)
        elif cond is not None:
            raise ValueError("NLayerDiscriminator: got a latent but was built unconditional (cond_channels=0)")
        return self.main(x)
