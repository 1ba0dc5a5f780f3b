"""The optimizers and their schedules, and what happens to gradients right before a step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from vaetrain.engine.guards import grads_of, total_norm
from vaetrain.engine.schedule import warmup_cosine

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def default_g_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def default_d_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.5, 0.9))


def build(student: nn.Module, adversarial: nn.Module | None, g_factory: OptimizerFactory, d_factory: OptimizerFactory,
          warmup: int, total: int | None, min_ratio: float) -> tuple[list, list]:
    """(optimizers, schedulers) for Lightning: G's, then D's if there is a discriminator.

    G's schedule is in G steps. D's is in D steps, which begin at D's start step: it spans the D steps the
    run will take (``total - d_start_step``), so D's LR ends where G's does."""
    opt_g = g_factory([p for p in student.parameters() if p.requires_grad])
    opts, scheds = [opt_g], [warmup_cosine(opt_g, warmup, total, min_ratio)]
    if adversarial is not None:
        opt_d = d_factory([p for p in adversarial.parameters() if p.requires_grad])
        d_total = None if total is None else max(total - adversarial.d_start_step, 1)
        opts.append(opt_d)
        scheds.append(warmup_cosine(opt_d, warmup, d_total, min_ratio))
    return opts, scheds


def grad_norm(optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """The global L2 gradient norm of ``optimizer``'s parameters (one foreach kernel, on the device)."""
    return total_norm(grads_of(p for group in optimizer.param_groups for p in group["params"]), device)


def clip(optimizer: torch.optim.Optimizer, max_norm: float | None, norm: Tensor) -> None:
    """Scale the gradients down to ``max_norm`` given their ``norm`` (no host sync).

    Called from ``on_before_optimizer_step``, where Lightning has already unscaled 16-mixed gradients: that is
    what Lightning's own ``clip_gradients`` exists to get right; for DDP and single devices it does the same,
    but would compute the norm again."""
    if max_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` honours a ``found_inf`` tensor (torch's fused Adam/AdamW/SGD, as GradScaler uses)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


@contextmanager
def found_inf(optimizers: list, flag: Tensor) -> Iterator[None]:
    """Set ``found_inf`` (1.0: drop this update) on the optimizers for one step, then remove it."""
    raw = [getattr(o, "optimizer", o) for o in optimizers]
    value = flag.to(torch.float32).reshape(())  # the shape of the optimizers' step counters
    for o in raw:
        o.found_inf = value
    try:
        yield
    finally:
        for o in raw:
            del o.found_inf
