"""Exponential moving average of the student's weights: what validation and export use."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of ``model`` (always in eval mode) that follows it by ``lerp``; buffers are copied.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so that early averages are not dominated by
    the random initialisation; ``n`` (``num_updates``) is a buffer, so the ramp resumes exactly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.train(False)

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach().to(e.dtype) for e, p in zip(ema_p, model.parameters())], 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1
