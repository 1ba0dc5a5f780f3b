"""Image-quality metrics on [-1, 1] images, computed the way papers report them (uint8, per image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vaetrain.convention import model_to_uint8


def psnr(pred: torch.Tensor, target: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Per-image PSNR in dB, (B,). With ``quantize`` both images are rounded to uint8 first."""
    if quantize:
        pred, target = model_to_uint8(pred).float(), model_to_uint8(target).float()
        peak = 255.0
    else:
        pred, target, peak = pred.float(), target.float(), 2.0
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=torch.float32) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()  # (3, 1, k, k) depthwise


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, on [0, 255], mean over RGB), (B,)."""
    x, y = model_to_uint8(pred).float(), model_to_uint8(target).float()
    w = _gaussian_window(device=x.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    sxx = F.conv2d(x * x, w, groups=3) - mu_x**2
    syy = F.conv2d(y * y, w, groups=3) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=3) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
