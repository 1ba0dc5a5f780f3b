"""Which of the student's parameters train: glob patterns, and what each mode never runs."""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

# what each mode never runs, hence never trains, unless the user's patterns say otherwise
UNUSED_BY_MODE = {
    "decoder": ["encoder.*", "quant_conv.*"],
    "encoder": ["decoder.*", "post_quant_conv.*"],
}


def select_parameters(model: nn.Module, trainable: Sequence[str] | None = None,
                      frozen: Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad`` by glob patterns on parameter names; returns the trainable names.

    ``trainable`` (default: everything) is applied first, then ``frozen`` removes from it, so
    ``trainable=["decoder.*"]`` or ``frozen=["encoder.*", "quant_conv.*"]`` both give a decoder-only
    finetune that keeps the latent space.
    """
    names = [n for n, _ in model.named_parameters()]
    for pats, what in ((trainable, "trainable"), (frozen, "frozen")):
        for pat in pats or ():
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(f"module.{what} pattern {pat!r} matches no parameter of {type(model).__name__} "
                                 f"(names look like {names[:3]}); fix the pattern")
    keep = []
    for n, p in model.named_parameters():
        on = trainable is None or any(fnmatch.fnmatchcase(n, pat) for pat in trainable)
        on = on and not any(fnmatch.fnmatchcase(n, pat) for pat in (frozen or ()))
        p.requires_grad_(on)
        if on:
            keep.append(n)
    if not keep:
        raise ValueError(f"no trainable parameters left in {type(model).__name__} "
                         f"(module.trainable={list(trainable or [])}, module.frozen={list(frozen or [])})")
    return keep


def default_frozen(model: nn.Module, mode: str) -> list[str]:
    """The patterns of ``UNUSED_BY_MODE[mode]`` that match something in ``model``."""
    names = [n for n, _ in model.named_parameters()]
    return [p for p in UNUSED_BY_MODE.get(mode, []) if any(fnmatch.fnmatchcase(n, p) for n in names)]


def fully_frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with parameters none of which train: they stay in eval mode so their norm statistics
    (e.g. FLUX.2's latent BatchNorm) cannot drift and a frozen encoder keeps exactly its latent space."""
    return [m for m in model.modules()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
