"""``vaetrain cache-latents``: encode a dataset once with the frozen teacher, then train from the cache.

Decoder distillation spends most of its compute in the teacher's encoder; caching its posterior removes
that cost from every later epoch. The format (and the check that refuses a stale cache) is
``vaetrain.data.latent_cache``; the images are the data module's own, preprocessed as configured.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from vaetrain.convention import uint8_to_model
from vaetrain.data.datamodule import ImageDataModule
from vaetrain.data.faults import DataError, totals
from vaetrain.data.latent_cache import DTYPES, encode_record, make_meta, posterior
from vaetrain.data.tars import ShardWriter
from vaetrain.models.base import Autoencoder
from vaetrain.safe import atomic_write_json


def cache_latents(teacher: Autoencoder, data: ImageDataModule, output: str, teacher_b: Autoencoder | None = None,
                  dtype: str = "fp16", device: str = "auto", samples_per_shard: int = 1000,
                  max_samples: int | None = None, rank: int | None = None, world_size: int | None = None) -> dict:
    """Encode ``data`` (one ordered pass, no shuffle) with ``teacher`` into cache shards.

    Each rank (``rank``/``world_size``, default from $RANK/$WORLD_SIZE) encodes its own share of the data's
    shards/files into ``OUTPUT/cache-rRRR-NNNNNN.tar``; rank 0 also writes ``OUTPUT/cache_meta.json``. Read
    the result with ``data=cached data.shards=OUTPUT`` and the same preprocessing options.
    """
    if dtype not in DTYPES:
        raise DataError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if not teacher.has_encoder:
        raise DataError(f"teacher {type(teacher).__name__} has no encoder: cache-latents needs one")
    if teacher_b is not None and not teacher_b.has_encoder:
        raise DataError(f"teacher_b {type(teacher_b).__name__} has no encoder")
    if data.source == "cached":
        raise DataError("data: cache-latents reads images (data=synthetic, folder or webdataset), not a cache")
    if data.spec.output != "uint8":
        raise DataError("data.output must be 'uint8' to build a cache")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    teachers = [t.to(dev).eval().requires_grad_(False) for t in (teacher, teacher_b) if t is not None]
    loader = data.loader(rank=rank, world_size=world_size, one_pass=True)
    out = Path(output)
    writer: ShardWriter | None = None
    meta = None
    n, t0, t_enc = 0, time.perf_counter(), 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                img = batch["image"]
                x = uint8_to_model(img.to(dev, non_blocking=True))
                t1 = time.perf_counter()
                mean, logvar = posterior(teachers[0], x)
                latent_b = teachers[1].encode(x) if len(teachers) > 1 else None
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_enc += time.perf_counter() - t1
                if writer is None:
                    meta = make_meta(teacher, teacher_b, data.spec.preprocess(), dtype, data.spec.seed,
                                     has_logvar=logvar is not None)
                    writer = ShardWriter(out, f"cache-r{rank:03d}", max_samples=samples_per_shard, max_bytes=1 << 40,
                                         header={"json": json.dumps(meta, sort_keys=True).encode()})
                for i, key in enumerate(batch["__key__"]):
                    if max_samples is not None and n >= max_samples:
                        break
                    rec = encode_record(img[i], mean[i], logvar[i] if logvar is not None else None,
                                        latent_b[i] if latent_b is not None else None, dtype)
                    writer.write(f"{n:08d}", {"safetensors": rec, "json": json.dumps({"source": key}).encode()})
                    n += 1
                if max_samples is not None and n >= max_samples:
                    break
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise DataError(f"rank {rank}: the data gave no images to cache")
    shards = writer.close()
    seconds = time.perf_counter() - t0
    summary = {"rank": rank, "world_size": world_size, "samples": n, "shards": shards, "seconds": seconds,
               "encode_seconds": t_enc, "skips": totals(loader.counts()), "meta": meta}
    if rank == 0:
        atomic_write_json(out / "cache_meta.json", meta, indent=1)
    atomic_write_json(out / f"manifest-r{rank:03d}.json", summary, indent=1)
    print(f"vaetrain cache-latents: rank {rank}: {n} samples in {len(shards)} shards, {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.1f} img/s, teacher {t_enc:.1f} s) -> {out}")
    return summary
