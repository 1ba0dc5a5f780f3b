"""What every loss term sees (:class:`LossInputs`) and is (:class:`LossTerm`).

Every term is a small ``nn.Module`` with a ``weight`` that returns its UNWEIGHTED scalar from one
:class:`LossInputs`; the training engine multiplies by ``weight`` and logs each term. Everything
numerically delicate runs in fp32 with autocast off (``fp32``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LossInputs:
    """Everything a term may look at, for one generator step. Images (B, 3, H, W) in [-1, 1]."""

    real: Tensor | None  # ground-truth image
    target: Tensor | None  # what the student should reproduce (teacher decode or real)
    recon: Tensor | None  # the student's output image
    teacher: Tensor | None = None  # the teacher's image for this batch (reference for *_teacher metrics), if any
    z_target: Tensor | None = None  # teacher latents (diffusion space)
    z_pred: Tensor | None = None  # student latents (encoder distillation / interposer output)
    mean: Tensor | None = None  # student raw posterior mean (KL)
    logvar: Tensor | None = None  # student raw posterior logvar (KL)
    cond: Tensor | None = None  # latents the decoder was conditioned on (conditional discriminator)
    step: int = 0


def need(inp: LossInputs, who: str, *fields: str) -> list[Tensor]:
    missing = [f for f in fields if getattr(inp, f) is None]
    if missing:
        raise ValueError(f"{who}: LossInputs.{', '.join(missing)} is None; this term needs "
                         f"{', '.join(fields)} (disable the term or train a mode that provides them)")
    return [getattr(inp, f) for f in fields]


@contextmanager
def fp32(device: torch.device):
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class LossTerm(nn.Module):
    """Base: ``forward(inp) -> unweighted scalar``; ``weight`` is applied by the caller."""

    name: str = "loss"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__()
        self.weight = float(weight)
        if name is not None:
            self.name = name

    def forward(self, inp: LossInputs) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
