"""diffusers ``config.json`` from diffusers' own config schema.

A diffusers model's config is the keyword arguments of its ``__init__`` (``@register_to_config``) plus
``_class_name`` and ``_diffusers_version``. diffusers is not a run-time dependency of vaetrain, so the schemas below
copy the signatures (names, order, defaults) of ``AutoencoderKL``, ``AutoencoderKLFlux2`` and ``AutoencoderTiny``;
tests/test_exports.py checks them against the installed diffusers (``inspect.signature``) and checks that
``Class(**config).config`` gives back every value written.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

SCHEMA_VERSION = "0.42.1"  # the diffusers release these signatures were copied from

_KL_COMMON = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 32,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "AutoencoderKL": {
        **_KL_COMMON, "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    },
    "AutoencoderKLFlux2": {
        "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
        "decoder_block_out_channels": None, "layers_per_block": 2, "act_fn": "silu", "latent_channels": 32,
        "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": (2, 2),
    },
    "AutoencoderTiny": {
        "in_channels": 3, "out_channels": 3, "encoder_block_out_channels": (64, 64, 64, 64),
        "decoder_block_out_channels": (64, 64, 64, 64), "act_fn": "relu", "upsample_fn": "nearest",
        "latent_channels": 4, "upsampling_scaling_factor": 2, "num_encoder_blocks": (1, 3, 3, 3),
        "num_decoder_blocks": (3, 3, 3, 1), "latent_magnitude": 3, "latent_shift": 0.5, "force_upcast": False,
        "scaling_factor": 1.0, "shift_factor": 0.0,
    },
}


def diffusers_version() -> str:
    """The installed diffusers' version (read from its package metadata, not imported), else the schema's."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return SCHEMA_VERSION


def diffusers_config(class_name: str, **values) -> dict[str, Any]:
    """The full ``config.json`` dict of ``class_name``: every schema key in signature order, ``values`` over the
    defaults. A key the schema lacks is a bug in the caller (diffusers would ignore it with a warning)."""
    schema = SCHEMAS[class_name]
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise KeyError(f"{class_name} has no config keys {unknown}")
    cfg: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers_version()}
    for key, default in schema.items():
        value = values.get(key, default)
        cfg[key] = list(value) if isinstance(value, tuple) else value  # JSON arrays, as diffusers writes them
    return cfg
