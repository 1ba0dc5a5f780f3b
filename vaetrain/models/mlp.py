"""Per-pixel MLP autoencoder (Birch-san/diffusers-play "approx VAE"), optionally with a learned 8x upsampler.

Birch-san's layout: ``in_proj`` -> ``hidden_layers.{i}`` -> ``out_proj`` (``nn.Linear``, SiLU between),
applied channels-last to each pixel at LATENT resolution; the encoder sees the image area-downsampled 8x.
Measured on Kodak24 (see tests/test_real_weights.py): the sd1.5 encoder outputs latents with std ~0.4-0.75,
i.e. SD1 *diffusion-space* latents (raw SD1 latents have std ~5), and the matching VAEApprox decodes them
best unscaled. So the MLP works in diffusion space; ``scaling_factor`` / ``shift_factor`` only name the latent
space so that ``encode_raw`` / ``decode_raw`` speak raw latents like every other vaetrain Autoencoder.

Resolution semantics: ``downsample_factor`` (always 8) is the latent grid relative to the full-resolution
image the encoder takes. The decoder outputs images at ``output_scale`` x latent resolution: 1 without
the upsampler (Birch-san's decoder: an image of size H/8), 8 with it (full resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaetrain.convention import from_diffusion, to_diffusion
from vaetrain.models.base import Autoencoder


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class PixelMLP(nn.Module):
    """Linear n_in -> width (-> width)*depth -> n_out with SiLU, on the channel axis of an NCHW tensor."""

    def __init__(self, n_in: int, n_out: int, width: int = 12, depth: int = 1):
        super().__init__()
        self.in_proj = nn.Linear(n_in, width)
        self.hidden_layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out_proj = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C): Linear acts on the last axis
        x = F.silu(self.in_proj(x))
        for layer in self.hidden_layers:
            x = F.silu(layer(x))
        return self.out_proj(x).permute(0, 3, 1, 2)  # (B, C_out, H, W)


class Upsampler(nn.Module):
    """Learned 8x upsampling of the MLP's RGB: three conv + pixel-shuffle stages, added to a nearest 8x copy.

    The last conv starts at zero, so an untrained upsampler is exactly nearest upsampling.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        stages: list[nn.Module] = [conv(3, width), nn.SiLU()]
        for _ in range(3):
            stages += [conv(width, 4 * width), nn.PixelShuffle(2), nn.SiLU()]  # (B, 4w, h, w) -> (B, w, 2h, 2w)
        stages.append(conv(width, 3))
        self.net = nn.Sequential(*stages)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return F.interpolate(rgb, scale_factor=8, mode="nearest") + self.net(rgb)  # (B, 3, 8h, 8w)


class MLPDecoder(nn.Module):
    """Diffusion-space latents (B, C, h, w) -> image in [-1, 1] at (h, w), or (8h, 8w) with the upsampler."""

    def __init__(self, latent_channels: int = 4, width: int = 12, depth: int = 1, upsampler_width: int | None = None):
        super().__init__()
        self.mlp = PixelMLP(latent_channels, 3, width, depth)
        self.upsample = Upsampler(upsampler_width) if upsampler_width else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rgb = self.mlp(z)
        return self.upsample(rgb) if self.upsample is not None else rgb


class MLPEncoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> diffusion-space latents (B, C, H/8, W/8) from 8x area-downsampled pixels."""

    def __init__(self, latent_channels: int = 4, width: int = 12, depth: int = 1):
        super().__init__()
        self.mlp = PixelMLP(3, latent_channels, width, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"MLP encoder needs H and W divisible by 8, got {tuple(x.shape[-2:])}")
        return self.mlp(F.avg_pool2d(x, 8))  # (B, 3, H/8, W/8) -> (B, C, H/8, W/8)


@dataclass(frozen=True)
class MLPAutoencoderParams:
    """Defaults: Birch-san's SD1 models (4 ch, width 12, 1 hidden layer)."""

    latent_channels: int = 4
    width: int = 12
    depth: int = 1
    encoder: bool = True
    decoder: bool = True
    upsampler_width: int | None = None
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        if not (self.encoder or self.decoder):
            raise ValueError("MLPAutoencoder needs at least one half: set encoder=True and/or decoder=True")


class MLPAutoencoder(Autoencoder):
    """Encoder and/or decoder MLP halves (``MLPAutoencoderParams``)."""

    Params = MLPAutoencoderParams
    downsample_factor = 8

    def __init__(self, latent_channels: int = 4, width: int = 12, depth: int = 1, encoder: bool = True,
                 decoder: bool = True, upsampler_width: int | None = None, scaling_factor: float = 0.18215,
                 shift_factor: float = 0.0):
        super().__init__()
        self.params = p = MLPAutoencoderParams(latent_channels, width, depth, encoder, decoder, upsampler_width,
                                               scaling_factor, shift_factor)
        self.latent_channels = p.latent_channels
        self.width, self.depth, self.upsampler_width = p.width, p.depth, p.upsampler_width
        self.scaling_factor, self.shift_factor = p.scaling_factor, p.shift_factor
        self.output_scale = 8 if p.upsampler_width else 1
        self.encoder = MLPEncoder(p.latent_channels, p.width, p.depth) if p.encoder else None
        self.decoder = MLPDecoder(p.latent_channels, p.width, p.depth, p.upsampler_width) if p.decoder else None

    # the networks live in diffusion space; the raw API converts at the edges (module docstring)
    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return from_diffusion(self.encoder(x), self.scaling_factor, self.shift_factor)

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        return self.decoder(to_diffusion(z_raw, self.scaling_factor, self.shift_factor))

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        if not self.has_encoder:
            raise RuntimeError("MLPAutoencoder has no encoder (it was loaded decoder-only)")
        return self.encoder(x)  # same as the base class's round trip through raw space, without the rounding

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            raise RuntimeError("MLPAutoencoder has no decoder (it was loaded encoder-only)")
        return self.decoder(z)

    def last_layer(self) -> torch.Tensor:
        if self.decoder.upsample is not None:
            return self.decoder.upsample.net[-1].weight
        return self.decoder.mlp.out_proj.weight
