"""What validation measures (PSNR / SSIM / LPIPS of the student against the photo and the teacher) and the
columns of its image grid."""

from __future__ import annotations

from torch import Tensor

from vaetrain.losses import LPIPS, LossInputs
from vaetrain.metrics import psnr, ssim


def metrics(inp: LossInputs, lpips: LPIPS | None) -> dict[str, Tensor]:
    """``val/{psnr,ssim,lpips}_{gt,teacher}`` where the reference exists at the student's resolution, and the
    latent MSE to the teacher where both latents exist."""
    out: dict[str, Tensor] = {}
    for name, ref in (("gt", inp.real), ("teacher", inp.teacher)):
        if inp.recon is None or ref is None or ref.shape != inp.recon.shape:
            continue
        out[f"val/psnr_{name}"] = psnr(inp.recon, ref).mean()
        out[f"val/ssim_{name}"] = ssim(inp.recon, ref).mean()
        if lpips is not None:
            out[f"val/lpips_{name}"] = lpips.distance(inp.recon, ref).mean()
    if inp.z_pred is not None and inp.z_target is not None:
        out["val/latent_mse"] = (inp.z_pred - inp.z_target).pow(2).mean()
    return out


def grid_columns(inp: LossInputs, k: int) -> dict[str, Tensor] | None:
    """label -> the first ``k`` images (CPU, fp32) of photo | teacher | student, for ``callbacks.ImageGrid``."""
    if inp.recon is None:
        return None
    cols = {name: ref[:k] for name, ref in (("photo", inp.real), ("teacher", inp.teacher)) if ref is not None}
    cols["student"] = inp.recon[:k]
    return {name: c.detach().float().cpu() for name, c in cols.items()}
