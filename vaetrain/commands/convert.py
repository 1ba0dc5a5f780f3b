"""``vaetrain convert SOURCE OUT [format=...]``: load any supported checkpoint, write it in another format."""

from __future__ import annotations

from pathlib import Path

from vaetrain.formats.export import ExportInfo, from_latent_stats, read_json
from vaetrain.formats.io import CheckpointError
from vaetrain.formats.loading import load_autoencoder, save_autoencoder


def convert(source, out, format: str = "diffusers", preset: str | None = None, subfolder: str | None = None,
            allow_drop_attention: bool = False, weights: str | None = None, dtype: str = "auto",
            taesd_prefix: str | None = None, latent_space: str | None = None, latent_stats: str | None = None,
            latent_convention: str | None = None, scaling_factor: float | None = None,
            shift_factor: float | None = None, sample_size: int | None = None, fp16_audit: str | None = None) -> Path:
    """``vaetrain convert SRC OUT format=...``: load anything supported, write it in ``format``.

    ``latent_stats`` / ``fp16_audit`` are the JSON files ``vaetrain latent-stats out=...`` / ``vaetrain audit-fp16
    out=...`` write; the other options are ``ExportInfo``'s fields.
    """
    stats = from_latent_stats(read_json(latent_stats, "latent_stats"), latent_convention) if latent_stats else {}
    if latent_convention and not latent_stats:
        raise CheckpointError("latent_convention needs latent_stats=PATH (a `vaetrain latent-stats out=...` JSON)")
    info = ExportInfo(dtype=dtype, fp16_audit=read_json(fp16_audit, "fp16_audit") if fp16_audit else None).updated(
        taesd_prefix=taesd_prefix, latent_space=latent_space, sample_size=sample_size, **stats)
    info = info.updated(scaling_factor=scaling_factor, shift_factor=shift_factor)
    if isinstance(source, str) and source.startswith("[") and source.endswith("]"):
        # `vaetrain convert '[enc.pth,dec.pth]' OUT`: the CLI hands a positional argument over as one string
        source = [s.strip() for s in source[1:-1].split(",") if s.strip()]
    ae = load_autoencoder(source, preset=preset, subfolder=subfolder, allow_drop_attention=allow_drop_attention,
                          weights=weights)
    try:
        written = save_autoencoder(ae, out, format=format, info=info)
    except ValueError as e:
        raise CheckpointError(f"{out}: {e}") from None
    print(f"wrote {type(ae).__name__} ({format}) to {written}")
    return written
