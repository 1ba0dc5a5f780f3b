"""The latent cache format: what ``vaetrain cache-latents`` writes and ``data=cached`` reads, in one place.

A cache is WebDataset shards. The first sample of every shard is ``__meta__.json``: the format and version,
the teacher's fingerprint (``teacher_fingerprint``: class, arch flags and a hash of every weight), the
second teacher's for interposers, and every preprocessing option that produced the images
(``Preprocess.as_dict``). Each further sample is one safetensors record: ``image`` (3, H, W) uint8 after
preprocessing, ``latent`` (C, h, w) diffusion-space posterior mean, optional ``logvar`` (diffusion space:
raw logvar + 2 ln scale) and ``latent_b`` (the second teacher's), in fp16 / bf16 / fp32, plus a ``json``
naming the source sample. A reader checks the meta record against its own teacher and preprocessing before
serving a batch and refuses a mismatch with one line naming each field.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
import webdataset as wds
from safetensors.torch import load as st_load, save as st_save

from vaetrain.data.faults import DataError, SkipSample
from vaetrain.data.images import Preprocess
from vaetrain.data.tars import read_first_member

CACHE_FORMAT = "vaetrain-latent-cache"
CACHE_VERSION = 2
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


def cache_key(teacher: str, teacher_b: str | None, spec_options: dict, dtype: str) -> str:
    """A folder name for the cache of (teacher fingerprints, data options): equal inputs, equal name.

    ``spec_options`` are what decides the cached samples (source, its files or shards, preprocessing, seed,
    passes); ``Class-<16 hex>`` keeps the name short while any change of a weight or an option changes it."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "teacher": teacher,
                                   "teacher_b": teacher_b, "data": spec_options, "dtype": dtype},
                                  sort_keys=True, default=str).encode())
    return f"{teacher.split('(', 1)[0]}-{h.hexdigest()[:16]}"


def posterior(ae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Diffusion-space (mean, logvar or None) of images x in [-1, 1]."""
    post = ae.posterior(x)
    if post is None:
        return ae.encode(x), None
    mean, logvar = post
    mean = (mean - ae.shift_factor) * ae.scaling_factor
    # z_d = (z - shift) * scale  =>  var_d = var * scale^2
    return mean, logvar + 2 * math.log(ae.scaling_factor)


def make_meta(teacher, teacher_b, preprocess: Preprocess, dtype: str, seed: int, has_logvar: bool) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION,
            "teacher": teacher_fingerprint(teacher), "teacher_class": type(teacher).__name__,
            "teacher_b": teacher_fingerprint(teacher_b) if teacher_b is not None else None,
            "preprocess": preprocess.as_dict(), "seed": seed, "dtype": dtype,
            "latent_channels": teacher.latent_channels, "downsample_factor": teacher.downsample_factor,
            "has_logvar": has_logvar, "logvar_space": "diffusion"}


def expectation(preprocess: Preprocess, teacher: str | None = None, teacher_b: str | None = None,
                extra: dict | None = None) -> dict:
    """What a reader requires of a cache: its preprocessing, and the teachers' fingerprints when known."""
    exp = {f"preprocess.{k}": v for k, v in preprocess.as_dict().items()}
    for k, v in (extra or {}).items():
        exp[k] = v
    if teacher is not None:
        exp["teacher"] = teacher
    if teacher_b is not None:
        exp["teacher_b"] = teacher_b
    return exp


def _field(meta: dict, key: str):
    if not key.startswith("preprocess."):
        return meta.get(key)
    name = key.split(".", 1)[1]
    if "preprocess" in meta:
        return meta["preprocess"].get(name, Preprocess.__dataclass_fields__[name].default)
    # version-1 caches stored image_size / crop / flip at the top level; the rest was the default
    return meta.get(name, Preprocess.__dataclass_fields__[name].default)


def check_meta(found: dict | None, expected: dict, where: str) -> None:
    """Raise ``DataError`` naming every field where a cache disagrees with what training expects."""
    if found is None or found.get("format") != CACHE_FORMAT:
        raise DataError(f"{where}: not a vaetrain latent cache (no __meta__.json record); "
                        f"build one with `vaetrain cache-latents`")
    bad = [f"{k}: cache has {_field(found, k)!r}, expected {v!r}" for k, v in expected.items()
           if v is not None and _field(found, k) != v]
    if bad:
        raise DataError(f"{where}: stale latent cache ({'; '.join(bad)}); rebuild it with "
                        f"`vaetrain cache-latents` for this teacher and preprocessing")


def read_meta(url: str) -> dict | None:
    """The ``__meta__.json`` record at the head of a cache shard (None if it has none)."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:
        raise DataError(f"{url}: cannot open the cache shard ({e})") from None
    try:
        first = read_first_member(stream)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe closed early
            pass
    if first is None or first[0] != "__meta__.json":
        return None
    try:
        return json.loads(first[1])
    except ValueError:
        return None


def encode_record(image: torch.Tensor, latent: torch.Tensor, logvar: torch.Tensor | None,
                  latent_b: torch.Tensor | None, dtype: str) -> bytes:
    cast = DTYPES[dtype]
    rec = {"image": image.contiguous(), "latent": latent.to("cpu", cast).contiguous()}
    if logvar is not None:
        rec["logvar"] = logvar.to("cpu", cast).contiguous()
    if latent_b is not None:
        rec["latent_b"] = latent_b.to("cpu", cast).contiguous()
    return st_save(rec)


def decode_record(data: bytes, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """A cache record -> tensors, or ``SkipSample("bad_cache_record")``."""
    try:
        rec = st_load(data)
        if tuple(rec["image"].shape) != image_shape:
            raise ValueError(f"image {tuple(rec['image'].shape)}, expected {image_shape}")
    except Exception as e:  # safetensors raises its own error types for junk
        raise SkipSample("bad_cache_record", str(e)) from None
    return rec
