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
        self._n: int | None = None
        self.train(False)

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """Move towards ``model``; ``keep`` (a 0-dim bool tensor) False leaves everything as is, decided on the
        device without a host sync (a step whose update the optimizer dropped)."""
        if self._n is None:  # one read after construction or a resume; the ramp then counts on the host
            self._n = int(self.num_updates)
        d = min(self.decay, (1 + self._n) / (10 + self._n))
        ema_p = list(self.module.parameters())
        new_p = [p.detach().to(e.dtype) for e, p in zip(ema_p, model.parameters())]
        if keep is None:
            torch._foreach_lerp_(ema_p, new_p, 1 - d)
        else:
            step = torch._foreach_sub(new_p, ema_p)
            torch._foreach_mul_(step, keep.to(ema_p[0].dtype) * (1 - d))
            torch._foreach_add_(ema_p, step)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b if keep is None else torch.where(keep, b.to(e.dtype), e))
        self.num_updates += 1
        self._n += 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._n = None  # re-read num_updates at the next update
