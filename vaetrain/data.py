"""Training images at scale: WebDataset shards, image folders, a synthetic source and latent caches.

One streaming pipeline serves every source: a list of *units* (a tar shard, an image file, a
synthetic index) is ordered per epoch, split by rank and by loader worker, read into raw samples,
decoded (EXIF, mode -> RGB, min-size filter, short-side resize, crop, flip) and batched inside the
worker, so the main process only receives ready ``(B, 3, S, S)`` uint8 batches.

Bad samples never stop training: each is skipped at once (no sleeping), counted per reason in a
shared-memory table that every worker writes, and ``ImageDataModule.skip_stats()`` reads. The
module aborts with one clear ``RuntimeError`` only when the skip rate passes ``max_skip_rate``.

Tar shards are read with a small strict reader (not ``tarfile``'s stream mode, which silently
treats a tar cut at a member boundary as complete), so every truncation is seen and counted.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - lightning is a hard dependency; kept for plain-torch use
    import pytorch_lightning as pl

from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

# Why a sample or shard was skipped; the columns of the shared counter table.
REASONS = ("corrupt_image", "truncated_image", "no_image", "too_small", "truncated_tar",
           "unreadable_source", "bad_cache_record")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
SOURCES = ("synthetic", "folder", "webdataset", "cached")
CACHE_FORMAT = "vaetrain-latent-cache"
# Preprocessing fields a cache must share with the data module that reads it.
CACHE_PREPROCESS_KEYS = ("image_size", "crop", "flip")

_YIELDED = len(REASONS)      # column: samples delivered
_LAST_EPOCH = len(REASONS) + 1  # column: the epoch this worker streamed last (-1: none yet)
_ZERO_BLOCK = bytes(512)


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------
def open_image(data: bytes, min_size: int = 0, draft_short: int | None = None) -> Image.Image:
    """Bytes -> an upright RGB PIL image, or ``SkipSample``.

    EXIF orientation is applied; RGBA/LA/PA and P-with-transparency are composited on white;
    16-bit and 32-bit integer greyscale are scaled to 8 bits; P, L, 1, CMYK, YCbCr... -> RGB.
    ``draft_short`` lets the JPEG decoder downscale by 1/2..1/8 in the DCT while keeping the short
    side >= that many pixels (the main decode-speed lever for large web photos).
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError... for junk
        raise SkipSample("corrupt_image", str(e)) from None
    if min_size and min(img.size) < min_size:
        raise SkipSample("too_small", f"{img.size} < {min_size}")
    if draft_short and img.format == "JPEG":
        w, h = img.size
        s = draft_short / min(w, h)
        if s < 0.5:
            img.draft(None, (math.ceil(w * s), math.ceil(h * s)))
    try:
        img.load()
    except Exception as e:
        reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        raise SkipSample(reason, str(e)) from None
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block should not cost the whole image
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("L", "1") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32) / 257.0  # 16-bit full scale -> 8-bit full scale
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def crop_resize(img: Image.Image, size: int, crop: str, flip: bool, rng: random.Random) -> np.ndarray:
    """Resize the short side to ``size`` and take a square crop, in one resampling pass.

    The crop window is chosen on the resized grid, mapped back to the source, and only that box is
    resampled (``resize(box=...)``), so big images never get resized whole. Returns (S, S, 3) uint8.
    """
    w, h = img.size
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    if crop == "random":
        ox, oy = rng.randint(0, rw - size), rng.randint(0, rh - size)
    elif crop == "center":
        ox, oy = (rw - size) // 2, (rh - size) // 2
    else:
        raise ValueError(f"crop={crop!r}: use 'random' or 'center'")
    sx, sy = w / rw, h / rh
    box = (ox * sx, oy * sy, (ox + size) * sx, (oy + size) * sy)
    out = img.resize((size, size), Image.BICUBIC, box=box)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)  # (S, S, 3)


def synthetic_image(index: int, seed: int, width: int, height: int) -> Image.Image:
    """A procedural test photo: gradient background, hard-edged shapes, a texture patch and text."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = c0 + (c1 - c0) * t[..., None]  # (H, W, 3)
    # texture: oriented sinusoid plus fine noise in a random rectangle
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    x1, y1 = x0 + int(rng.integers(width // 4, width // 2)), y0 + int(rng.integers(height // 4, height // 2))
    f = rng.uniform(0.2, 1.2)
    stripes = 127.5 + 100 * np.sin(f * (xx[y0:y1, x0:x1] * np.cos(angle * 3) + yy[y0:y1, x0:x1]))
    arr[y0:y1, x0:x1] = stripes[..., None] + rng.normal(0, 12, (y1 - y0, x1 - x0, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        a = rng.uniform(0, [width, height, width, height])
        box = [min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]) + 2, max(a[1], a[3]) + 2]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle(box, fill=fill)
        elif kind == 1:
            draw.ellipse(box, fill=fill, outline=(0, 0, 0))
        else:
            draw.line(box, fill=fill, width=int(rng.integers(1, 4)))
    words = ("vae", "latent", "decode", "sharp", "edge", "Text 42", "flux", "tiny")
    try:
        font = ImageFont.load_default(size=max(8, height // 8))
    except TypeError:  # Pillow without FreeType sizing
        font = ImageFont.load_default()
    ink = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.text((float(rng.uniform(0, width / 2)), float(rng.uniform(0, height * 0.7))),
              " ".join(rng.choice(words, 2)), fill=ink, font=font)
    return img


# ------------------------------------------------------------------------------------------
# reading shards
# ------------------------------------------------------------------------------------------
class _Truncated(Exception):
    pass


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-separated lists and local folders (all ``*.tar``)."""
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for url in braceexpand.braceexpand(part):
                if "://" not in url and not url.startswith("pipe:") and os.path.isdir(url):
                    out += sorted(str(p) for p in Path(url).glob("*.tar"))
                else:
                    out.append(url)
    return out


class _Stream:
    """A readable byte stream for a local path, ``file:``, ``pipe:CMD``, http(s):// or s3:// URL."""

    def __init__(self, url: str):
        self.url, self.proc = url, None
        if url.startswith("pipe:"):
            cmd: Any = url[5:]
        elif url.startswith(("http://", "https://")):
            cmd = ["curl", "-sfL", "--retry", "3", "--connect-timeout", "30", url]
        elif url.startswith("s3://"):
            cmd = ["aws", "s3", "cp", url, "-"]
        else:
            self.f = open(url[5:] if url.startswith("file:") else url, "rb", buffering=1 << 20)
            return
        self.proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=1 << 20)
        self.f = self.proc.stdout

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def close(self, complete: bool) -> bool:
        """Close; returns False when a pipe's command failed (its output cannot be trusted)."""
        self.f.close()
        if self.proc is None:
            return True
        if not complete:
            self.proc.kill()
        return self.proc.wait() == 0 or not complete


def _read_exact(f: _Stream, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            raise _Truncated(f"wanted {n} bytes, got {len(data)}")
        data += more
    return data


def tar_members(f: _Stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream; ``_Truncated`` on any short read.

    Handles ustar prefixes, GNU long names and PAX ``path`` records (what Python's tarfile and
    img2dataset write). A stream that ends without the zero end-of-archive block is truncated.
    """
    import tarfile

    long_name = None
    while True:
        hdr = _read_exact(f, 512)
        if hdr == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _Truncated(f"bad tar header ({e})") from None
        data = _read_exact(f, info.size)
        _read_exact(f, -info.size % 512)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            for rec in data.split(b"\n"):
                _, _, kv = rec.partition(b" ")
                if kv.startswith(b"path="):
                    long_name = kv[5:].decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
            yield (long_name or info.name), data
            long_name = None
        elif info.type != tarfile.XGLTYPE:
            long_name = None


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset naming: key = path up to the first dot of the file name, ext = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1:].lower()


def tar_samples(url: str, count) -> Iterator[dict]:
    """Group a shard's members into samples ``{"__key__", ext: bytes...}``; counts shard faults."""
    try:
        stream = _Stream(url)
    except OSError:
        count("unreadable_source")
        return
    current: dict | None = None
    complete, got_any = False, False
    try:
        for name, data in tar_members(stream):
            got_any = True
            ks = split_key(name)
            if ks is None:
                continue
            key, ext = ks
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        complete = True
    except _Truncated:
        # every member already in `current` was read whole, so it is still served; the member cut
        # short never got in. The shard fault is counted once.
        count("truncated_tar" if got_any else "unreadable_source")
    finally:
        ok = stream.close(complete)
    if current is not None:
        if ok:
            yield current
        else:  # a pipe whose command failed: its last sample may be cut short
            count("truncated_tar")


def read_cache_meta(url: str) -> dict | None:
    """The ``__meta__.json`` record at the head of a cache shard (``None`` if it has none)."""
    stream = _Stream(url)
    try:
        for name, data in tar_members(stream):
            return json.loads(data) if name == "__meta__.json" else None
    except _Truncated:
        return None
    finally:
        stream.close(False)
    return None


def check_cache_meta(found: dict | None, expected: dict, where: str) -> None:
    """Raise ``ValueError`` naming every field where a cache disagrees with what training expects."""
    if found is None or found.get("format") != CACHE_FORMAT:
        raise ValueError(f"{where}: not a vaetrain latent cache (no __meta__.json record); "
                         f"build one with `vaetrain cache-latents`")
    bad = [f"{k}: cache has {found.get(k)!r}, expected {v!r}" for k, v in expected.items()
           if v is not None and found.get(k) != v]
    if bad:
        raise ValueError(f"{where}: stale latent cache ({'; '.join(bad)}); rebuild it with "
                         f"`vaetrain cache-latents` for this teacher and preprocessing")


# ------------------------------------------------------------------------------------------
# the streaming dataset
# ------------------------------------------------------------------------------------------
class SkipCounter:
    """Per-worker skip/yield counts in shared memory: workers write their row, the trainer reads."""

    def __init__(self, num_workers: int):
        # (workers, reasons + yielded + last epoch)
        self.table = torch.zeros(max(1, num_workers), len(REASONS) + 2, dtype=torch.int64).share_memory_()
        self.table[:, _LAST_EPOCH] = -1

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the next epoch every worker streams; later ones count up from it.

        Each worker takes (its last epoch + 1) when it starts a pass, so calling this before each
        epoch (Lightning's module does), or never, or once on resume, all give the same order.
        """
        self.table[:, _LAST_EPOCH] = epoch - 1

    def next_epoch(self) -> int:
        return int(self.table[:, _LAST_EPOCH].max()) + 1

    def totals(self) -> dict[str, int]:
        t = self.table.sum(0).tolist()
        out = {r: int(t[i]) for i, r in enumerate(REASONS)}
        out["samples"] = int(t[_YIELDED])
        return out

    def skip_rate(self) -> tuple[float, int]:
        t = self.totals()
        skipped = sum(t[r] for r in REASONS)
        seen = skipped + t["samples"]
        return (skipped / seen if seen else 0.0), seen


class StreamingImages(IterableDataset):
    """Batches of decoded images (and cached latents) from a list of units; see module docstring."""

    def __init__(self, source: str, units: list, *, image_size: int, batch_size: int, crop: str,
                 flip: bool, min_size: int, output: str, seed: int, shuffle: bool, shuffle_buffer: int,
                 resampled: bool, epoch_length: int | None, drop_last: bool, rank: int, world_size: int,
                 counter: SkipCounter, max_skip_rate: float, min_samples_for_skip_rate: int,
                 synthetic_size: tuple[int, int] = (0, 0), expect_cache_meta: dict | None = None):
        if not units:
            raise ValueError(f"{source} source: no images/shards found")
        if resampled and not epoch_length:
            raise ValueError("resampled=true needs epoch_length (samples per rank per epoch)")
        self.source, self.units, self.counter = source, units, counter
        self.image_size, self.batch_size, self.output = image_size, batch_size, output
        self.crop, self.flip, self.min_size = crop, flip, min_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.resampled, self.epoch_length, self.drop_last = resampled, epoch_length, drop_last
        self.rank, self.world_size = rank, world_size
        self.max_skip_rate, self.min_samples_for_skip_rate = max_skip_rate, min_samples_for_skip_rate
        self.synthetic_size, self.expect_cache_meta = synthetic_size, expect_cache_meta

    def set_epoch(self, epoch: int) -> None:
        """The next epoch's number (e.g. on resume); otherwise each worker counts the epochs it starts."""
        self.counter.set_epoch(epoch)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _count(self, worker: int):
        row = self.counter.table[worker]

        def count(reason: str) -> None:
            row[REASONS.index(reason)] += 1
            self._check_rate(worker)
        return count

    def _check_rate(self, worker: int) -> None:
        # The main process checks too; this guard stops a worker spinning forever on bad data.
        # It reads every worker's row of the shared table, so it judges the same rate as the trainer.
        rate, seen = self.counter.skip_rate()
        if seen >= self.min_samples_for_skip_rate and rate > self.max_skip_rate:
            raise RuntimeError(skip_rate_message(self.counter, rate, self.max_skip_rate))

    def batches_per_worker(self, worker: int, num_workers: int) -> int | None:
        if not self.epoch_length:
            return None
        total = self.epoch_length // self.batch_size  # per rank
        return total // num_workers + (worker < total % num_workers)

    def _unit_order(self, epoch: int, rank: int, worker: int, num_workers: int, pass_: int) -> list:
        if self.resampled:
            rng = random.Random(f"resample-{self.seed}-{epoch}-{rank}-{worker}-{pass_}")
            return [rng.choice(self.units) for _ in range(max(1, len(self.units)))]
        order = list(self.units)
        if self.shuffle:
            # same permutation on every rank (seeded by the epoch only), so the rank/worker split is disjoint
            random.Random(f"units-{self.seed}-{epoch}").shuffle(order)
        mine = order[rank::self.world_size][worker::num_workers]
        if self.shuffle and pass_:
            # later passes of a fixed-length epoch: new order, same share
            random.Random(f"pass-{self.seed}-{epoch}-{rank}-{worker}-{pass_}").shuffle(mine)
        return mine

    def _raw(self, units: list, count) -> Iterator[dict]:
        for unit in units:
            if self.source == "synthetic":
                yield {"__key__": f"synthetic-{unit:08d}", "__pil__": unit}
            elif self.source == "folder":
                try:
                    data = Path(unit).read_bytes()
                except OSError:
                    count("unreadable_source")
                    continue
                # PIL sniffs the real format from the bytes; the extension only marks "an image"
                yield {"__key__": str(unit), "jpg": data}
            else:
                for sample in tar_samples(unit, count):
                    if sample["__key__"] == "__meta__":
                        if self.source == "cached" and self.expect_cache_meta is not None:
                            check_cache_meta(json.loads(sample["json"]), self.expect_cache_meta, unit)
                        continue
                    yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _decode(self, sample: dict, rng: random.Random) -> dict:
        if self.source == "synthetic":
            w, h = self.synthetic_size
            img = synthetic_image(sample["__pil__"], self.seed, w, h)
            return {"image": crop_resize(img, self.image_size, self.crop, self.flip, rng)}
        if self.source == "cached":
            from safetensors.torch import load as st_load

            try:
                rec = st_load(sample["safetensors"])
                if tuple(rec["image"].shape) != (3, self.image_size, self.image_size):
                    raise ValueError(f"image {tuple(rec['image'].shape)}")
            except Exception as e:
                raise SkipSample("bad_cache_record", str(e)) from None
            return rec
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if data is None:  # compound extensions some writers use, e.g. KEY.image.jpg
            data = next((v for k, v in sample.items() if k.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if data is None:
            raise SkipSample("no_image", sample["__key__"])
        # DCT downscale only to 2x the target: 1x aliases visibly (bad for training a VAE), 2x is near-exact
        img = open_image(data, self.min_size, draft_short=2 * self.image_size)
        return {"image": crop_resize(img, self.image_size, self.crop, self.flip, rng)}

    def _collate(self, items: list[dict], keys: list[str]) -> dict:
        b = len(items)
        out: dict[str, Any] = {}
        first = items[0]
        if isinstance(first["image"], np.ndarray):  # (S, S, 3) HWC from PIL
            arr = np.empty((b, 3, self.image_size, self.image_size), dtype=np.uint8)  # (B, 3, S, S)
            for i, it in enumerate(items):
                arr[i] = it["image"].transpose(2, 0, 1)
            img = torch.from_numpy(arr)
        else:
            img = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
        out["image"] = img.float().div_(127.5).sub_(1) if self.output == "float" else img
        for k in first:
            if k != "image":
                out[k] = torch.stack([it[k] for it in items])  # (B, C, h, w)
        out["__key__"] = keys
        return out

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        row = self.counter.table[worker]
        epoch = int(row[_LAST_EPOCH]) + 1
        row[_LAST_EPOCH] = epoch
        rng = random.Random(f"samples-{self.seed}-{epoch}-{self.rank}-{worker}")
        quota = self.batches_per_worker(worker, num_workers)
        count = self._count(worker)
        items: list[dict] = []
        keys: list[str] = []
        produced, pass_ = 0, 0
        while quota is None or produced < quota:
            units = self._unit_order(epoch, self.rank, worker, num_workers, pass_)
            if not units:
                if quota:
                    raise ValueError(
                        f"rank {self.rank} worker {worker} has no {self.source} units: "
                        f"{len(self.units)} shards/files for {self.world_size} ranks x {num_workers} workers; "
                        f"use resampled=true, fewer workers, or more shards")
                return
            good_in_pass = 0
            for sample in self._shuffled(self._raw(units, count), rng):
                try:
                    item = self._decode(sample, rng)
                except SkipSample as s:
                    count(s.reason)
                    continue
                row[_YIELDED] += 1
                good_in_pass += 1
                items.append(item)
                keys.append(sample["__key__"])
                if len(items) == self.batch_size:
                    yield self._collate(items, keys)
                    items, keys = [], []
                    produced += 1
                    if quota is not None and produced >= quota:
                        return
            pass_ += 1
            if quota is None:
                break
            if good_in_pass == 0:
                raise RuntimeError(f"rank {self.rank} worker {worker}: a full pass over its "
                                   f"{len(units)} {self.source} units gave no usable sample")
        if items and not self.drop_last:
            yield self._collate(items, keys)


def skip_rate_message(counter: SkipCounter, rate: float, threshold: float) -> str:
    t = counter.totals()
    top = sorted(((n, r) for r, n in t.items() if r != "samples" and n), reverse=True)[:3]
    reasons = ", ".join(f"{r}={n}" for n, r in top)
    return (f"data loader skip rate {rate:.1%} exceeds max_skip_rate={threshold:.1%} "
            f"({sum(t[r] for r in REASONS)} skipped of {sum(t[r] for r in REASONS) + t['samples']}; "
            f"top reasons: {reasons}); fix or drop the bad shards, or raise max_skip_rate")


class _ValImages(Dataset):
    """A fixed validation set: the first ``count`` images of a folder (sorted), or synthetic ones."""

    def __init__(self, files: list[str] | None, count: int, size: int, seed: int):
        self.files, self.size, self.seed = files, size, seed
        self.n = min(count, len(files)) if files is not None else count

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(i)
        if self.files is None:
            img = synthetic_image(10_000_000 + i, self.seed, self.size * 5 // 4, self.size)
            key = f"synthetic-val-{i:04d}"
        else:
            key = self.files[i]
            try:
                img = open_image(Path(key).read_bytes(), draft_short=2 * self.size)
            except (SkipSample, OSError) as e:
                raise ValueError(f"validation image {key} cannot be used ({e}); remove it from val_folder") from None
        arr = crop_resize(img, self.size, "center", False, rng)
        return {"image": torch.from_numpy(arr.copy()).permute(2, 0, 1), "__key__": key}  # (3, S, S)


def list_images(folders: str | Iterable[str]) -> list[str]:
    """Every image file under the folders, recursively, sorted; any legal file name."""
    items = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    out: list[str] = []
    for folder in items:
        folder = str(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder {folder!r} does not exist (set data.folder / data.val_folder)")
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in filenames:
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not name.startswith("."):
                    found.append(os.path.join(dirpath, name))
        out += sorted(found)
    return out


# ------------------------------------------------------------------------------------------
# the data module
# ------------------------------------------------------------------------------------------
class ImageDataModule(pl.LightningDataModule):
    """Training batches ``{"image": (B,3,S,S) uint8, ["latent", "logvar", "latent_b"], "__key__"}``.

    source: ``synthetic`` (offline default), ``folder`` (``folder``: path(s), recursive),
    ``webdataset`` (``shards``: list / brace pattern of paths, ``pipe:``, http(s), s3 URLs) or
    ``cached`` (``shards`` of a ``vaetrain cache-latents`` output; needs ``expect_cache_meta`` or
    ``expect_teacher()`` to guard against stale caches).
    ``epoch_length``: samples per rank per epoch; with it every rank yields exactly
    ``epoch_length // batch_size`` batches (no DDP hang on uneven shards); ``resampled`` draws
    shards with replacement, otherwise each rank cycles over its own disjoint share.
    """

    def __init__(self, source: str = "synthetic", shards: str | list[str] | None = None,
                 folder: str | list[str] | None = None, image_size: int = 256, batch_size: int = 8,
                 num_workers: int = 2, crop: str = "random", flip: bool = True, min_size: int = 0,
                 output: str = "uint8", shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, epoch_length: int | None = None, drop_last: bool = True,
                 seed: int = 0, max_skip_rate: float = 0.05, min_samples_for_skip_rate: int = 200,
                 synthetic_count: int = 10_000, val_folder: str | None = None,
                 val_image_size: int | None = None, val_count: int = 24, val_batch_size: int | None = None,
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int = 4,
                 expect_cache_meta: dict | None = None, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data source {source!r}: use one of {', '.join(SOURCES)}")
        if crop not in ("random", "center"):
            raise ValueError(f"crop={crop!r}: use 'random' or 'center'")
        if output not in ("uint8", "float"):
            raise ValueError(f"output={output!r}: use 'uint8' (normalised on the device) or 'float'")
        if source in ("webdataset", "cached") and not shards:
            raise ValueError(f"source={source} needs shards= (paths, a brace pattern or URLs)")
        if source == "folder" and not folder:
            raise ValueError("source=folder needs folder= (one or more image folders)")
        if source == "cached" and flip:
            raise ValueError("source=cached: flip must be false (latents are cached for one orientation; "
                             "set flip when building the cache)")
        self.source, self.shards, self.folder = source, shards, folder
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.crop, self.flip, self.min_size, self.output = crop, flip, min_size, output
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.resampled, self.epoch_length, self.drop_last = resampled, epoch_length, drop_last
        self.max_skip_rate, self.min_samples_for_skip_rate = max_skip_rate, min_samples_for_skip_rate
        self.synthetic_count, self.val_folder, self.val_count = synthetic_count, val_folder, val_count
        self.val_image_size = val_image_size or image_size
        self.val_batch_size = val_batch_size or batch_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor = prefetch_factor
        self.expect_cache_meta = dict(expect_cache_meta) if expect_cache_meta else None
        self._rank, self._world_size = rank, world_size
        self.counter = SkipCounter(num_workers)
        self._train: StreamingImages | None = None

    # --- cache guard ----------------------------------------------------------------------
    def expect_teacher(self, teacher, teacher_b=None) -> None:
        """Require cached latents to come from these teacher weights (see ``vaetrain.cache``)."""
        from vaetrain.cache import teacher_fingerprint

        meta = dict(self.expect_cache_meta or {})
        meta["teacher"] = teacher_fingerprint(teacher)
        if teacher_b is not None:
            meta["teacher_b"] = teacher_fingerprint(teacher_b)
        self.expect_cache_meta = meta

    def _cache_expectation(self) -> dict:
        exp = {"image_size": self.image_size, "crop": self.crop, "flip": self.flip}
        exp.update(self.expect_cache_meta or {})
        return exp

    # --- distribution ---------------------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank, self._world_size or 1
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def units(self) -> list:
        if self.source == "synthetic":
            return list(range(self.synthetic_count))
        if self.source == "folder":
            return list_images(self.folder)
        return expand_urls(self.shards)

    def make_dataset(self, *, rank: int | None = None, world_size: int | None = None,
                     shuffle: bool | None = None, epoch_length: int | None = -1,
                     drop_last: bool | None = None, resampled: bool | None = None) -> StreamingImages:
        """The streaming dataset for one rank (defaults: this module's settings and rank)."""
        r, w = self.rank_and_world()
        units = self.units()
        expect = None
        if self.source == "cached":
            expect = self._cache_expectation()
            if units:  # fail in the main process, before any worker starts
                check_cache_meta(read_cache_meta(units[0]), expect, units[0])
        return StreamingImages(
            self.source, units, image_size=self.image_size, batch_size=self.batch_size, crop=self.crop,
            flip=self.flip, min_size=self.min_size, output=self.output, seed=self.seed,
            shuffle=self.shuffle if shuffle is None else shuffle, shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled if resampled is None else resampled,
            epoch_length=self.epoch_length if epoch_length == -1 else epoch_length,
            drop_last=self.drop_last if drop_last is None else drop_last,
            rank=r if rank is None else rank, world_size=w if world_size is None else world_size,
            counter=self.counter, max_skip_rate=self.max_skip_rate,
            min_samples_for_skip_rate=self.min_samples_for_skip_rate,
            synthetic_size=(self.image_size * 3 // 2, self.image_size * 5 // 4), expect_cache_meta=expect)

    def make_loader(self, dataset: Dataset, num_workers: int, persistent: bool, **kw) -> DataLoader:
        """A DataLoader with this module's memory/worker settings (batching happens in ``dataset``)."""
        extra = {}
        if num_workers > 0:
            extra = {"persistent_workers": persistent, "prefetch_factor": self.prefetch_factor}
        return DataLoader(dataset, num_workers=num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                          **extra, **kw)

    def train_dataloader(self) -> DataLoader:
        epoch_length = self.epoch_length
        rank, world = self.rank_and_world()
        if world > 1 and not epoch_length:
            # one pass per rank gives ranks different batch counts with uneven shards: DDP would hang
            if self.source not in ("synthetic", "folder"):
                raise ValueError(f"data.epoch_length (samples per rank per epoch) must be set for {world}-process "
                                 f"training on shards: every rank has to yield the same number of batches")
            epoch_length = len(self.units()) // world
        self._train = self.make_dataset(epoch_length=epoch_length)
        # the dataset batches inside the workers: no per-sample collate in the main process
        return self.make_loader(self._train, self.num_workers, self.persistent_workers, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        files = list_images(self.val_folder) if self.val_folder else None
        ds = _ValImages(files, self.val_count, self.val_image_size, self.seed)
        return self.make_loader(ds, min(self.num_workers, 2), False, batch_size=self.val_batch_size, shuffle=False)

    def set_epoch(self, epoch: int) -> None:
        """The next training epoch's number: its shard order, shuffle and crops derive from (seed, epoch)."""
        self.counter.set_epoch(epoch)

    # --- faults ---------------------------------------------------------------------------
    def skip_stats(self) -> dict[str, int]:
        """Totals for this rank across all loader workers: one entry per reason, plus ``samples``."""
        return self.counter.totals()

    def check_skip_rate(self) -> None:
        rate, seen = self.counter.skip_rate()
        if seen >= self.min_samples_for_skip_rate and rate > self.max_skip_rate:
            raise RuntimeError(skip_rate_message(self.counter, rate, self.max_skip_rate))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.check_skip_rate()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: a resumed run continues with the next epoch's data order."""
        return {"next_epoch": self.counter.next_epoch(), "skip_stats": self.skip_stats()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "next_epoch" in state:
            self.counter.set_epoch(int(state["next_epoch"]))
