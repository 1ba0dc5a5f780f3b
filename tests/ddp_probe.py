"""A callback for the DDP tests, loaded into `vaetrain train` with `allow_targets=[ddp_probe.]`: it records, per
micro-batch and per optimizer step, whether the ranks hold the same gradients (all-gathered checksums)."""

import json

import lightning as L
import torch


def _checksum(params) -> torch.Tensor:
    grads = [p.grad.double().sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros((), dtype=torch.float64)


class GradSyncProbe(L.Callback):
    def __init__(self, out: str):
        self.out, self.rows = out, []

    def _agree(self, pl_module, params) -> bool:
        gathered = pl_module.all_gather(_checksum(params))  # (world_size,)
        return bool((gathered == gathered[0]).all())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.at_step_boundary:  # inside an accumulation window: the gradients are still each rank's
            row = {"at": "micro", "student": self._agree(pl_module, pl_module.student.parameters())}
            if pl_module.adversarial is not None:
                row["adversarial"] = self._agree(pl_module, pl_module.adversarial.parameters())
            self.rows.append(row)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.rows.append({"at": "step", "agree": self._agree(pl_module, params)})

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump(self.rows, f)
