"""``vaetrain shards INPUT... OUTPUT``: pack image folders into WebDataset tar shards.

Output follows img2dataset's layout (``KEY.jpg`` + ``KEY.json`` [+ ``KEY.txt``] per sample) so the same
loader reads both. Runs are reproducible: a sorted walk, keys from the sample index, tar headers with a
fixed mtime/uid/mode, and a deterministic re-encode, so the same input gives byte-identical shards. Every
shard and the manifest are written atomically, so a killed run never leaves a half-written file under a
final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from vaetrain.data.faults import DataError, SkipSample
from vaetrain.data.images import IMAGE_EXTS, list_images, open_image
from vaetrain.data.tars import ShardWriter
from vaetrain.safe import atomic_write_json

FORMATS = {"keep": None, "jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_EXT = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}


def _encode(args: tuple) -> tuple[str, str, dict | str]:
    """One file -> (kind, ext, payload): ("ok", ext, {bytes, meta}) or ("skip", reason, detail)."""
    path, rel, max_size, fmt, quality, min_size = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "skip", "unreadable_source", str(e)
    try:
        # full decode validates the file (a truncated JPEG is caught here, not at training time)
        img = open_image(data, min_size)
    except SkipSample as s:
        return "skip", s.reason, str(s)
    src_format = Image.open(io.BytesIO(data)).format
    w, h = img.size
    resize = bool(max_size) and max(w, h) > max_size
    meta = {"source": rel, "width": w, "height": h, "original_width": w, "original_height": h}
    if fmt == "keep":
        # lossy sources stay lossy, everything else (PNG, TIFF, BMP, GIF) becomes lossless PNG
        target = src_format if src_format in ("JPEG", "WEBP") else "PNG"
    else:
        target = FORMATS[fmt]
    if not resize and src_format == target:
        # the original bytes, EXIF and all: the loader applies the orientation
        return "ok", _EXT[target], {"bytes": data, "meta": meta}
    if resize:
        s = max_size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        meta["width"], meta["height"] = img.size
    buf = io.BytesIO()
    if target == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=False, subsampling=2 if quality < 90 else 0)
    elif target == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "PNG", compress_level=6)
    return "ok", _EXT[target], {"bytes": buf.getvalue(), "meta": meta}


def make_shards(inputs: list[str] | str, output: str, max_samples: int = 10_000, max_bytes: int = 1 << 30,
                max_size: int | None = None, format: str = "keep", quality: int = 95, min_size: int = 0,
                prefix: str = "shard", num_workers: int = 0) -> dict:
    """Pack the images under ``inputs`` (folders, walked recursively and sorted) into shards.

    ``max_size`` downscales the long side (re-encoding; ``format``/``quality`` choose how);
    otherwise files are copied byte for byte. Captions come from a sidecar ``NAME.txt``.
    Writes ``OUTPUT/{prefix}-NNNNNN.tar`` and ``OUTPUT/manifest.json``; returns the manifest.
    """
    if format not in FORMATS:
        raise DataError(f"format={format!r}: use one of {', '.join(FORMATS)}")
    if not 1 <= quality <= 100:
        raise DataError(f"quality={quality}: use 1..100")
    if max_samples < 1 or max_bytes < 1:
        raise DataError(f"max_samples={max_samples} / max_bytes={max_bytes}: use positive limits")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    jobs = []
    for root in inputs:
        try:
            files = list_images(root)
        except FileNotFoundError:
            raise DataError(f"input folder {root} does not exist") from None
        for path in files:
            rel = os.path.join(Path(root).name, os.path.relpath(path, root))
            jobs.append((path, rel, max_size, format, quality, min_size))
    if not jobs:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found under {', '.join(inputs)}")
    out = Path(output)
    old = _previous_shards(out)
    writer = ShardWriter(out, prefix, max_samples, max_bytes)
    skipped: list[dict] = []
    reasons: Counter = Counter()
    pool = ProcessPoolExecutor(num_workers) if num_workers > 0 else None
    results = pool.map(_encode, jobs, chunksize=8) if pool else map(_encode, jobs)
    index = 0
    try:
        for (path, rel, *_), (kind, ext, payload) in zip(jobs, results):
            if kind == "skip":
                reasons[ext] += 1
                skipped.append({"source": rel, "reason": ext, "detail": str(payload)[:200]})
                continue
            fields = {ext: payload["bytes"], "json": json.dumps(payload["meta"], sort_keys=True).encode()}
            caption = Path(path).with_suffix(".txt")
            if caption.is_file():
                fields["txt"] = caption.read_bytes()
            writer.write(f"{index:08d}", fields)
            index += 1
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool:
            pool.shutdown()
    shards = writer.close()
    for name in old - {s["name"] for s in shards}:
        (out / name).unlink(missing_ok=True)  # leftovers of an earlier, larger run
    n = len(shards)
    manifest = {
        "inputs": inputs, "samples": index, "skipped": len(skipped), "skipped_by_reason": dict(sorted(reasons.items())),
        "bytes": sum(s["bytes"] for s in shards), "shards": shards,
        "pattern": f"{prefix}-{{000000..{n - 1:06d}}}.tar" if n else None,
        "params": {"max_samples": max_samples, "max_bytes": max_bytes, "max_size": max_size, "format": format,
                   "quality": quality, "min_size": min_size},
        "sha256": {s["name"]: _sha256(out / s["name"]) for s in shards},
        "skipped_files": skipped,
    }
    atomic_write_json(out / "manifest.json", manifest, indent=1)
    print(f"vaetrain shards: {index} samples in {n} shards ({manifest['bytes'] / 1e6:.1f} MB) -> {out}; "
          f"skipped {len(skipped)} {dict(reasons) if reasons else ''}")
    return manifest


def _previous_shards(out: Path) -> set[str]:
    try:
        return {s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
