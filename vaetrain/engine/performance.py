"""Options that matter on GPUs (each exercised on CPU by the tests): channels-last memory, ``torch.compile``, and
counting the FLOPs of one real training step for the model FLOP utilisation (MFU)."""

from __future__ import annotations

import torch
import torch._dynamo  # its config holds the eager fallback switch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 peak per device, FLOP/s (vendor figures, without sparsity); pass peak_flops= for anything else
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def compiled_parts(student: nn.Module, adversarial: nn.Module | None, losses: nn.ModuleDict) -> list[nn.Module]:
    """What ``torch.compile`` should wrap: the student's halves (its methods, not ``forward``, are what the modes
    call), the discriminator and the frozen perceptual nets of the loss terms."""
    halves = [m for m in (getattr(student, "encoder", None), getattr(student, "decoder", None)) if m is not None]
    parts = halves or [student]
    if adversarial is not None:
        parts.append(adversarial.discriminator)
    parts += [t.net for t in losses.values() if isinstance(getattr(t, "net", None), nn.Module)]
    return parts


def compile_in_place(modules: list[nn.Module], backend: str) -> None:
    """``nn.Module.compile`` each (in place: parameter names, state dicts and the EMA copy stay as they are).

    Fallback: torch compiles lazily at the first call; a graph it cannot compile runs eagerly instead of
    stopping the run (dynamo's ``suppress_errors``), and says so once."""
    torch._dynamo.config.suppress_errors = True
    for m in modules:
        m.compile(backend=backend)
    rank_zero_info(f"vaetrain: torch.compile (backend {backend}) on {len(modules)} modules; a part that fails to "
                   f"compile runs eagerly")


def to_channels_last(modules: list[nn.Module]) -> None:
    for m in modules:
        m.to(memory_format=torch.channels_last)


class _NoModules:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks break ``torch.autograd.grad``
    inside the counted step (R1's penalty, Seraena's corrected target); the total is all we need."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def flop_counter() -> FlopCounterMode:
    mode = FlopCounterMode(display=False)
    mode.mod_tracker = _NoModules()
    return mode


class StepFlops:
    """Counts the FLOPs of one training step as it really runs (student, teacher, losses, discriminator, both
    backwards) with ``torch.utils.flop_counter``: enter before a step, exit after it."""

    def __init__(self):
        self._mode: FlopCounterMode | None = None
        self.flops: int | None = None

    def start(self) -> None:
        self._mode = flop_counter()
        self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.flops, self._mode = self._mode.get_total_flops(), None
