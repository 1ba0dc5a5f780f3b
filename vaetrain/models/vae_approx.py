"""A1111's ``VAEApprox``: a 52-57k-parameter conv decoder, latents -> RGB at 2x latent resolution.

Key layout of the A1111 files: ``conv1`` ... ``conv8`` (7x7, 5x5, then six 3x3, no padding; the input is
nearest-upsampled 2x and padded by 11 so the output keeps the 2x size), leaky ReLU 0.1 after every conv,
output in [-1, 1]. It takes *diffusion-space* latents: on Kodak24 latents from Birch-san's SD1 encoder
(diffusion space) the sd1 file reaches ~21.4 dB at 2x latent resolution fed as is, vs ~15 dB fed 0.18215x
smaller and ~12.7 dB fed 5.49x larger (see tests/test_real_weights.py). For SD3 we follow A1111, whose
previews hand it the sampler's (diffusion-space) latents too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaetrain.convention import to_diffusion
from vaetrain.models import presets
from vaetrain.models.base import Autoencoder

# the latent spaces A1111 ships VAEApprox files for -> (channels, scaling_factor, shift_factor)
LATENT_SPACES = {k: v for k, v in presets.LATENT_SPACES.items() if k in ("sd1", "sdxl", "sd3")}


class VAEApproxNet(nn.Module):
    """The A1111 network; attribute names are its state-dict keys."""

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(latent_channels, 8, 7)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.conv4 = nn.Conv2d(32, 64, 3)
        self.conv5 = nn.Conv2d(64, 32, 3)
        self.conv6 = nn.Conv2d(32, 16, 3)
        self.conv7 = nn.Conv2d(16, 8, 3)
        self.conv8 = nn.Conv2d(8, 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(z, scale_factor=2, mode="nearest")  # (B, C, 2h, 2w)
        x = F.pad(x, (11, 11, 11, 11))  # the unpadded convs shrink each side by 3+2+6*1 = 11
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, self.conv7, self.conv8):
            x = F.leaky_relu(layer(x), 0.1)
        return x  # (B, 3, 2h, 2w)


@dataclass(frozen=True)
class VAEApproxParams:
    latent_space: str = "sd1"
    upsample_to_full: bool = False

    def __post_init__(self):
        if self.latent_space not in LATENT_SPACES:
            raise ValueError(f"VAEApprox latent_space must be one of {sorted(LATENT_SPACES)}, got {self.latent_space!r}")


class VAEApprox(Autoencoder):
    """Decoder-only Autoencoder around ``VAEApproxNet`` for the ``sd1``, ``sdxl`` or ``sd3`` latent space.

    ``decode`` takes diffusion-space latents (B, C, h, w) and returns (B, 3, 2h, 2w), or (B, 3, 8h, 8w) with
    ``upsample_to_full`` (bilinear), so it can serve as a teacher for full-resolution students.
    ``output_scale`` is 2 or 8 accordingly; ``downsample_factor`` (8) is the latent space's own.
    """

    Params = VAEApproxParams
    encoder = None
    downsample_factor = 8

    def __init__(self, latent_space: str = "sd1", upsample_to_full: bool = False):
        super().__init__()
        self.params = p = VAEApproxParams(latent_space, upsample_to_full)
        self.latent_space = p.latent_space
        self.latent_channels, self.scaling_factor, self.shift_factor = LATENT_SPACES[p.latent_space]
        self.upsample_to_full = p.upsample_to_full
        self.output_scale = 8 if p.upsample_to_full else 2
        self.decoder = VAEApproxNet(self.latent_channels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.decoder(z)
        if self.upsample_to_full:
            x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)  # (B, 3, 8h, 8w)
        return x

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        return self.decode(to_diffusion(z_raw, self.scaling_factor, self.shift_factor))

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv8.weight
