"""DDP with the student and the discriminator in wrappers of their own (``trainer.strategy=ddp_two_wrappers``).

Lightning's ``DDPStrategy`` wraps the whole LightningModule in one ``DistributedDataParallel``, whose reducer
expects a gradient for every trainable parameter in every backward. A GAN step takes two backward passes, and
each leaves the other network without gradients (G's leaves the frozen D, D's leaves the student), so one
wrapper needs ``find_unused_parameters`` (a traversal of the autograd graph before each backward) and all-reduces
both parameter sets through one set of buckets. Here the student and the discriminator each get a reducer of
their own, used only in the backward that trains them: no unused-parameter search, and buckets sized to each.
The teachers and loss networks are never wrapped (frozen; nothing to reduce).

Lightning knows only the one-wrapper layout, so this strategy adds what it lacks: the wrappers are made in
``configure_ddp`` and handed to the module (``VAETrainModule.through`` runs a step's forward through them, which
is where DDP prepares its reducer), ``block_backward_sync`` enters both wrappers' ``no_sync`` (accumulation
micro-batches), and what no wrapper broadcasts (the EMA) is broadcast from rank 0 once.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Apply(nn.Module):
    """``Apply(m)(fn) == fn(m)``: a forward for DDP to wrap. The student and the discriminator are used through
    methods (``encode``/``decode``, ``d_loss``), not their ``forward``, but DDP prepares its reducer only in
    ``forward``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[nn.Module], object]) -> object:
        return fn(self.module)


class TwoWrapperDDPStrategy(DDPStrategy):
    """DDP with one wrapper per trained network (the module's ``parallel_parts()``): see the module docstring."""

    strategy_name = "ddp_two_wrappers"

    def configure_ddp(self) -> None:
        module = self.model
        parts = module.parallel_parts() if hasattr(module, "parallel_parts") else None
        if not parts:
            raise ValueError(f"trainer.strategy=ddp_two_wrappers: {type(module).__name__} names no parts to wrap "
                             f"(parallel_parts); use trainer.strategy=ddp_one_wrapper")
        # the EMA and anything else outside the parts: DDP broadcasts only what it wraps
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
        device_ids = self.determine_ddp_device_ids()
        wrappers = {}
        for name, part in parts.items():
            # on its own CUDA stream, as Lightning makes its wrapper (the initial broadcast overlaps nothing else)
            with torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext():
                wrappers[name] = DistributedDataParallel(Apply(part), device_ids=device_ids, **self._ddp_kwargs)
            if self.root_device.type == "cuda" and self._ddp_comm_hook is not None:
                _register_ddp_comm_hook(model=wrappers[name], ddp_comm_state=self._ddp_comm_state,
                                        ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)
        module.wrappers = wrappers

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        with ExitStack() as stack:
            for w in getattr(self.lightning_module, "wrappers", {}).values():
                stack.enter_context(w.no_sync())
            yield

    def teardown(self) -> None:
        if self.lightning_module is not None:
            self.lightning_module.wrappers = {}
        super().teardown()
