"""``DataSpec``: every option of the data module, one frozen object whose field names are the ``data.*`` keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vaetrain.data.faults import DataError
from vaetrain.data.images import Preprocess

SOURCES = ("synthetic", "folder", "webdataset", "cached")
OUTPUTS = ("uint8", "float")


@dataclass(frozen=True)
class DataSpec:
    """What to read and how (see ``conf/data/*.yaml`` for a line on each key)."""

    source: str = "synthetic"
    shards: str | tuple[str, ...] | None = None
    folder: str | tuple[str, ...] | None = None
    allow_pipe: bool = False
    # preprocessing (vaetrain.data.images.Preprocess)
    image_size: int = 256
    aspect_ratio: float = 1.0
    crop: str = "random"
    flip: bool = True
    resize_to: int | None = None
    scale: tuple[float, float] | None = None
    native_fraction: float = 0.0
    resample: str = "bicubic"
    min_size: int = 0
    # order and batching
    batch_size: int = 8
    num_workers: int = 2
    output: str = "uint8"
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_length: int | None = None
    drop_last: bool = True
    seed: int = 0
    # faults
    max_skip_rate: float = 0.05
    min_samples_for_skip_rate: int = 200
    # the synthetic source
    synthetic_count: int = 10_000
    # validation
    val_folder: str | None = None
    val_image_size: int | None = None
    val_count: int = 24
    val_batch_size: int | None = None
    # loader processes
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    # latent caches
    expect_cache_meta: dict | None = None
    # image sources: train from the teacher's cached latents instead (built once when missing; see
    # vaetrain.commands.cache_latents.ensure_latent_cache): null (off), auto or a folder the caches are kept under
    latent_cache: str | None = None
    latent_cache_passes: int = 1   # differently cropped / flipped copies of the data in the cache
    # distribution (None: the trainer's)
    rank: int | None = None
    world_size: int | None = None

    @classmethod
    def from_options(cls, **options: Any) -> "DataSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise DataError(f"data.{unknown[0]}: no such data option; the options are {', '.join(sorted(names))}")
        return cls(**options)

    def __post_init__(self):
        for key in ("shards", "folder", "scale"):
            v = getattr(self, key)
            if isinstance(v, list):
                object.__setattr__(self, key, tuple(v))
        if self.expect_cache_meta is not None:
            object.__setattr__(self, "expect_cache_meta", dict(self.expect_cache_meta))
        bad = self._problem()
        if bad:
            raise DataError(bad)
        self.preprocess()  # validates the crop options

    def _problem(self) -> str | None:
        def positive_int(key: str, minimum: int = 1, optional: bool = False) -> str | None:
            v = getattr(self, key)
            if optional and v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                return f"data.{key}={v!r}: use an integer >= {minimum}" + (" or null" if optional else "")
            return None

        if self.source not in SOURCES:
            return f"data.source={self.source!r}: use one of {', '.join(SOURCES)}"
        if self.source in ("webdataset", "cached") and not self.shards:
            return f"data.source={self.source} needs data.shards= (paths, a brace pattern, a folder of .tar or URLs)"
        if self.source == "folder" and not self.folder:
            return "data.source=folder needs data.folder= (one or more image folders)"
        if self.source == "cached" and self.flip:
            return ("data.flip=true with data.source=cached: latents are cached for one orientation; set "
                    "data.flip=false (choose flips when building the cache)")
        if self.output not in OUTPUTS:
            return f"data.output={self.output!r}: use 'uint8' (normalised on the device) or 'float'"
        for key, minimum, optional in (("batch_size", 1, False), ("num_workers", 0, False),
                                       ("shuffle_buffer", 0, False), ("epoch_length", 1, True),
                                       ("synthetic_count", 1, False), ("val_count", 0, False),
                                       ("val_image_size", 8, True), ("val_batch_size", 1, True),
                                       ("prefetch_factor", 1, False), ("min_samples_for_skip_rate", 1, False),
                                       ("seed", 0, False), ("rank", 0, True), ("world_size", 1, True),
                                       ("latent_cache_passes", 1, False)):
            bad = positive_int(key, minimum, optional)
            if bad:
                return bad
        if self.epoch_length is not None and self.epoch_length < self.batch_size:
            return (f"data.epoch_length={self.epoch_length}: samples per rank per epoch, at least one batch "
                    f"(data.batch_size={self.batch_size})")
        if self.resampled and not self.epoch_length:
            return "data.resampled=true needs data.epoch_length (samples per rank per epoch)"
        if not isinstance(self.max_skip_rate, (int, float)) or not 0 <= self.max_skip_rate <= 1:
            return f"data.max_skip_rate={self.max_skip_rate!r}: use a fraction in [0, 1]"
        if (self.rank is None) != (self.world_size is None) or (self.rank is not None and self.rank >= self.world_size):
            return f"data.rank={self.rank} / data.world_size={self.world_size}: set both (0 <= rank < world_size) or neither"
        return None

    def preprocess(self) -> Preprocess:
        return Preprocess(image_size=self.image_size, aspect_ratio=self.aspect_ratio, crop=self.crop, flip=self.flip,
                          resize_to=self.resize_to, scale=self.scale, native_fraction=self.native_fraction,
                          resample=self.resample, min_size=self.min_size)

    def replace(self, **changes: Any) -> "DataSpec":
        return dataclasses.replace(self, **changes)
