"""Reading evaluation images and models, shared by ``eval``, ``audit-fp16`` and ``latent-stats``.

Images are read with the training pipeline's own decoder (``vaetrain.data``: EXIF, modes, resize), so
numbers here and in validation agree.
"""

from __future__ import annotations

import os
import random
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from vaetrain.data import crop_resize, list_images, open_image
from vaetrain.formats import load_autoencoder
from vaetrain.models.base import Autoencoder


def as_model(model, what: str = "model") -> Autoencoder:
    if isinstance(model, (str, os.PathLike, list, tuple)):
        model = load_autoencoder(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what}: expected an Autoencoder or a checkpoint path, got {type(model).__name__}")
    return model


def device_of(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_images(folder, size: int | None = 256, crop: str = "center", multiple: int = 8,
                limit: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """(relative name, (3, H, W) uint8) for every image under ``folder``, sorted.

    ``size``: resize the short side to ``size`` and take a ``crop="center"`` square. ``size=None``
    (or ``crop="native"``): keep the native resolution, centre-cropped down to a multiple of
    ``multiple`` (the model's downsampling factor), e.g. Kodak 500x500 -> 496x496.
    """
    if crop not in ("center", "native"):
        raise ValueError(f"crop={crop!r} must be 'center' or 'native' (evaluation is deterministic: no random crops)")
    files = list_images(str(folder))
    if not files:
        raise ValueError(f"no images found under {folder}")
    for path in files[:limit] if limit else files:
        with open(path, "rb") as f:
            img = open_image(f.read())
        if size is None or crop == "native":
            w, h = img.size
            cw, ch = w - w % multiple, h - h % multiple
            if cw == 0 or ch == 0:
                raise ValueError(f"{path}: {w}x{h} is smaller than the model's downsampling factor {multiple}")
            left, top = (w - cw) // 2, (h - ch) // 2
            arr = np.asarray(img.crop((left, top, left + cw, top + ch)))  # (H, W, 3)
        else:
            arr = crop_resize(img, size, "center", False, random.Random(0))  # (S, S, 3)
        yield os.path.relpath(path, folder), torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)


def batches(items: Iterator[tuple[str, Tensor]], batch_size: int) -> Iterator[tuple[list[str], Tensor]]:
    """Stack consecutive same-sized images (native-resolution folders mix sizes)."""
    names: list[str] = []
    group: list[Tensor] = []
    for name, img in items:
        if group and (len(group) == batch_size or img.shape != group[0].shape):
            yield names, torch.stack(group)
            names, group = [], []
        names.append(name)
        group.append(img)
    if group:
        yield names, torch.stack(group)  # (B, 3, H, W) uint8

