"""city96-style latent interposer: maps one latent space onto another (e.g. SD1 <-> SDXL), latent -> latent.

``head`` (3x3 conv to ``width``) -> optional resize by ``scale`` -> ``blocks`` ResBlocks -> BatchNorm + SiLU
-> ``tail`` (3x3 conv to ``ch_out``). Works on diffusion-space latents, as the pipelines hand them over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaetrain.models.base import HasParams


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.long = nn.Sequential(conv(ch, ch), nn.LeakyReLU(0.1), conv(ch, ch), nn.LeakyReLU(0.1), conv(ch, ch))
        self.join = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join(self.long(x) + x)


@dataclass(frozen=True)
class LatentInterposerParams:
    ch_in: int = 4
    ch_out: int = 4
    width: int = 64
    blocks: int = 12
    scale: float = 1.0


class LatentInterposer(HasParams, nn.Module):
    """(B, ch_in, h, w) -> (B, ch_out, h*scale, w*scale)."""

    Params = LatentInterposerParams

    def __init__(self, ch_in: int = 4, ch_out: int = 4, width: int = 64, blocks: int = 12, scale: float = 1.0):
        super().__init__()
        self.params = p = LatentInterposerParams(ch_in, ch_out, width, blocks, scale)
        self.ch_in, self.ch_out, self.scale = p.ch_in, p.ch_out, p.scale
        self.head = conv(p.ch_in, p.width)
        self.core = nn.Sequential(*[ResBlock(p.width) for _ in range(p.blocks)], nn.BatchNorm2d(p.width), nn.SiLU())
        self.tail = conv(p.width, p.ch_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.ch_in:
            raise ValueError(f"LatentInterposer expects {self.ch_in}-channel latents, got {z.shape[1]} channels")
        x = self.head(z)  # (B, width, h, w)
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (B, width, h*s, w*s)
        return self.tail(self.core(x))  # (B, ch_out, h*s, w*s)
