"""Guards of the training step: gradient norms, the all-rank non-finite vote, and replica checksums.

All of it works on device tensors (foreach kernels); the only host sync is the one boolean decision per
optimizer step (``StepGuard.decide``), taken identically on every rank so that no rank steps alone
(one rank skipping while the others step would hang DDP at the next all-reduce).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row: the run cannot recover by skipping steps."""


def grads_of(params: Iterable[nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def total_norm(grads: list[Tensor], device: torch.device) -> Tensor:
    """The global L2 norm of ``grads`` (fp32, on device; 0 for none), one foreach kernel."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).float()


def all_finite(values: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: every 0-dim tensor in ``values`` (losses, gradient norms) is finite; no host sync."""
    return torch.isfinite(torch.stack([v.float() for v in values])).all()


class StepGuard:
    """Counts non-finite steps and decides whether to skip: on the host (``decide``: one read of an all-rank
    flag) or on the device (``record``: counters stay on the device until ``total`` / ``check`` read them)."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self._total, self._run = 0, 0
        self._dev: tuple[Tensor, Tensor] | None = None  # (total, run) since the last read, on the device

    def decide(self, finite: Tensor, reduce) -> bool:
        """``finite``: this rank's 0-dim flag; ``reduce(t)`` sums over ranks. True: skip this step everywhere."""
        skip = bool(reduce((~finite).float()) > 0)  # the one host sync of the step
        self._fold()
        self._total += skip
        self._run = self._run + 1 if skip else 0
        return skip

    def record(self, finite: Tensor) -> None:
        """Count a step whose skip was decided on the device (no host sync)."""
        bad = (~finite).to(torch.int64)
        if self._dev is None:
            self._dev = (torch.zeros((), dtype=torch.int64, device=bad.device),
                         torch.full((), self._run, dtype=torch.int64, device=bad.device))
        total, run = self._dev
        total.add_(bad)
        run.add_(bad).mul_(bad)  # consecutive bad steps; 0 after a good one

    def _fold(self) -> None:
        if self._dev is not None:
            total, run = self._dev
            self._total, self._run, self._dev = self._total + int(total), int(run), None

    @property
    def total(self) -> int:
        self._fold()
        return self._total

    def check(self, step: int, what: str) -> None:
        self._fold()
        if self._run >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"stopped at step {step}: {self._run} non-finite losses/gradients in a row ({what}); lower the "
                f"learning rate, enable module.grad_clip, or check the data and module.teacher_dtype")

    def state_dict(self) -> dict:
        self._fold()
        return {"total": self._total, "in_a_row": self._run}

    def load_state_dict(self, state: dict) -> None:
        self._dev = None
        self._total, self._run = int(state.get("total", 0)), int(state.get("in_a_row", 0))


def checksum(module: nn.Module) -> Tensor:
    """A float64 sum of every parameter: equal on every DDP replica unless they diverged."""
    with torch.no_grad():
        params = [p.detach().double().sum() for p in module.parameters()]
    return torch.stack(params).sum() if params else torch.zeros((), dtype=torch.float64)
