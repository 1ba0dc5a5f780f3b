"""Pixel terms: the student's image against the teacher's decoding or the photo."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vaetrain.losses.base import LossInputs, LossTerm, need


class ImageTerm(LossTerm):
    """A term comparing the student's image with the teacher's decoding or the real image."""

    def __init__(self, weight: float = 1.0, target: str = "teacher", name: str | None = None):
        super().__init__(weight, name)
        if target not in ("teacher", "real"):
            raise ValueError(f"{type(self).__name__}: target={target!r} must be 'teacher' or 'real'")
        self.target = target

    def pair(self, inp: LossInputs) -> tuple[Tensor, Tensor]:
        recon, ref = need(inp, type(self).__name__, "recon", "target" if self.target == "teacher" else "real")
        if recon.shape != ref.shape:
            raise ValueError(f"{type(self).__name__}: student image {tuple(recon.shape)} and "
                             f"{self.target} image {tuple(ref.shape)} differ in shape")
        return recon, ref

    def extra_repr(self) -> str:
        return f"weight={self.weight}, target={self.target!r}"


class MSE(ImageTerm):
    name = "mse"

    def forward(self, inp: LossInputs) -> Tensor:
        recon, ref = self.pair(inp)
        return F.mse_loss(recon.float(), ref.float())


class L1(ImageTerm):
    name = "l1"

    def forward(self, inp: LossInputs) -> Tensor:
        recon, ref = self.pair(inp)
        return F.l1_loss(recon.float(), ref.float())
