"""vaetrain's own files: model descriptions, Lightning ``.ckpt`` files of training runs, native safetensors.

``describe(model)`` is the class path and the params dataclass as plain JSON-able values (what the engine stores in
every checkpoint as ``checkpoint["vaetrain"]["student"]``, readable with ``torch.load(weights_only=True)``);
``build(description)`` makes the model again, for the vaetrain model classes only (a checkpoint cannot name code).

A run's ``.ckpt`` holds the student under ``state_dict["student.*"]`` and its EMA under ``state_dict["ema.module.*"]``;
``try_load`` returns the EMA weights when there are any (``weights="student"`` for the raw student). Checkpoints of
runs from before descriptions were stored are rebuilt from the run config's ``student`` entry when it names a model
class, or from the keys and shapes when the student is an AutoencoderKL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from vaetrain.formats import kl
from vaetrain.formats.export import ExportInfo, cast, export_dtype
from vaetrain.formats.io import (CheckpointError, check_and_load, float_dtype, read_checkpoint, read_metadata,
                                 write_safetensors)
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.base import HasParams
from vaetrain.models.interposer import LatentInterposer
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.presets import get_preset
from vaetrain.models.taesd import TAESD
from vaetrain.models.vae_approx import VAEApprox

MODEL_CLASSES: dict[str, type] = {f"{c.__module__}.{c.__qualname__}": c for c in (
    AutoencoderKL, TAESD, MLPAutoencoder, VAEApprox, LatentInterposer, NLayerDiscriminator)}
NATIVE_KEY = "vaetrain_model_description"  # safetensors metadata of format=safetensors files: JSON of describe()
WEIGHTS = ("ema", "student")
_PREFIXES = {"ema": "ema.module.", "student": "student."}


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def describe(model: nn.Module) -> dict[str, Any]:
    """``{"class": "vaetrain.models.taesd.TAESD", "params": {...}, "latent_space": ...}`` of a vaetrain model."""
    if not isinstance(model, HasParams):
        raise TypeError(f"{type(model).__name__} is not a vaetrain model (no params dataclass): cannot describe it")
    out = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
           "params": {k: _plain(v) for k, v in dataclasses.asdict(model.params).items()}}
    if getattr(model, "latent_space", None):
        out["latent_space"] = model.latent_space
    return out


def build(description: Mapping[str, Any], path="<description>") -> nn.Module:
    """The (freshly initialised) model ``description`` names; ``CheckpointError`` for anything else."""
    if not isinstance(description, Mapping) or "class" not in description:
        raise CheckpointError(f"{path}: not a vaetrain model description (expected {{'class': ..., 'params': ...}})")
    cls = MODEL_CLASSES.get(description["class"])
    if cls is None:
        raise CheckpointError(f"{path}: names {description['class']!r}, which is not a vaetrain model class "
                              f"({', '.join(c.__name__ for c in MODEL_CLASSES.values())})")
    try:
        model = cls.from_params(cls.Params(**dict(description.get("params") or {})))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build {cls.__name__} from its description: "
                              f"{' '.join(str(e).split())}") from None
    if description.get("latent_space"):
        model.latent_space = description["latent_space"]
    return model


# --- reading --------------------------------------------------------------------------------------------------
def try_load(path, preset=None, allow_drop_attention: bool = False, weights: str | None = None) -> nn.Module | None:
    """A model from a vaetrain run checkpoint or a native safetensors file; None for anything else."""
    if weights is not None and weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r}: use 'ema' or 'student'")
    if isinstance(path, (list, tuple)) or not Path(path).is_file():
        return None
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_native(path, allow_drop_attention)
    if path.suffix not in (".ckpt", ".pt", ".pth"):
        return None
    ckpt = read_checkpoint(path, mmap=True)
    if not (isinstance(ckpt, Mapping) and isinstance(ckpt.get("vaetrain"), Mapping)
            and isinstance(ckpt.get("state_dict"), Mapping)):
        return None  # not a vaetrain run: the other format modules read it
    state = ckpt["state_dict"]
    which = weights or ("ema" if any(k.startswith(_PREFIXES["ema"]) for k in state) else "student")
    prefix = _PREFIXES[which]
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{path}: a vaetrain checkpoint without {which} weights ({prefix}*)"
                              + ("; use weights=student" if which == "ema" else ""))
    description = ckpt["vaetrain"].get("student") or _description_from_config(ckpt["vaetrain"].get("config"))
    if description is None:
        return _load_undescribed(sd, path, preset, allow_drop_attention)
    model = build(description, path)
    return _fill(model, sd, path, allow_drop_attention)


def _description_from_config(config) -> dict | None:
    """Older checkpoints: the run config's ``student`` entry, when its ``_target_`` is a vaetrain model class."""
    student = config.get("student") if isinstance(config, Mapping) else None
    if not isinstance(student, Mapping) or student.get("_target_") not in MODEL_CLASSES:
        return None
    return {"class": student["_target_"], "params": {k: v for k, v in student.items() if not k.startswith("_")}}


def _load_undescribed(sd: dict, path: Path, preset, allow_drop_attention: bool) -> nn.Module:
    found = kl.extract(sd)
    if found is None:
        raise CheckpointError(f"{path}: this vaetrain checkpoint does not record its student's architecture "
                              f"(written before descriptions were stored) and it is not an AutoencoderKL; "
                              f"use the run's export/ folder instead")
    return kl.build(found, path, {}, get_preset(preset), allow_drop_attention)


def _fill(model: nn.Module, sd: dict, path: Path, allow_drop_attention: bool) -> nn.Module:
    dropped = []
    if allow_drop_attention and isinstance(model, AutoencoderKL):
        dropped = sorted(k for k in sd if kl.ATTN in k)
        if dropped:
            model = AutoencoderKL.from_params(dataclasses.replace(model.params, encoder_attention=False,
                                                                  decoder_attention=False))
            sd = {k: v for k, v in sd.items() if kl.ATTN not in k}
    check_and_load(model, sd, path)
    model.source_dtype = float_dtype(sd)
    if dropped:
        kl.report_dropped(path, dropped)
    return model.eval()


def _load_native(path: Path, allow_drop_attention: bool) -> nn.Module | None:
    meta = read_metadata(path)
    if NATIVE_KEY not in meta:
        return None
    try:
        description = json.loads(meta[NATIVE_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its {NATIVE_KEY} metadata is not valid JSON") from None
    return _fill(build(description, path), read_checkpoint(path), path, allow_drop_attention)


# --- writing --------------------------------------------------------------------------------------------------
def save(model: nn.Module, out, format: str, info: ExportInfo | None = None) -> Path | None:
    """``format="safetensors"``: any vaetrain model as ``<out>/<class>.safetensors`` (its own state-dict keys, its
    description in the metadata), which ``load_autoencoder`` reads back. None for other formats."""
    if format != "safetensors":
        return None
    if not isinstance(model, HasParams):
        raise ValueError(f"{type(model).__name__} is not a vaetrain model: cannot save it as format=safetensors")
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / f"{type(model).__name__.lower()}.safetensors"
    dtype = export_dtype(model, info or ExportInfo())
    return write_safetensors(cast(model.state_dict(), dtype), out,
                             {NATIVE_KEY: json.dumps(describe(model)), "format": "pt"})
