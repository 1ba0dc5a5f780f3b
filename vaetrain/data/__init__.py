"""Training data for vaetrain: one webdataset pipeline for shards, image folders, procedural images and latent caches.

Modules, by what changes together: ``images`` (open, to RGB, crops and resampling), ``tars`` (strict tar
reader, shard writer), ``sources`` (units of each source, URL opening, raw-sample stages), ``pipeline``
(the per-worker webdataset pipeline and its resumable state), ``loader`` (the stateful loader),
``latent_cache`` (the cache format, fingerprint and checks), ``spec`` (``DataSpec``: the ``data.*``
options), ``datamodule`` (``ImageDataModule``), ``faults`` (skip reasons and ``DataError``).
"""

from vaetrain.data.datamodule import ImageDataModule, ValImages
from vaetrain.data.faults import REASONS, DataError, SkipSample
from vaetrain.data.images import IMAGE_EXTS, Preprocess, crop_resize, list_images, open_image, synthetic_image, to_rgb
from vaetrain.data.spec import DataSpec

__all__ = ["ImageDataModule", "ValImages", "DataSpec", "Preprocess", "DataError", "SkipSample", "REASONS",
           "IMAGE_EXTS", "crop_resize", "list_images", "open_image", "synthetic_image", "to_rgb"]
