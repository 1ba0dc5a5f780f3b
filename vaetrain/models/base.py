"""The face every vaetrain autoencoder shows to the rest of the framework.

Subclasses implement ``encode_raw`` / ``decode_raw`` in their own latent space; this class adds the
diffusion-space convention (scale and shift) once, so nothing else has to remember it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from vaetrain.convention import from_diffusion, to_diffusion


class HasParams:
    """A model built from one frozen params dataclass.

    ``Params`` is the dataclass type, ``params`` this model's instance (set first thing in ``__init__``, whose keyword
    arguments are the dataclass's fields, so Hydra configs and Python callers keep passing plain keywords).
    ``vaetrain.formats.describe`` / ``build`` turn it into a plain dict and back.
    """

    Params: ClassVar[type]
    params: Any

    def config(self) -> dict:
        """The params as a dict (checkpoint metadata, ``teacher_fingerprint``)."""
        return dataclasses.asdict(self.params)

    @classmethod
    def from_params(cls, params):
        if not isinstance(params, cls.Params):
            raise TypeError(f"{cls.__name__}.from_params needs a {cls.Params.__name__}, got {type(params).__name__}")
        return cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})


class Autoencoder(HasParams, nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> diffusion-space latents (B, C, H/f, W/f).

    Attributes every subclass sets: ``latent_channels``, ``downsample_factor``,
    ``scaling_factor``, ``shift_factor``. ``encoder`` / ``decoder`` may be ``None`` for
    encoder-only or decoder-only models (e.g. one half of a TAESD pair).
    """

    latent_channels: int
    downsample_factor: int
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    encoder: nn.Module | None
    decoder: nn.Module | None
    # not architecture, so not params: set by the loaders when known, read by the exporters
    latent_space: str | None = None  # "sd1", "sdxl", "sd3", "flux1", "flux2" (presets.LATENT_SPACES); names exports
    source_dtype: str | None = None  # dtype of the weights it was loaded from ("float16", ...): dtype="auto" keeps it

    # --- implemented by subclasses -------------------------------------------------------
    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_layer(self) -> torch.Tensor:
        """The decoder's final weight, for the adaptive GAN weight (taming)."""
        raise NotImplementedError

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Raw-space (mean, logvar) for KL-regularised models; ``None`` for deterministic ones."""
        return None

    # --- shared --------------------------------------------------------------------------
    @property
    def has_encoder(self) -> bool:
        return getattr(self, "encoder", None) is not None

    @property
    def has_decoder(self) -> bool:
        return getattr(self, "decoder", None) is not None

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        if not self.has_encoder:
            raise RuntimeError(f"{type(self).__name__} has no encoder (it was loaded decoder-only)")
        return to_diffusion(self.encode_raw(x, sample=sample), self.scaling_factor, self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            raise RuntimeError(f"{type(self).__name__} has no decoder (it was loaded encoder-only)")
        return self.decode_raw(from_diffusion(z, self.scaling_factor, self.shift_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
