"""``vaetrain latent-stats``: mean/std of the raw latents per channel and the scale/shift factors they imply."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from vaetrain.commands.images import as_model, batches, device_of, read_images
from vaetrain.convention import uint8_to_model
from vaetrain.safe import atomic_write


def _statbatches(data, size, crop, multiple, limit, batch_size) -> Iterator[Tensor]:
    """Image batches from a folder, or from any iterable of batches (a DataLoader of the training data
    module: dicts with "image", uint8 or [-1, 1] float); ``limit`` counts images."""
    if isinstance(data, (str, os.PathLike)):
        for _, batch in batches(read_images(data, size, crop, multiple, limit), batch_size):
            yield batch
        return
    seen = 0
    for batch in data:
        img = batch["image"] if isinstance(batch, dict) else batch
        if limit is not None:
            img = img[: limit - seen]
        seen += img.shape[0]
        yield img
        if limit is not None and seen >= limit:
            return


@torch.inference_mode()
def latent_stats(model, folder, size: int | None = 256, crop: str = "center", batch_size: int = 4,
                 limit: int | None = None, sample: bool = False, device: str = "cpu", out: str | None = None,
                 quiet: bool = False) -> dict:
    """Per-channel and global mean/std of ``model``'s RAW latents over the images of ``folder``
    (an image folder, or an iterable of batches such as the training data module's loader).

    Suggests, for this data: ``shift_factor = mean`` and ``scaling_factor = 1/std`` (SD3/FLUX
    convention: diffusion latents zero-mean, unit-variance) and the scale-only SD convention
    ``scaling_factor = 1/std`` with shift 0 (latent-diffusion measured the std of one batch), plus
    ``1/rms`` (unit second moment without a shift). Accumulated in float64 over all pixels.
    """
    dev = device_of(device)
    model = as_model(model).float().eval().to(dev)
    if not model.has_encoder:
        raise ValueError("latent_stats needs a model with an encoder (this one is decoder-only)")
    f = int(getattr(model, "downsample_factor", 8))
    n = s1 = s2 = None
    images = 0
    for batch in _statbatches(folder, size, crop, f, limit, batch_size):
        x = uint8_to_model(batch.to(dev)) if batch.dtype == torch.uint8 else batch.to(dev).float()
        z = model.encode_raw(x, sample=sample).double()  # (B, C, h, w) raw
        zc = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*h*w)
        if s1 is None:
            n, s1, s2 = 0, torch.zeros(z.shape[1], dtype=torch.float64, device=dev), torch.zeros(
                z.shape[1], dtype=torch.float64, device=dev)
        n += zc.shape[1]
        s1 += zc.sum(1)
        s2 += zc.pow(2).sum(1)
        images += z.shape[0]
    if s1 is None:
        raise ValueError(f"no images found in {folder}")
    mean_c = s1 / n
    std_c = (s2 / n - mean_c**2).clamp_min(0).sqrt()
    mean = float(s1.sum() / (n * len(s1)))
    second = float(s2.sum() / (n * len(s2)))
    std = math.sqrt(max(second - mean**2, 0.0))
    cur_scale, cur_shift = float(model.scaling_factor), float(model.shift_factor)
    result = {
        "folder": str(folder) if isinstance(folder, (str, os.PathLike)) else type(folder).__name__,
        "images": images,
        "latent_channels": len(s1),
        "sample": sample,
        "mean": mean,
        "std": std,
        "rms": math.sqrt(second),
        "per_channel_mean": mean_c.tolist(),
        "per_channel_std": std_c.tolist(),
        "suggested": {
            "shift_and_scale": {"shift_factor": mean, "scaling_factor": 1.0 / std},
            "scale_only": {"shift_factor": 0.0, "scaling_factor": 1.0 / std},
            "scale_only_rms": {"shift_factor": 0.0, "scaling_factor": 1.0 / math.sqrt(second)},
        },
        "current": {"shift_factor": cur_shift, "scaling_factor": cur_scale,
                    # what the model's current factors make of these latents: ideally mean 0, std 1
                    "diffusion_mean": (mean - cur_shift) * cur_scale, "diffusion_std": std * cur_scale},
    }
    if out is not None:
        atomic_write(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    if not quiet:
        print(_stats_table(result))
    return result


def _stats_table(r: dict) -> str:
    lines = [f"raw latent statistics over {r['images']} images of {r['folder']} "
             f"({'posterior samples' if r['sample'] else 'posterior means'})",
             f"  {'channel':>7} {'mean':>10} {'std':>10}"]
    for c, (m, s) in enumerate(zip(r["per_channel_mean"], r["per_channel_std"])):
        lines.append(f"  {c:>7} {m:10.4f} {s:10.4f}")
    lines.append(f"  {'all':>7} {r['mean']:10.4f} {r['std']:10.4f}   (rms {r['rms']:.4f})")
    sug, cur = r["suggested"], r["current"]
    lines.append(f"  SD3/FLUX convention: shift_factor={sug['shift_and_scale']['shift_factor']:.4f} "
                 f"scaling_factor={sug['shift_and_scale']['scaling_factor']:.4f}")
    lines.append(f"  SD convention (no shift): scaling_factor={sug['scale_only']['scaling_factor']:.4f} "
                 f"(1/rms: {sug['scale_only_rms']['scaling_factor']:.4f})")
    lines.append(f"  current factors (shift {cur['shift_factor']:g}, scale {cur['scaling_factor']:g}) give diffusion "
                 f"latents of mean {cur['diffusion_mean']:.4f}, std {cur['diffusion_std']:.4f}")
    return "\n".join(lines)
