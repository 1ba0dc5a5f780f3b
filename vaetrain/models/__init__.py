"""Architectures, one per file (``autoencoder_kl``, ``taesd``, ``mlp``, ``vae_approx``, ``interposer``,
``patchgan``), the ``Autoencoder`` face they share (``base``) and the named public models (``presets``).

Loading and saving checkpoints is ``vaetrain.formats`` (``load_autoencoder``, ``save_autoencoder``).
"""

from vaetrain.models.base import Autoencoder

__all__ = ["Autoencoder"]
