"""``vaetrain cache-latents``: encode a dataset once with the frozen teacher, then train from the cache.

Decoder distillation spends most of its compute in the teacher's encoder; caching its posterior removes
that cost from every later epoch. The format (and the check that refuses a stale cache) is
``vaetrain.data.latent_cache``; the images are the data module's own, preprocessed as configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from vaetrain.convention import uint8_to_model
from vaetrain.data.datamodule import ImageDataModule
from vaetrain.data.faults import DataError, totals
from vaetrain.data.latent_cache import DTYPES, cache_key, encode_record, make_meta, posterior, teacher_fingerprint
from vaetrain.data.sources import units_of
from vaetrain.data.tars import ShardWriter
from vaetrain.models.base import Autoencoder
from vaetrain.safe import UserError, atomic_write_json

# data.latent_cache=auto keeps the caches in $VAETRAIN_LATENT_CACHE, else in latent_cache/ beside the run folder
# (runs/latent_cache for runs/NAME), one folder per key, so that the runs of one folder share them
AUTO_CACHE_ROOT_ENV = "VAETRAIN_LATENT_CACHE"
_DONE = "complete.json"


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


def latent_cache_root(option: str, run_dir: str | os.PathLike | None = None) -> Path:
    """``data.latent_cache``: ``auto`` ($VAETRAIN_LATENT_CACHE, else RUN_DIR/../latent_cache, without a run
    folder runs/latent_cache) or a folder."""
    if option != "auto":
        return Path(option)
    env = os.environ.get(AUTO_CACHE_ROOT_ENV)
    if env:
        return Path(env)
    return Path(run_dir).resolve().parent / "latent_cache" if run_dir is not None else Path("runs/latent_cache")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_latent_cache(data: ImageDataModule, teacher: Autoencoder | None, teacher_b: Autoencoder | None = None,
                        run_dir: str | os.PathLike | None = None, dtype: str = "fp16",
                        device: str = "auto") -> ImageDataModule:
    """``data`` unchanged, or (with ``data.latent_cache`` set on an image source) a ``data=cached`` module over
    the teacher's latents of exactly these images, built once into ``ROOT/<key>`` when missing.

    The key (``latent_cache.cache_key``) covers the teachers' fingerprints, the source's files or shards, the
    preprocessing, the seed, the loader workers (they seed the random crops) and the passes, so a changed
    weight or option builds a new cache instead of reading a stale one. Each of ``data.latent_cache_passes``
    passes is the data once more with other random crops and flips (seed + pass). A build goes into a
    temporary folder renamed into place when complete: a killed build is never mistaken for a cache. Under
    Lightning's own multi-GPU launch this runs in rank 0 before the other ranks start; processes started
    together by torchrun or SLURM are refused while the cache is missing (they would race to build it)."""
    spec = getattr(data, "spec", None)
    if spec is None or not spec.latent_cache or spec.source == "cached":
        return data
    if teacher is None or not getattr(teacher, "has_encoder", False):
        raise UserError("data.latent_cache caches the teacher's latents: it needs a teacher with an encoder "
                        "(set teacher=..., or data.latent_cache=null)")
    fp, fp_b = teacher_fingerprint(teacher), teacher_fingerprint(teacher_b) if teacher_b is not None else None
    units = units_of(spec)
    options = {"source": spec.source, "units": hashlib.sha256("\n".join(units).encode("utf-8", "surrogateescape")
                                                              ).hexdigest(),
               "count": len(units), "preprocess": spec.preprocess().as_dict(), "seed": spec.seed,
               "num_workers": spec.num_workers, "passes": spec.latent_cache_passes,
               "synthetic_count": spec.synthetic_count if spec.source == "synthetic" else None}
    root = latent_cache_root(spec.latent_cache, run_dir)
    final = root / cache_key(fp, fp_b, options, dtype)
    passes = [final / f"pass-{p}" for p in range(spec.latent_cache_passes)]
    if not (final / _DONE).is_file():
        if final.exists():
            raise UserError(f"data.latent_cache: {final} exists but is not a complete cache (no {_DONE}); "
                            f"remove it to rebuild")
        if max(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("SLURM_NTASKS", 1))) > 1:
            raise UserError(f"data.latent_cache: no cache at {final} yet, and the launched processes would race "
                            f"to build it; build it in one process first (the same command without the launcher, "
                            f"with trainer.devices=1 trainer.max_steps=1 and a run_dir beside this one)")
        _build(spec, teacher, teacher_b, final, options, dtype, device)
    else:
        print(f"vaetrain train: teacher latents from the cache {final}", flush=True)
    cached = spec.replace(source="cached", shards=tuple(str(p) for p in passes), folder=None, flip=False,
                          latent_cache=None)
    return ImageDataModule(cached)


def _build(spec, teacher, teacher_b, final: Path, options: dict, dtype: str, device: str) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.tmp-*"):  # left by killed builds (their process is gone)
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    print(f"vaetrain train: caching the teacher's latents ({spec.latent_cache_passes} pass(es) over the data) "
          f"-> {final}", flush=True)
    t0 = time.perf_counter()
    summaries = []
    try:
        for p in range(spec.latent_cache_passes):
            images = spec.replace(seed=spec.seed + p, latent_cache=None, output="uint8", epoch_length=None,
                                  resampled=False, batch_size=max(spec.batch_size, 32))
            summaries.append(cache_latents(teacher, ImageDataModule(images), str(tmp / f"pass-{p}"), teacher_b,
                                           dtype=dtype, device=device, rank=0, world_size=1))
        atomic_write_json(tmp / _DONE, {"options": options, "seconds": round(time.perf_counter() - t0, 1),
                                        "samples": sum(s["samples"] for s in summaries)}, indent=1)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
