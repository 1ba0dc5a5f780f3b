"""The one place where images and latents change convention.

Images inside vaetrain are float NCHW in [-1, 1]. Latents handed between models are in
*diffusion space*: ``z_d = (z_raw - shift) * scale`` (REFERENCE.md section 1), the space that
diffusion pipelines and tiny students (TAESD, MLP decoders, interposers) work in.
"""

from __future__ import annotations

import torch


def unit_to_model(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (TAESD's native range is [0, 1])."""
    return x * 2 - 1


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) / 2


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW in [0, 255] -> float NCHW in [-1, 1]; done on the device to save loader time."""
    return x.float().div_(127.5).sub_(1)


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded, as images are stored and PSNR is measured."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_diffusion(z_raw: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Raw autoencoder latents -> diffusion-space latents."""
    return (z_raw - shift) * scale


def from_diffusion(z: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Diffusion-space latents -> raw autoencoder latents."""
    return z / scale + shift
