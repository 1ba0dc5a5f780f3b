"""``vaetrain cache-latents``: encode a dataset once with the frozen teacher, train from the cache.

Decoder distillation spends most of its compute in the teacher's encoder; caching its posterior
removes that cost from every later epoch. Each cache shard holds, per sample, one safetensors
record: ``image`` (3, S, S) uint8 after preprocessing, ``latent`` (C, h, w) diffusion-space posterior
mean, optional ``logvar`` (diffusion space: raw logvar + 2 ln scale) and ``latent_b`` (a second
teacher, for latent interposers), in fp16 or bf16. The first member of every shard is a
``__meta__.json`` record (teacher fingerprint, preprocessing, dtype) that the data module checks
before serving a single batch, so a stale cache is refused instead of silently training on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from vaetrain.convention import uint8_to_model
from vaetrain.data import CACHE_FORMAT, ImageDataModule
from vaetrain.models.base import Autoencoder
from vaetrain.shards import ShardWriter

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def teacher_fingerprint(ae: torch.nn.Module) -> str:
    """``Class(arch flags)@sha256``: the model's identity plus a hash of every state-dict tensor.

    Arch flags come from ``ae.config()`` when the model has one, else from its plain scalar
    attributes (latent channels, factors, variant switches). The hash covers names, shapes and
    values as float32, so fp16 weights loaded into an fp32 model keep their fingerprint while
    any change of a value shows. Cost: one pass over the weights (~0.1 s per 100 MB).
    """
    cfg = getattr(ae, "config", None)  # a method on some models, a dict attribute on others
    if callable(cfg) or isinstance(cfg, dict):
        flags = dict(cfg() if callable(cfg) else cfg)
    else:
        flags = {k: v for k, v in vars(ae).items()
                 if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}
    for k in ("latent_channels", "downsample_factor", "scaling_factor", "shift_factor"):
        if hasattr(ae, k):
            flags[k] = getattr(ae, k)
    h = hashlib.sha256()
    for name, t in sorted(ae.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    flag_s = ",".join(f"{k}={flags[k]}" for k in sorted(flags))
    return f"{type(ae).__name__}({flag_s})@{h.hexdigest()}"


def _posterior(ae: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Diffusion-space (mean, logvar or None) for images x in [-1, 1]."""
    post = ae.posterior(x)
    if post is None:
        return ae.encode(x), None
    mean, logvar = post
    mean = (mean - ae.shift_factor) * ae.scaling_factor
    # z_d = (z - shift) * scale  =>  var_d = var * scale^2
    return mean, logvar + 2 * math.log(ae.scaling_factor)


def cache_latents(teacher: Autoencoder, data: ImageDataModule, output: str, teacher_b: Autoencoder | None = None,
                  dtype: str = "fp16", device: str = "auto", samples_per_shard: int = 1000,
                  max_samples: int | None = None, rank: int | None = None, world_size: int | None = None) -> dict:
    """Encode ``data`` (one deterministic pass, no shuffle) with ``teacher`` into cache shards.

    Each rank (``rank``/``world_size``, default from $RANK/$WORLD_SIZE) encodes its own share of
    the data's shards/files into ``OUTPUT/cache-rRRR-NNNNNN.tar``; rank 0 also writes
    ``OUTPUT/cache_meta.json``. Read the result with ``conf/data/cached.yaml``
    (``shards=OUTPUT``, same image_size/crop/flip).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if not teacher.has_encoder:
        raise ValueError(f"teacher {type(teacher).__name__} has no encoder: cache-latents needs one")
    if teacher_b is not None and not teacher_b.has_encoder:
        raise ValueError(f"teacher_b {type(teacher_b).__name__} has no encoder")
    if data.source == "cached":
        raise ValueError("data: cache-latents reads images (synthetic, folder or webdataset), not a cache")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    meta = {
        "format": CACHE_FORMAT, "version": 1,
        "teacher": teacher_fingerprint(teacher), "teacher_class": type(teacher).__name__,
        "teacher_b": teacher_fingerprint(teacher_b) if teacher_b is not None else None,
        "image_size": data.image_size, "crop": data.crop, "flip": data.flip, "seed": data.seed,
        "dtype": dtype, "latent_channels": teacher.latent_channels,
        "downsample_factor": teacher.downsample_factor, "has_logvar": None, "logvar_space": "diffusion",
    }
    teachers = [t.to(dev).eval().requires_grad_(False) for t in (teacher, teacher_b) if t is not None]
    # one pass, fixed order; every rank takes its own units (shards or files)
    ds = data.make_dataset(rank=rank, world_size=world_size, shuffle=False, epoch_length=None,
                           drop_last=False, resampled=False)
    loader = data.make_loader(ds, data.num_workers, False, batch_size=None)
    out = Path(output)
    writer = ShardWriter(out, f"cache-r{rank:03d}", max_samples=samples_per_shard, max_bytes=1 << 40)
    from safetensors.torch import save as st_save

    n, t0, t_enc = 0, time.perf_counter(), 0.0
    with torch.no_grad():
        for batch in loader:
            img = batch["image"]
            if img.dtype != torch.uint8:
                raise ValueError("data.output must be 'uint8' to build a cache")
            x = uint8_to_model(img.to(dev, non_blocking=True))
            t1 = time.perf_counter()
            mean, logvar = _posterior(teachers[0], x)
            latent_b = teachers[1].encode(x) if len(teachers) > 1 else None
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_enc += time.perf_counter() - t1
            if meta["has_logvar"] is None:
                meta["has_logvar"] = logvar is not None
                writer.header = {"__meta__.json": json.dumps(meta, sort_keys=True).encode()}
            cast = DTYPES[dtype]
            for i, key in enumerate(batch["__key__"]):
                if max_samples is not None and n >= max_samples:
                    break
                rec = {"image": img[i].contiguous(), "latent": mean[i].to("cpu", cast).contiguous()}
                if logvar is not None:
                    rec["logvar"] = logvar[i].to("cpu", cast).contiguous()
                if latent_b is not None:
                    rec["latent_b"] = latent_b[i].to("cpu", cast).contiguous()
                writer.write(f"{n:08d}", {"safetensors": st_save(rec),
                                          "json": json.dumps({"source": key}).encode()})
                n += 1
            if max_samples is not None and n >= max_samples:
                break
    shards = writer.close()
    seconds = time.perf_counter() - t0
    if meta["has_logvar"] is None:
        raise ValueError(f"rank {rank}: the data gave no images to cache")
    summary = {"rank": rank, "world_size": world_size, "samples": n, "shards": shards, "seconds": seconds,
               "encode_seconds": t_enc, "skips": data.skip_stats(), "meta": meta}
    if rank == 0:
        _atomic_json(out / "cache_meta.json", meta)
    _atomic_json(out / f"manifest-r{rank:03d}.json", summary)
    print(f"vaetrain cache-latents: rank {rank}: {n} samples in {len(shards)} shards, {seconds:.1f} s "
          f"({n / max(seconds, 1e-9):.1f} img/s, teacher {t_enc:.1f} s) -> {out}")
    return summary


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
