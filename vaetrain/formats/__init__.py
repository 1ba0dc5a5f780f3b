"""Checkpoint formats: reading, detecting and writing each family's on-disk layouts.

``load_autoencoder`` / ``save_autoencoder`` / ``load_weights`` are the entry points (``loading``); each
format module exposes::

    try_load(path: Path, preset: Preset | None, allow_drop_attention: bool) -> Autoencoder | None
        # None: "not my format"; raises CheckpointError: "my format, but broken"
    save(ae: Autoencoder, out: Path, format: str) -> Path | None
        # None: "I do not handle this model type"
"""

from vaetrain.formats.loading import load_autoencoder, load_weights, save_autoencoder

__all__ = ["load_autoencoder", "load_weights", "save_autoencoder"]
