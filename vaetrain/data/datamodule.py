"""``ImageDataModule``: training batches from one ``DataSpec``, resumable at any step; validation images.

Training batches are ``{"image": (B, 3, H, W) uint8 (or float in [-1, 1]), ["latent", "logvar", "latent_b"],
"__key__": [B]}``. Sources: ``synthetic`` (offline default), ``folder`` (recursive), ``webdataset``
(paths, brace patterns, folders of .tar, ``pipe:`` with ``allow_pipe``, http(s)://, s3://) and ``cached``
(``vaetrain cache-latents`` output, refused when it does not match the teacher or the preprocessing).
With ``epoch_length`` every rank yields exactly ``epoch_length // batch_size`` batches per epoch (no DDP
hang on uneven shards); ``resampled`` draws shards with replacement, otherwise each rank cycles over its
own disjoint share. Checkpoints carry the loader's position and skip counts, so a run resumed from any
step continues with the very next sample.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vaetrain.data import faults
from vaetrain.data.faults import DataError, SkipSample
from vaetrain.data.images import Preprocess, list_images, open_image, synthetic_image
from vaetrain.data.latent_cache import check_meta, expectation, read_meta, teacher_fingerprint
from vaetrain.data.loader import STATE_VERSION, ResumableLoader
from vaetrain.data.pipeline import StreamingImages
from vaetrain.data.sources import units_of
from vaetrain.data.spec import DataSpec


class ValImages(Dataset):
    """A fixed validation set: the first ``count`` images of a folder (sorted), or synthetic ones; centre crops."""

    def __init__(self, files: list[str] | None, count: int, size: int, seed: int):
        self.files, self.seed = files, seed
        self.prep = Preprocess(image_size=size, crop="center", flip=False)
        self.n = min(count, len(files)) if files is not None else count

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        size = self.prep.image_size
        if self.files is None:
            img = synthetic_image(10_000_000 + i, self.seed, size * 5 // 4, size)
            key = f"synthetic-val-{i:04d}"
        else:
            key = self.files[i]
            try:
                img = open_image(Path(key).read_bytes(), draft_short=self.prep.draft_short(False))
            except (SkipSample, OSError) as e:
                raise DataError(f"validation image {key} cannot be used ({e}); remove it from data.val_folder") from None
        arr = self.prep.apply(img, random.Random(i))
        return {"image": torch.from_numpy(arr.copy()).permute(2, 0, 1), "__key__": key}  # (3, S, S)


class ImageDataModule(pl.LightningDataModule):
    """``ImageDataModule(spec)`` or ``ImageDataModule(**data_options)`` (the keys of ``DataSpec``)."""

    def __init__(self, spec: DataSpec | None = None, **options: Any):
        super().__init__()
        if spec is None:
            spec = DataSpec.from_options(**options)
        elif options:
            spec = spec.replace(**options)
        self.spec = spec
        self._expect: dict = dict(spec.expect_cache_meta or {})
        self._train: ResumableLoader | None = None
        self._pending_state: dict | None = None

    @property
    def source(self) -> str:
        return self.spec.source

    # --- cache guard ----------------------------------------------------------------------
    def expect_teacher(self, teacher, teacher_b=None) -> None:
        """Require cached latents to come from these teacher weights (``teacher_fingerprint``)."""
        self._expect["teacher"] = teacher_fingerprint(teacher)
        if teacher_b is not None:
            self._expect["teacher_b"] = teacher_fingerprint(teacher_b)

    def cache_expectation(self) -> dict:
        exp = expectation(self.spec.preprocess(), extra=self._expect)
        # a reader never flips (data.flip must be false for a cache): whether the cache was built with random
        # flips is the builder's choice, recorded in its meta, not a mismatch
        exp.pop("preprocess.flip", None)
        return exp

    # --- distribution ---------------------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        if self.spec.rank is not None:
            return self.spec.rank, self.spec.world_size
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _units(self) -> tuple[list[str], dict | None]:
        units = units_of(self.spec)
        expect = None
        if self.spec.source == "cached":
            expect = self.cache_expectation()
            check_meta(read_meta(units[0]), expect, units[0])  # in this process, before any worker starts
        return units, expect

    def loader(self, *, rank: int | None = None, world_size: int | None = None,
               one_pass: bool = False) -> ResumableLoader:
        """A training loader for one rank (default: this module's); ``one_pass``: one ordered pass over the
        rank's share (``cache-latents``)."""
        spec = self.spec
        r, w = self.rank_and_world()
        r, w = (r if rank is None else rank), (w if world_size is None else world_size)
        units, expect = self._units()
        if w > 1 and not spec.epoch_length and not one_pass:
            raise DataError(f"data.epoch_length (samples per rank per epoch) must be set for {w}-process training: "
                            f"every rank has to yield the same number of batches")
        dataset = StreamingImages(spec, units, r, w, one_pass=one_pass, expect_cache_meta=expect)
        order = {"source": spec.source, "units": _digest(units), "seed": spec.seed, "batch_size": spec.batch_size,
                 "num_workers": spec.num_workers, "rank": r, "world_size": w, "shuffle": dataset.shuffle,
                 "shuffle_buffer": spec.shuffle_buffer, "resampled": dataset.resampled,
                 "epoch_length": dataset.epoch_length, "drop_last": spec.drop_last}
        return ResumableLoader(dataset, num_workers=spec.num_workers,
                               pin_memory=spec.pin_memory and torch.cuda.is_available(),
                               persistent_workers=spec.persistent_workers and not one_pass,
                               prefetch_factor=spec.prefetch_factor, order=order)

    def train_dataloader(self) -> ResumableLoader:
        loader = self.loader()
        loader.track_consumption = getattr(self, "trainer", None) is not None
        if self._train is not None and self._pending_state is None:
            self._pending_state = self._train.state_dict()  # a reload continues where the last loader was
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        spec = self.spec
        files = None
        if spec.val_folder:
            try:
                files = list_images(spec.val_folder)
            except FileNotFoundError:
                raise DataError(f"data.val_folder: image folder {spec.val_folder} does not exist") from None
        ds = ValImages(files, spec.val_count, spec.val_image_size or spec.image_size, spec.seed)
        workers = min(spec.num_workers, 2)
        return DataLoader(ds, batch_size=spec.val_batch_size or spec.batch_size, shuffle=False, num_workers=workers,
                          pin_memory=spec.pin_memory and torch.cuda.is_available())

    def set_epoch(self, epoch: int) -> None:
        """The next training epoch (from its start): its order and crops derive from (seed, epoch)."""
        if self._train is None:
            self._pending_state = {**self._blank_state(), "next_epoch": epoch}
        else:
            self._train.set_epoch(epoch)

    def _blank_state(self) -> dict:
        return {"version": STATE_VERSION, "next_epoch": 0, "resume": None, "base": faults.zeros(), "workers": {}, "order": None}

    # --- faults and state -----------------------------------------------------------------
    def skip_stats(self) -> dict[str, int]:
        """This rank's counts up to the last trained batch: one entry per reason, plus ``samples``."""
        if self._train is not None:
            return faults.totals(self._train.counts())
        st = self._pending_state
        if st and "ranks" in st:
            st = st["ranks"].get(self.rank_and_world()[0])
        counts = faults.zeros()
        if st:
            counts = list(st["base"])
            for c in st["workers"].values():
                counts = faults.add(counts, c)
        return faults.totals(counts)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if self._train is not None and trainer is not None and trainer.training:
            self._train.consume()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (per rank and loader worker) and skip counts, saved in checkpoints."""
        if self._train is not None:
            return {"loader": self._train.state_dict()}
        return {"loader": self._pending_state} if self._pending_state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader_state = state.get("loader")
        if not loader_state and "next_epoch" in state:
            # a checkpoint of vaetrain <= 0.1 kept the next epoch and the skip totals only
            old = state.get("skip_stats") or {}
            base = [int(old.get(r, 0)) for r in faults.REASONS] + [int(old.get("samples", 0))]
            loader_state = {**self._blank_state(), "next_epoch": int(state["next_epoch"]), "base": base}
        if not loader_state:
            return
        if self._train is not None:
            self._train.load_state_dict(loader_state)
        else:
            self._pending_state = loader_state


def _digest(units: list[str]) -> str:
    h = hashlib.sha256("\n".join(units).encode("utf-8", "surrogateescape"))
    return f"{len(units)}:{h.hexdigest()[:16]}"
