"""The training stream: one webdataset pipeline per (rank, loader worker, epoch), resumable at any batch.

Every source flows through the same stages::

    units    wds.ResampledShards (resampled) | wds.SimpleShardList -> split by rank -> wds.split_by_worker
    raw      tar_records -> group_by_keys -> without_meta   (shards)  |  file / synthetic records
    order    wds.shuffle per pass (rng from seed, epoch, rank, worker)
    position Position: counts samples leaving the shuffle; on resume drops the first N unseen (bytes only)
    decode   wds.map(decode, handler=count and skip): EXIF/mode/crop/flip, randomness from the position
    batch    batches (collate)                          .with_epoch(this worker's batches) for fixed epochs

Stages of our own, and what webdataset lacks: ``tar_records`` (strict truncation detection, per-reason
counts, no sleeping handler), the rank split (``wds.split_by_node`` reads the rank from $RANK or the
default process group inside the worker; a spawned worker has neither, and tests and ``cache-latents``
pass ranks explicitly), ``Position`` (webdataset has no resumable state), ``batches`` (see there), and
endless passes over a fixed share (``with_epoch`` ends an epoch at the first pass that yields nothing,
which a fast-forward past whole passes would trigger).

Per-sample randomness (crop window, flip, native or resized) comes from
``random.Random(f"{seed}-{epoch}-{rank}-{worker}-{position}")``, never from a sequential generator that
decoding advances, so skipping samples on resume changes nothing downstream. A worker's state
(``state_dict``) is its epoch, its position, its batch count and its counts per reason; torchdata's
``StatefulDataLoader`` snapshots it with every batch and hands it back to the same worker on resume.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.utils import PipelineStage

from vaetrain.data import faults
from vaetrain.data.faults import REASONS, SAMPLES, SHARD_REASONS, DataError, SkipSample
from vaetrain.data.images import IMAGE_EXTS, open_image, synthetic_image
from vaetrain.data.latent_cache import check_meta, decode_record
from vaetrain.data.sources import (ShardFaults, file_records, grouped, read_file, synthetic_records, tar_records,
                                   without_meta)
from vaetrain.data.spec import DataSpec

_SHARD_INDEX = [REASONS.index(r) for r in SHARD_REASONS]


class Position(PipelineStage):
    """Numbers the samples leaving the shuffle (``__pos__``) and drops the first ``skip`` of them
    (a resumed epoch's already-trained samples: nothing downstream of this stage runs for them)."""

    def __init__(self, skip: int = 0):
        self.pos, self.skip = 0, skip

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            i = self.pos
            self.pos += 1
            if i >= self.skip:
                sample["__pos__"] = i
                yield sample


def split_by_rank(rank: int, world_size: int):
    def stage(src):
        return itertools.islice(src, rank, None, world_size)
    return stage


class StreamingImages(IterableDataset):
    """Batches ``{"image": (B, 3, H, W) uint8, ["latent", "logvar", "latent_b"], "__key__": [B]}``
    of one rank, plus the loader's bookkeeping (``__worker__``, ``__counts__``; a last ``__tally__``
    item per worker and epoch carries the final counts). ``ResumableLoader`` removes the bookkeeping."""

    def __init__(self, spec: DataSpec, units: list[str], rank: int, world_size: int, *,
                 one_pass: bool = False, expect_cache_meta: dict | None = None):
        self.spec, self.units, self.rank, self.world_size = spec, units, rank, world_size
        self.prep = spec.preprocess()
        # one_pass: a single ordered pass over this rank's share, last partial batch included, whatever the
        # epoch options (cache-latents)
        self.one_pass = one_pass
        self.epoch_length = None if one_pass else spec.epoch_length
        self.shuffle = spec.shuffle and not one_pass
        self.resampled = spec.resampled and not one_pass
        self.expect_cache_meta = expect_cache_meta
        # the epoch the next __iter__ streams: written by the main process, read by every worker
        self.epoch_box = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._state: dict | None = None
        self._restored = False

    # --- torchdata's Stateful protocol (called in the worker that owns this copy) ------------
    def state_dict(self) -> dict:
        st = self._state
        if st is None:
            return {}
        return {**st, "sample_counts": list(st["sample_counts"]), "shard_counts": list(st["shard_counts"])}

    def load_state_dict(self, state: dict) -> None:
        self._state = dict(state) if state else None
        self._restored = bool(state)

    def set_epoch(self, epoch: int) -> None:
        self.epoch_box.fill_(epoch)

    # --- the stream ----------------------------------------------------------------------
    def quota(self, worker: int, num_workers: int) -> int | None:
        """Batches this worker yields per epoch (None: one pass over its share)."""
        if not self.epoch_length:
            return None
        total = self.epoch_length // self.spec.batch_size  # per rank
        return total // num_workers + (worker < total % num_workers)

    def _passes(self, epoch: int, worker: int, endless: bool) -> Iterator[Iterator[dict]]:
        """The unit lists this worker reads in turn: one endless resampled draw, or its
        share of the epoch's permutation, pass after pass."""
        seed = self.spec.seed
        if self.resampled:
            # draws with replacement, seeded per (seed, epoch, rank, worker); no split needed
            yield iter(wds.ResampledShards(self.units, seed=seed * 1_000_003 + epoch, deterministic=True,
                                           worker_seed=lambda: self.rank * 1000 + worker))
            return
        # the same permutation on every rank and worker (seeded by the epoch): a disjoint split
        order = wds.SimpleShardList(self.units, seed=seed * 1_000_003 + epoch if self.shuffle else None)
        share = list(wds.split_by_worker(split_by_rank(self.rank, self.world_size)(iter(order))))
        for pass_ in itertools.count():
            yield iter(share)
            if not endless:
                return
            if self.shuffle:  # later passes of a fixed-length epoch: the same share in a new order
                random.Random(f"pass-{seed}-{epoch}-{self.rank}-{worker}-{pass_}").shuffle(share)

    def _ordered(self, epoch: int, worker: int, endless: bool, count_shard) -> Iterator[dict]:
        """Raw samples in this epoch's order. The shuffle buffer is drained at the end of each pass, so an
        epoch of one pass sees every sample of the share exactly once."""
        spec = self.spec
        shuffle = None
        if self.shuffle and spec.shuffle_buffer > 1:
            rng = random.Random(f"shuffle-{spec.seed}-{epoch}-{self.rank}-{worker}")
            shuffle = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)
        for units in self._passes(epoch, worker, endless):
            raw = self._raw(units, count_shard)
            yield from shuffle(raw) if shuffle is not None else raw

    def _raw(self, units: Iterator[dict], count_shard) -> Iterator[dict]:
        source = self.spec.source
        if source == "synthetic":
            return synthetic_records(units)
        if source == "folder":
            return file_records(units)
        # a stretch of shards with no sample at all: two passes over a fixed share, or 64 resampled draws
        limit = 64 if self.resampled else max(2 * len(self.units), 2)
        samples = grouped(tar_records(units, ShardFaults(count_shard, limit)), count_shard)
        return without_meta(samples, self._check_meta if source == "cached" else None)

    def _check_meta(self, sample: dict, url: str) -> None:
        if self.expect_cache_meta is not None:
            try:
                meta = json.loads(sample.get("json", b"null"))
            except ValueError:
                meta = None
            check_meta(meta, self.expect_cache_meta, url)

    def _decode(self, sample: dict, epoch: int, worker: int) -> dict:
        rng = random.Random(f"{self.spec.seed}-{epoch}-{self.rank}-{worker}-{sample['__pos__']}")
        key = sample["__key__"]
        source = self.spec.source
        if source == "cached":
            w, h = self.prep.out_size
            rec = decode_record(sample.get("safetensors", b""), (3, h, w))
            return {**rec, "__key__": key}
        native = self.prep.pick_native(rng)
        if source == "synthetic":
            w, h = self.prep.out_size
            img = synthetic_image(sample["__synthetic__"], self.spec.seed, w * 3 // 2, h * 5 // 4)
        else:
            data = read_file(sample) if source == "folder" else _image_bytes(sample)
            img = open_image(data, self.prep.min_size, draft_short=self.prep.draft_short(native))
        return {"image": self.prep.apply(img, rng, native), "__key__": key}

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        first = items[0]
        out: dict[str, Any] = {}
        if isinstance(first["image"], np.ndarray):  # (H, W, 3) from PIL
            h, w = first["image"].shape[:2]
            arr = np.empty((len(items), 3, h, w), dtype=np.uint8)  # (B, 3, H, W)
            for i, it in enumerate(items):
                arr[i] = it["image"].transpose(2, 0, 1)
            img = torch.from_numpy(arr)
        else:
            img = torch.stack([it["image"] for it in items])  # (B, 3, H, W)
        out["image"] = img.float().div_(127.5).sub_(1) if self.spec.output == "float" else img
        for k in first:
            if k not in ("image", "__key__"):
                out[k] = torch.stack([it[k] for it in items])  # (B, C, h, w)
        out["__key__"] = [it["__key__"] for it in items]
        return out

    def _batches(self, partial: bool):
        # webdataset's `batched` holds a full batch until the next sample arrives (one decode ahead), which
        # would put the saved position and counts past the batch; this one yields as the batch fills
        def stage(src: Iterator[dict]) -> Iterator[dict]:
            buf: list[dict] = []
            for item in src:
                buf.append(item)
                if len(buf) == self.spec.batch_size:
                    yield self._collate(buf)
                    buf = []
            if buf and partial:
                yield self._collate(buf)
        return stage

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        spec = self.spec
        epoch = int(self.epoch_box.item())
        st = self._state if self._restored and self._state and self._state.get("epoch") == epoch else None
        self._restored = False
        if st is None:
            st = {"epoch": epoch, "pos": 0, "batches": 0, "done": False, "bad_streak": 0,
                  "sample_counts": faults.zeros(), "shard_counts": faults.zeros()}
        else:
            # shard faults are counted again as the replay re-reads the bytes before the saved position
            st = {**st, "sample_counts": list(st["sample_counts"]), "shard_counts": faults.zeros()}
        self._state = st
        if st["done"]:
            return
        quota = self.quota(worker, num_workers)
        if quota is not None and not self.resampled and not self.units[self.rank::self.world_size][worker::num_workers]:
            raise DataError(f"data: rank {self.rank} loader worker {worker} has no {spec.source} units "
                            f"({len(self.units)} for {self.world_size} ranks x {num_workers} workers); use "
                            f"data.resampled=true, fewer data.num_workers, or more shards")
        sample_counts, shard_counts = st["sample_counts"], st["shard_counts"]
        streak_limit = max(1000, 10 * spec.min_samples_for_skip_rate)

        def counts() -> list[int]:
            return faults.add(sample_counts, shard_counts)

        def count_shard(reason: str) -> None:
            shard_counts[REASONS.index(reason)] += 1

        def skip(exn: Exception) -> bool:
            if not isinstance(exn, SkipSample):
                raise exn
            sample_counts[REASONS.index(exn.reason)] += 1
            st["bad_streak"] += 1
            faults.check_skip_rate(counts(), spec.max_skip_rate, spec.min_samples_for_skip_rate,
                                   f"data: rank {self.rank} loader worker {worker}")
            if st["bad_streak"] >= streak_limit:
                raise DataError(f"data: rank {self.rank} loader worker {worker}: no usable sample in the last "
                                f"{st['bad_streak']} ({faults.summary(counts())}); check the data")
            return True

        def decode(sample: dict) -> dict:
            item = self._decode(sample, epoch, worker)
            sample_counts[SAMPLES] += 1
            st["bad_streak"] = 0
            return item

        position = Position(skip=st["pos"])
        pipeline = wds.DataPipeline(
            lambda: self._ordered(epoch, worker, quota is not None, count_shard),
            position, wds.map(decode, handler=skip), self._batches(quota is None and (self.one_pass or not spec.drop_last)))
        if quota is not None:
            # a fixed-length epoch: the unit stream is endless, with_epoch cuts this worker's share
            pipeline = pipeline.with_epoch(nbatches=quota - st["batches"]) if quota > st["batches"] else []
        for batch in pipeline:
            st["batches"] += 1
            st["pos"] = position.pos
            batch["__worker__"] = worker
            batch["__counts__"] = counts()
            yield batch
        if quota is not None and st["batches"] < quota:
            raise DataError(f"data: rank {self.rank} loader worker {worker} filled {st['batches']} of its {quota} "
                            f"batches of epoch {epoch} ({faults.summary(counts())}); check the data")
        st["pos"], st["done"] = position.pos, True
        yield {"__worker__": worker, "__counts__": counts(), "__tally__": True}


def _image_bytes(sample: dict) -> bytes:
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if data is None:  # compound extensions some writers use, e.g. KEY.image.jpg
        data = next((v for k, v in sample.items() if k.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if data is None:
        raise SkipSample("no_image", sample["__key__"])
    return data

