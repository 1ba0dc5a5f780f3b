"""Images: bytes -> upright RGB, and the crops and resampling that turn a photo into a training sample.

``Preprocess`` holds the options (their names are the ``data.*`` config keys) and applies them to one
image with a per-sample ``random.Random``; every option is a mode real recipes use:

- default: resize so the output box is covered (short side -> ``image_size`` for square crops), crop;
- ``resize_to``: resize the short side to ``resize_to`` first, then crop ``image_size`` from it
  (SD-VAE-FT's practice: the crop keeps more of the photo's native detail than a full-frame resize);
- ``scale=[lo, hi]``: random resized crops, the window covering lo..hi of the largest window of the
  output's aspect ratio that fits (no stretching: a VAE must not learn distorted images);
- ``native_fraction``: that fraction of samples is a crop at native resolution, no resampling at all
  (the high frequencies a decoder exists to reproduce; fal's trainer mixes them in). Images smaller
  than the crop take the resized path instead;
- ``resample``: bicubic (default), bilinear, lanczos, box, or nearest (pixel-art decoders);
- ``aspect_ratio``: non-square crops, width = image_size * aspect_ratio (a multiple of 8);
- ``min_size``: skip images whose short side is below it, in every mode (no upscaling of thumbnails).

Every mode resamples once, from the source box straight to the output size (``resize(box=...)``), so
big photos are never resized whole.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vaetrain.data.faults import DataError, SkipSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "box": Image.BOX,
            "nearest": Image.NEAREST}
CROPS = ("random", "center")


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


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes one (H, W, 3) uint8 sample; field names are the ``data.*`` keys."""

    image_size: int = 256
    aspect_ratio: float = 1.0
    crop: str = "random"
    flip: bool = True
    resize_to: int | None = None
    scale: tuple[float, float] | None = None
    native_fraction: float = 0.0
    resample: str = "bicubic"
    min_size: int = 0

    def __post_init__(self):
        if self.scale is not None:
            object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        bad = self.problem()
        if bad:
            raise DataError(bad)

    def problem(self) -> str | None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            return f"data.image_size={self.image_size!r}: use an integer >= 8"
        if not isinstance(self.aspect_ratio, (int, float)) or self.aspect_ratio <= 0:
            return f"data.aspect_ratio={self.aspect_ratio!r}: use a positive width/height ratio"
        w = self.image_size * self.aspect_ratio
        if abs(w - round(w)) > 1e-6 or round(w) % 8:
            lo, hi = int(w) // 8 * 8, int(w) // 8 * 8 + 8
            return (f"data.aspect_ratio={self.aspect_ratio}: the width image_size*aspect_ratio = {w:g} must be a "
                    f"multiple of 8 (e.g. aspect_ratio={lo / self.image_size:g} or {hi / self.image_size:g})")
        if self.crop not in CROPS:
            return f"data.crop={self.crop!r}: use 'random' or 'center'"
        if self.resample not in RESAMPLE:
            return f"data.resample={self.resample!r}: use one of {', '.join(RESAMPLE)}"
        if self.resize_to is not None and (not isinstance(self.resize_to, int) or self.resize_to < self.image_size):
            return f"data.resize_to={self.resize_to!r}: use null or an integer >= data.image_size ({self.image_size})"
        if self.scale is not None:
            if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
                return f"data.scale={list(self.scale)}: use [lo, hi] with 0 < lo <= hi <= 1, or null"
            if self.resize_to is not None:
                return "data.scale and data.resize_to are two ways to choose the crop: set one of them"
        if not isinstance(self.native_fraction, (int, float)) or not 0 <= self.native_fraction <= 1:
            return f"data.native_fraction={self.native_fraction!r}: use a fraction in [0, 1]"
        if not isinstance(self.min_size, int) or self.min_size < 0:
            return f"data.min_size={self.min_size!r}: use an integer >= 0"
        return None

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of a sample."""
        return round(self.image_size * self.aspect_ratio), self.image_size

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["scale"] = list(self.scale) if self.scale is not None else None
        return d

    def pick_native(self, rng: random.Random) -> bool:
        """Whether this sample is a native-resolution crop (decided before decoding: no JPEG draft then)."""
        return self.native_fraction > 0 and rng.random() < self.native_fraction

    def draft_short(self, native: bool) -> int | None:
        """The short side the JPEG decoder may downscale to: 2x what the output needs (1x aliases
        visibly, 2x is near-exact), more when a random-resized window zooms in; none for native crops and
        nearest-neighbour resampling, which must see the stored pixels."""
        if native or self.resample == "nearest":
            return None
        need = max(self.out_size) * 2
        if self.scale is not None:
            need = math.ceil(need / math.sqrt(self.scale[0]))
        return need

    def apply(self, img: Image.Image, rng: random.Random, native: bool = False) -> np.ndarray:
        """One image -> (H, W, 3) uint8 with this sample's random draws."""
        out_w, out_h = self.out_size
        w, h = img.size
        if native and w >= out_w and h >= out_h:
            if self.crop == "random":
                ox, oy = rng.randint(0, w - out_w), rng.randint(0, h - out_h)
            else:
                ox, oy = (w - out_w) // 2, (h - out_h) // 2
            out = img.crop((ox, oy, ox + out_w, oy + out_h))
        else:
            box = self._scale_box(w, h, rng) if self.scale is not None else self._cover_box(w, h, rng)
            out = img.resize((out_w, out_h), RESAMPLE[self.resample], box=box)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)  # (H, W, 3)

    def _cover_box(self, w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
        # resize so that the (resize_to-scaled) output box is covered, choose the crop on that grid, map it
        # back to the source: one resampling pass of just the crop
        out_w, out_h = self.out_size
        k = (self.resize_to or out_h) / out_h
        s = max(out_w * k / w, out_h * k / h)
        rw, rh = max(round(out_w * k), round(w * s)), max(round(out_h * k), round(h * s))
        if self.crop == "random":
            ox, oy = rng.randint(0, rw - out_w), rng.randint(0, rh - out_h)
        else:
            ox, oy = (rw - out_w) // 2, (rh - out_h) // 2
        sx, sy = w / rw, h / rh
        return ox * sx, oy * sy, (ox + out_w) * sx, (oy + out_h) * sy

    def _scale_box(self, w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
        out_w, out_h = self.out_size
        ar = out_w / out_h
        full_w, full_h = (h * ar, h) if w / h > ar else (w, w / ar)  # largest window of the output's aspect
        lo, hi = self.scale
        side = math.sqrt(rng.uniform(lo, hi))  # area fraction -> side fraction
        bw, bh = full_w * side, full_h * side
        if self.crop == "random":
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        else:
            x, y = (w - bw) / 2, (h - bh) / 2
        return x, y, x + bw, y + bh


def crop_resize(img: Image.Image, size: int, crop: str, flip: bool, rng: random.Random) -> np.ndarray:
    """Short side -> ``size`` (bicubic) and a ``size`` x ``size`` crop: (S, S, 3) uint8. The plain case of
    ``Preprocess``, kept for evaluation code."""
    return Preprocess(image_size=size, crop=crop, flip=flip).apply(img, rng)


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


def list_images(folders: str | os.PathLike | Iterable[str]) -> list[str]:
    """Every image file under the folders, recursively, sorted; any legal file name.
    A folder that does not exist raises ``FileNotFoundError``."""
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
