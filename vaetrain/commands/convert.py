"""``vaetrain convert SOURCE OUT [format=...]``: load any supported checkpoint, write it in another format."""

from __future__ import annotations

from pathlib import Path

from vaetrain.formats.io import CheckpointError
from vaetrain.formats.loading import load_autoencoder, save_autoencoder


def convert(source, out, format: str = "diffusers", preset: str | None = None, subfolder: str | None = None,
            allow_drop_attention: bool = False) -> Path:
    """``vaetrain convert SRC OUT format=...``: load anything supported, write it in ``format``."""
    ae = load_autoencoder(source, preset=preset, subfolder=subfolder, allow_drop_attention=allow_drop_attention)
    try:
        written = save_autoencoder(ae, out, format=format)
    except ValueError as e:
        raise CheckpointError(f"{out}: {e}") from None
    print(f"wrote {type(ae).__name__} ({format}) to {written}")
    return written
