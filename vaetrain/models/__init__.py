"""Model zoo: one loading and one saving entry point for every supported autoencoder.

Architectures live one per file here; on-disk layouts (detection, key maps, writers) live in
``vaetrain.formats``. Each format module exposes::

    try_load(path: Path, preset: Preset | None, allow_drop_attention: bool) -> Autoencoder | None
        # None: "not my format"; raises CheckpointError: "my format, but broken"
    save(ae: Autoencoder, out: Path, format: str) -> Path | None
        # None: "I do not handle this model type"
"""

from __future__ import annotations

from vaetrain.models.base import Autoencoder

__all__ = ["Autoencoder", "load_autoencoder", "load_weights", "save_autoencoder"]


def load_autoencoder(source, preset: str | None = None, subfolder: str | None = None, *,
                     allow_drop_attention: bool = False) -> Autoencoder:
    from vaetrain.formats import loading

    return loading.load_autoencoder(source, preset=preset, subfolder=subfolder,
                                    allow_drop_attention=allow_drop_attention)


def save_autoencoder(ae: Autoencoder, out_path, format: str = "diffusers"):
    from vaetrain.formats import loading

    return loading.save_autoencoder(ae, out_path, format=format)


def load_weights(ae: Autoencoder, source, allow_drop_attention: bool = False, subfolder: str | None = None) -> Autoencoder:
    """Load a checkpoint into an existing model (e.g. a student initialised from its teacher)."""
    from vaetrain.formats import loading

    return loading.load_weights(ae, source, allow_drop_attention=allow_drop_attention, subfolder=subfolder)
