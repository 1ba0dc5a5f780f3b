"""Tiny AutoEncoder for Stable Diffusion (madebyollin/taesd), all variants in one compact file.

``Encoder`` / ``Decoder`` return ``nn.Sequential`` with the ORIGINAL index layout, so the original
``taesd_encoder.pth`` / ``taesd_decoder.pth`` keys (``"3.conv.0.weight"``...) load as they are.
Variants are explicit flags: ``latent_channels`` (4 SD/SDXL, 16 SD3/FLUX.1, 32 FLUX.2/Sana),
``width``, ``flux_2`` (midblock ``pool`` branch) and ``downsample_factor`` 8, 4 (one stage fewer on each side;
diffusers AutoencoderTiny with three blocks) or 32 (taesana's "f32").
TAESD works on images in [0, 1]; ``TAESD`` converts to and from vaetrain's [-1, 1] at its edges.
Its latents are already diffusion space (scale 1, shift 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vaetrain.convention import model_to_unit, unit_to_model
from vaetrain.models.base import Autoencoder


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to about [-3, 3]: the decoder never sees wild values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual 3-conv block; with ``pool`` (FLUX.2 variant) a GroupNorm branch first adds global context."""

    def __init__(self, n_in: int, n_out: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pool:
            self.pool = nn.Sequential(nn.Conv2d(n_in, 4 * n_in, 1, bias=False), nn.GroupNorm(4, 4 * n_in),
                                      nn.ReLU(inplace=True), nn.Conv2d(4 * n_in, n_in, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def Encoder(latent_channels: int = 4, width: int = 64, flux_2: bool = False, downsample_factor: int = 8) -> nn.Sequential:
    """[0, 1] image (B, 3, H, W) -> latents (B, C, H/f, W/f)."""
    w = width
    if downsample_factor in (4, 8):  # one stride-2 stage per halving; f=8 is the published layout
        stem, stages = [conv(3, w), Block(w, w)], downsample_factor.bit_length() - 1
    elif downsample_factor == 32:  # taesana "f32": two extra stride-2 convs in the stem
        stem, stages = [conv(3, w // 2, stride=2), nn.ReLU(inplace=True), conv(w // 2, w, stride=2),
                        nn.ReLU(inplace=True), Block(w, w)], 3
    else:
        raise ValueError(f"TAESD downsample_factor must be 4, 8 or 32, got {downsample_factor}")
    layers: list[nn.Module] = stem
    for i in range(stages):
        pool = flux_2 and i == stages - 1
        layers += [conv(w, w, stride=2, bias=False), Block(w, w, pool), Block(w, w, pool), Block(w, w, pool)]
    return nn.Sequential(*layers, conv(w, latent_channels))


def Decoder(latent_channels: int = 4, width: int = 64, flux_2: bool = False, downsample_factor: int = 8) -> nn.Sequential:
    """Latents (B, C, h, w) -> [0, 1]-ish image (B, 3, h*f, w*f) (not clamped: the caller clamps)."""
    w = width
    if downsample_factor in (4, 8):
        widths = [w] * downsample_factor.bit_length()  # (4 -> 3 stages, 8 -> 4)
    elif downsample_factor == 32:
        # No f32 decoder weights are published (only taesana's encoder); this is vaetrain's own layout:
        # wider early stages as in taesd.py's F32Decoder, but five upsamplings so the output is really 32x.
        widths = [4 * w, 2 * w, w, w, w, w]
    else:
        raise ValueError(f"TAESD downsample_factor must be 4, 8 or 32, got {downsample_factor}")
    layers: list[nn.Module] = [Clamp(), conv(latent_channels, widths[0]), nn.ReLU()]
    for i, (n, n_next) in enumerate(zip(widths[:-1], widths[1:])):
        pool = flux_2 and i == 0
        layers += [Block(n, n, pool), Block(n, n, pool), Block(n, n, pool),
                   nn.Upsample(scale_factor=2), conv(n, n_next, bias=False)]
    return nn.Sequential(*layers, Block(widths[-1], widths[-1]), conv(widths[-1], 3))


@dataclass(frozen=True)
class TAESDParams:
    latent_channels: int = 4
    width: int = 64
    encoder: bool = True
    decoder: bool = True
    flux_2: bool = False
    downsample_factor: int = 8
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        if not (self.encoder or self.decoder):
            raise ValueError("TAESD needs at least one half: set encoder=True and/or decoder=True")
        if self.downsample_factor not in (4, 8, 32):
            raise ValueError(f"TAESD downsample_factor must be 4, 8 or 32, got {self.downsample_factor}")


class TAESD(Autoencoder):
    """TAESD as a vaetrain ``Autoencoder``; either half may be absent (one ``.pth`` file alone)."""

    Params = TAESDParams

    def __init__(self, latent_channels: int = 4, width: int = 64, encoder: bool = True, decoder: bool = True,
                 flux_2: bool = False, downsample_factor: int = 8, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        super().__init__()
        self.params = p = TAESDParams(latent_channels, width, encoder, decoder, flux_2, downsample_factor,
                                      scaling_factor, shift_factor)
        self.latent_channels = p.latent_channels
        self.width = p.width
        self.flux_2 = p.flux_2
        self.downsample_factor = p.downsample_factor
        self.scaling_factor = p.scaling_factor
        self.shift_factor = p.shift_factor
        arch = (p.latent_channels, p.width, p.flux_2, p.downsample_factor)
        self.encoder = Encoder(*arch) if p.encoder else None
        self.decoder = Decoder(*arch) if p.decoder else None

    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self.encoder(model_to_unit(x))

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        return unit_to_model(self.decoder(z_raw))

    def last_layer(self) -> torch.Tensor:
        return self.decoder[-1].weight
