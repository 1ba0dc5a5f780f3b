"""Learning-rate schedules: linear warmup then cosine, in optimizer steps.

The schedule is configuration, not state: a run resumed with a different ``trainer.max_steps`` (or
warmup, or LR) follows the configured schedule from the restored step on. Only the step count comes
from the checkpoint; torch's ``LambdaLR`` would otherwise restore the old schedule's length and base LR.
"""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int = 0, total: int | None = None, min_ratio: float = 0.1):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.total or self.total <= self.warmup:
            return 1.0
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class ConfiguredLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose checkpoint restores only the step: the configured schedule and base LR win."""

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        for group, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * fn(self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int | None, min_ratio: float) -> ConfiguredLR:
    return ConfiguredLR(optimizer, WarmupCosine(warmup, total, min_ratio))
