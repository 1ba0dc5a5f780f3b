"""What an export carries besides the weights: ``ExportInfo`` (filled by callers), the fp16 verdict, the latent
statistics, the weight dtype, the metadata stored in every file, the loud-but-not-fatal warnings, and the model card.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from vaetrain.safe import UserError, atomic_write

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SOURCE_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
EXPORT_KEY = "vaetrain_export"  # safetensors metadata: JSON of ``export_metadata``
LATENT_CONVENTIONS = ("shift_and_scale", "scale_only", "scale_only_rms")  # latent-stats' "suggested" entries


class ExportWarning(UserWarning):
    """An export was written but something real tools need is missing (one line: what, and what to use)."""


@dataclass(frozen=True)
class ExportInfo:
    """Everything an export needs beyond the model; every field is optional.

    dtype: "auto" (fp16/bf16 when the source weights were, else fp32), "fp32", "fp16" or "bf16".
    taesd_prefix: ComfyUI ``vae_approx`` name (taesd, taesdxl, taesd3, taef1, taef2); None: from the latent space.
    latent_space: sd1 | sdxl | sd3 | flux1 | flux2, the space the model speaks (e.g. its teacher's); None: the model's.
    scaling_factor / shift_factor: written instead of the model's (e.g. measured by ``vaetrain latent-stats``).
    latents_mean / latents_std: per-channel raw-latent statistics for diffusers' config.
    sample_size: diffusers' ``sample_size`` (its tiling tile size); None: the training image size is unknown, so
        512 for SD1's space and 1024 for the others.
    fp16_audit: ``vaetrain audit-fp16``'s result (its ``resolutions``: verdict and headroom per size), or per
        resolution {"256": {"finite": true, "max_abs": ...}, ...};
        "safe" (every size finite and under fp16's max) -> diffusers ``force_upcast: false``.
    command / config / metrics: the model card's training command, resolved config and measured metrics.
    """

    dtype: str = "auto"
    taesd_prefix: str | None = None
    latent_space: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    sample_size: int | None = None
    fp16_audit: Mapping[str, Any] | None = None
    command: str | None = None
    config: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"dtype={self.dtype!r}: use auto, {', '.join(DTYPES)}")
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(v) for v in value))
        if self.fp16_audit is not None:
            fp16_safe(self.fp16_audit)  # a malformed audit fails here, before anything is written

    def updated(self, **changes) -> "ExportInfo":
        """A copy with the non-None ``changes`` applied (keyword options over a caller's ``ExportInfo``)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def fp16_safe(audit: Mapping[str, Any] | None) -> bool | None:
    """True when an fp16 audit found every size finite with activations under fp16's max; None without an audit."""
    if audit is None:
        return None
    if not isinstance(audit, Mapping):
        raise UserError(f"fp16_audit must be audit-fp16's result (a dict), got {type(audit).__name__}")
    if "safe" in audit:  # vaetrain audit-fp16's own result
        return bool(audit["safe"])
    if not audit or not all(isinstance(v, Mapping) for v in audit.values()):
        raise UserError("fp16_audit: expected audit-fp16's result or {resolution: {finite, max_abs}}; "
                        f"got keys {sorted(audit)[:5]}")
    verdicts = []
    for size, r in audit.items():
        if "safe" in r:
            verdicts.append(bool(r["safe"]))
            continue
        finite = r.get("finite", r.get("fp16_output_finite"))
        peak = r.get("max_abs", r.get("max_activation"))
        if finite is None or peak is None:
            raise UserError(f"fp16_audit[{size!r}] needs 'finite' and 'max_abs' (or 'safe'); got {sorted(r)}")
        verdicts.append(bool(finite) and math.isfinite(float(peak)) and float(peak) < FP16_MAX)
    return all(verdicts)


def _audit_summary(audit: Mapping[str, Any]) -> dict:
    if "safe" in audit:
        keys = ("safe", "fp16_output_finite", "max_activation", "max_activation_layer", "overflowing_layers", "inputs",
                "resolutions")
        return {k: audit[k] for k in keys if k in audit}
    return {str(k): dict(v) for k, v in audit.items()}


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what}={path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}={path}: not a readable JSON file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}={path}: holds a {type(obj).__name__}, expected a JSON object")
    return obj


def from_latent_stats(stats: Mapping[str, Any], convention: str | None = None) -> dict:
    """ExportInfo fields from ``vaetrain latent-stats``' result: per-channel latents_mean/std, and with ``convention``
    (shift_and_scale | scale_only | scale_only_rms) the scaling/shift factors it suggests."""
    try:
        out: dict[str, Any] = {"latents_mean": tuple(stats["per_channel_mean"]),
                               "latents_std": tuple(stats["per_channel_std"])}
        if convention is not None:
            if convention not in LATENT_CONVENTIONS:
                raise UserError(f"latent_convention={convention!r}: use one of {', '.join(LATENT_CONVENTIONS)}")
            out.update(scaling_factor=float(stats["suggested"][convention]["scaling_factor"]),
                       shift_factor=float(stats["suggested"][convention]["shift_factor"]))
    except (KeyError, TypeError) as e:
        raise UserError(f"latent_stats: not vaetrain latent-stats output (missing {e})") from None
    return out


def check_latent_stats(info: ExportInfo, latent_channels: int) -> None:
    for key in ("latents_mean", "latents_std"):
        value = getattr(info, key)
        if value is not None and len(value) != latent_channels:
            raise UserError(f"{key} has {len(value)} values but the model has {latent_channels} latent channels; "
                            f"measure them with `vaetrain latent-stats` on this model")


def export_dtype(ae, info: ExportInfo) -> torch.dtype:
    name = info.dtype
    if name == "auto":
        name = _SOURCE_DTYPES.get(getattr(ae, "source_dtype", None) or "", "fp32")
    return DTYPES[name]


def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype``; integer buffers (BatchNorm's step count) stay as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def default_sample_size(latent_space: str | None) -> int:
    """diffusers' ``sample_size`` (its tile size when tiling) when the training size is not given: the space's
    native resolution."""
    return 512 if latent_space in (None, "sd1") else 1024


def conventions(ae, info: ExportInfo) -> tuple[float, float]:
    """(scaling_factor, shift_factor) to write: the info's overrides, else the model's."""
    scale = info.scaling_factor if info.scaling_factor is not None else ae.scaling_factor
    shift = info.shift_factor if info.shift_factor is not None else ae.shift_factor
    return float(scale), float(shift)


def export_metadata(format: str, info: ExportInfo, latent_space: str | None, problems: Mapping[str, str],
                    dtype: torch.dtype) -> dict:
    """What every export records about itself (safetensors metadata ``vaetrain_export``, the model card)."""
    meta: dict[str, Any] = {"format": format, "dtype": str(dtype).removeprefix("torch."),
                            "latent_space": latent_space, "loaders": dict(problems) or "ComfyUI and A1111 can load it"}
    if info.fp16_audit is not None:
        meta["fp16_safe"] = fp16_safe(info.fp16_audit)
        meta["fp16_audit"] = _audit_summary(info.fp16_audit)
    if info.latents_mean is not None:
        meta["latents_mean"], meta["latents_std"] = list(info.latents_mean), list(info.latents_std or ())
    if info.command:
        meta["command"] = info.command
    if info.metrics:
        meta["metrics"] = dict(info.metrics)
    return meta


def warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, ExportWarning, stacklevel=4)


def write_json_file(path: Path, obj: Mapping) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")
