"""Checkpoint formats: reading, detecting and writing each family's on-disk layouts.

``load_autoencoder`` / ``save_autoencoder`` / ``load_weights`` are the entry points (``loading``); ``ExportInfo``
(``export``) carries what an export needs beyond the weights; ``describe`` / ``build`` (``checkpoint``) turn a vaetrain
model into a plain dict and back. Each format module exposes::

    try_load(path: Path, preset: Preset | None, allow_drop_attention: bool) -> nn.Module | None
        # None: "not my format"; raises CheckpointError: "my format, but broken"
    save(ae: nn.Module, out: Path, format: str, info: ExportInfo) -> Path | None
        # None: "I do not handle this model type / format"
"""

from vaetrain.formats.checkpoint import build, describe
from vaetrain.formats.compat import latent_space
from vaetrain.formats.export import ExportInfo, ExportWarning, fp16_safe
from vaetrain.formats.loading import load_autoencoder, load_weights, save_autoencoder

__all__ = ["ExportInfo", "ExportWarning", "build", "describe", "fp16_safe", "latent_space", "load_autoencoder",
           "load_weights", "save_autoencoder"]
