"""A replay buffer of past fakes for the discriminator (Seraena; ganhacks #8 "experience replay").

Without one the discriminator only ever sees the generator's latest outputs and can forget what
earlier (often worse) ones looked like, so the generator may drift back to them. Following
madebyollin/seraena (``seraena.py``, ``Seraena._disc_train_step``): single samples (a detached fake
and, for a conditional discriminator, the latent it was decoded from) go into a buffer of fixed
size; once it is full each new sample overwrites a uniformly random slot (Seraena's rule, not
reservoir sampling); every D batch keeps its first ``B - k`` current fakes and replaces the last
``k = floor(fraction * B)`` by uniform draws from the buffer (Seraena: half; the draws may include
the fakes just pushed, as there).

Why the buffer is "extra state" (``get_extra_state``, saved in ``state_dict`` under
``..._extra_state``) and not registered buffers: its shape is only known at the first push and
changes with the training resolution (a 96 px phase resumed at 256 px), which registered buffers
cannot load across; and DDP broadcasts every registered buffer from rank 0 before each forward,
which would copy rank 0's (possibly GB-sized) buffer to every rank at every step. Each rank keeps
its own buffer; a checkpoint holds rank 0's, which every rank resumes from. Plain tensors are not
moved by ``module.to()``: the buffer follows the device of the fakes pushed into it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaetrain.safe import UserError


class ReplayBuffer(nn.Module):
    """``size`` past fakes (B, 3, H, W) (and their latents); ``mix(fakes, cond)`` pushes and returns the D batch.

    Memory: ``size * 3 * H * W`` elements in the fakes' dtype on their device (2048 fakes at 96 px
    in fp32: 226 MB), and the same again in every checkpoint once full.
    """

    def __init__(self, size: int, fraction: float = 0.5):
        super().__init__()
        if size < 1:
            raise UserError(f"ReplayBuffer: size={size} must be >= 1 (replay_size: 0 switches the replay buffer off)")
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"ReplayBuffer: fraction={fraction} must be in [0, 1] (the share of each D batch drawn "
                            f"from past fakes; Seraena uses 0.5)")
        self.size, self.fraction = int(size), float(fraction)
        self.fakes: Tensor | None = None  # (size, 3, H, W), allocated at the first push
        self.conds: Tensor | None = None  # (size, C, h, w) for a conditional discriminator
        self.count = 0  # samples pushed since the buffer was (re)allocated; the first len(self) slots are filled

    def __len__(self) -> int:
        return min(self.count, self.size)

    def _allocate(self, fakes: Tensor, cond: Tensor | None) -> None:
        self.fakes = fakes.new_zeros((self.size, *fakes.shape[1:]))
        self.conds = None if cond is None else cond.new_zeros((self.size, *cond.shape[1:]))
        self.count = 0

    def _fits(self, fakes: Tensor, cond: Tensor | None) -> bool:
        if self.fakes is None or self.fakes.shape[1:] != fakes.shape[1:] or (cond is None) != (self.conds is None):
            return False
        return cond is None or self.conds.shape[1:] == cond.shape[1:]

    @torch.no_grad()
    def push(self, fakes: Tensor, cond: Tensor | None = None) -> None:
        fakes = fakes.detach()
        cond = None if cond is None else cond.detach()
        if not self._fits(fakes, cond):
            self._allocate(fakes, cond)  # first push, or a new resolution: old fakes cannot join these batches
        if self.fakes.device != fakes.device:  # after a checkpoint load onto another device
            self.fakes = self.fakes.to(fakes.device)
            self.conds = None if self.conds is None else self.conds.to(fakes.device)
        n = fakes.shape[0]
        free = max(0, min(n, self.size - self.count))
        slots = torch.cat([torch.arange(self.count, self.count + free, device=fakes.device),
                           torch.randint(self.size, (n - free,), device=fakes.device)])
        self.fakes[slots] = fakes.to(self.fakes.dtype)
        if cond is not None:
            self.conds[slots] = cond.to(self.conds.dtype)
        self.count += n

    @torch.no_grad()
    def mix(self, fakes: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Push ``fakes`` (and ``cond``), then return the D batch: the same size, its last ``floor(fraction * B)``
        samples drawn from the buffer (with their own latents)."""
        self.push(fakes, cond)
        b = fakes.shape[0]
        k = int(self.fraction * b)
        if k == 0:
            return fakes.detach(), None if cond is None else cond.detach()
        idx = torch.randint(len(self), (k,), device=fakes.device)
        out = torch.cat([fakes.detach()[: b - k], self.fakes[idx].to(fakes.dtype)])
        if cond is None:
            return out, None
        return out, torch.cat([cond.detach()[: b - k], self.conds[idx].to(cond.dtype)])

    def get_extra_state(self) -> dict:
        n = len(self)
        # a slice of a tensor would save its whole storage: clone the filled part unless it is all of it
        keep = (lambda t: None if t is None else (t if n == self.size else t[:n].clone()))
        return {"count": self.count, "fakes": keep(self.fakes), "conds": keep(self.conds)}

    def set_extra_state(self, state: dict) -> None:
        fakes, conds, count = state["fakes"], state["conds"], int(state["count"])
        if fakes is None:
            self.fakes, self.conds, self.count = None, None, 0
            return
        self._allocate(fakes, conds)
        n = min(fakes.shape[0], self.size)  # a smaller size than the checkpoint's keeps its first slots
        self.fakes[:n] = fakes[:n]
        if conds is not None:
            self.conds[:n] = conds[:n]
        self.count = count if n == self.size else min(count, n)  # a larger buffer: its free slots stay free

    def extra_repr(self) -> str:
        return f"size={self.size}, fraction={self.fraction}, filled={len(self)}"
