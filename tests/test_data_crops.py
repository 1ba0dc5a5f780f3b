"""Crop and resampling modes (data.resize_to, scale, native_fraction, resample, aspect_ratio, min_size), each
against the plain PIL operation it stands for, and through the data module."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaetrain.data import ImageDataModule, Preprocess, SkipSample, open_image


def coords_image(w: int, h: int) -> Image.Image:
    """Every pixel says where it is: R = x, G = y (mod 256), B = a fixed texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx % 256, yy % 256, (xx * 7 + yy * 13) % 256], -1).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(arr)


def folder_of(tmp_path: Path, images: dict[str, Image.Image]) -> str:
    for name, img in images.items():
        img.save(tmp_path / f"{name}.png")
    return str(tmp_path)


def test_default_is_short_side_resize_then_crop():
    img = coords_image(120, 80)
    out = Preprocess(image_size=40, crop="center", flip=False).apply(img, random.Random(0))
    ref = np.asarray(img.resize((60, 40), Image.BICUBIC))[:, 10:50]  # the whole-image resize, then the crop
    assert out.shape == (40, 40, 3) and np.abs(out.astype(int) - ref).mean() < 1.0


def test_resize_to_then_crop_keeps_more_detail():
    """SD-VAE-FT's practice: short side -> resize_to, then an image_size crop (less of the frame, more detail)."""
    img = coords_image(200, 160)
    out = Preprocess(image_size=40, resize_to=80, crop="center", flip=False).apply(img, random.Random(0))
    ref = np.asarray(img.resize((100, 80), Image.BICUBIC))[20:60, 30:70]
    assert out.shape == (40, 40, 3) and np.abs(out.astype(int) - ref).mean() < 1.0
    # the crop spans 40 px of an 80 px short side: half the frame's height, so x covers ~80 source pixels
    assert 70 < int(out[:, -1, 0].mean()) - int(out[:, 0, 0].mean()) < 90


def test_native_crops_are_the_stored_pixels():
    img = coords_image(64, 48)
    p = Preprocess(image_size=16, native_fraction=1.0, crop="random", flip=False)
    src = np.asarray(img)
    for seed in range(5):
        rng = random.Random(seed)
        out = p.apply(img, rng, native=p.pick_native(rng))
        x, y = int(out[0, 0, 0]), int(out[0, 0, 1])  # the coordinates the crop starts at
        assert np.array_equal(out, src[y:y + 16, x:x + 16])
    # too small for a native crop: the resized path, never an error or a padded crop
    small = coords_image(12, 10)
    rng = random.Random(0)
    assert p.apply(small, rng, native=p.pick_native(rng)).shape == (16, 16, 3)
    assert p.draft_short(True) is None  # the JPEG decoder must not downscale a native crop


def test_native_fraction_mixes_native_and_resized(tmp_path):
    big = coords_image(256, 192)
    m = ImageDataModule(source="folder", folder=folder_of(tmp_path, {f"i{i}": big for i in range(40)}),
                        image_size=32, batch_size=40, num_workers=0, native_fraction=0.5, flip=False)
    out = next(iter(m.train_dataloader()))["image"].numpy()  # (40, 3, 32, 32)
    # a native crop steps 1 source pixel per output pixel; the resized ones ~6 (192 px short side -> 32)
    steps = out[:, 0, 0, 1:].astype(int) - out[:, 0, 0, :-1].astype(int)
    native = (steps == 1).all(axis=1)
    assert 10 < native.sum() < 30 and (np.abs(steps[~native]).mean(axis=1) > 4).all()


def test_nearest_resampling_keeps_the_palette():
    blocks = np.kron(np.random.default_rng(0).integers(0, 4, (8, 8)), np.ones((4, 4), int))  # 4 px pixel-art cells
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]], np.uint8)
    img = Image.fromarray(palette[blocks])  # (32, 32, 3)
    colours = {tuple(c) for c in palette}
    near = Preprocess(image_size=16, resample="nearest", crop="center", flip=False).apply(img, random.Random(0))
    assert {tuple(c) for c in near.reshape(-1, 3)} <= colours
    assert np.array_equal(near, np.asarray(img.resize((16, 16), Image.NEAREST)))  # PIL's own nearest
    bic = Preprocess(image_size=16, crop="center", flip=False).apply(img, random.Random(0))
    assert not {tuple(c) for c in bic.reshape(-1, 3)} <= colours  # bicubic invents in-between colours
    assert Preprocess(image_size=16, resample="nearest").draft_short(False) is None


def test_random_resized_crops_cover_the_scale_range():
    p = Preprocess(image_size=32, aspect_ratio=1.5, scale=(0.25, 0.5))
    areas = []
    for seed in range(200):
        x0, y0, x1, y1 = p._scale_box(300, 200, random.Random(seed))
        assert -1e-6 <= x0 and -1e-6 <= y0 and x1 <= 300 + 1e-6 and y1 <= 200 + 1e-6
        assert abs((x1 - x0) / (y1 - y0) - 1.5) < 1e-6          # the output's aspect: no stretching
        areas.append((x1 - x0) * (y1 - y0) / (300 * 200))         # the largest 1.5:1 window is the whole frame
    assert 0.25 - 1e-6 <= min(areas) < 0.28 and 0.47 < max(areas) <= 0.5 + 1e-6
    # end to end: a centred quarter-area crop of the coordinates image spans half its width
    img = coords_image(240, 160)
    out = Preprocess(image_size=32, aspect_ratio=1.5, scale=(0.25, 0.25), crop="center", flip=False).apply(
        img, random.Random(0))
    assert out.shape == (32, 48, 3) and abs(int(out[16, 0, 0]) - 60) <= 3 and abs(int(out[16, -1, 0]) - 180) <= 3
    assert p.draft_short(False) == 2 * 48 * 2  # zooming in to 1/4 of the area needs twice the resolution


def test_non_square_crops_through_the_data_module(tmp_path):
    m = ImageDataModule(source="folder", folder=folder_of(tmp_path, {"a": coords_image(300, 120),
                                                                      "b": coords_image(100, 200)}),
                        image_size=32, aspect_ratio=2.0, batch_size=2, num_workers=0, crop="center", flip=False,
                        shuffle=False)
    b = next(iter(m.train_dataloader()))["image"]
    assert b.shape == (2, 3, 32, 64)
    tall = b[1].permute(1, 2, 0).numpy()  # (32, 64, 3): a 100x200 image covered at width 64 -> centre band
    assert abs(int(tall[:, -1, 0].mean()) - 99) <= 3 and abs(int(tall[:, 0, 0].mean()) - 0) <= 3


@pytest.mark.parametrize("mode", [dict(), dict(resize_to=48), dict(scale=(0.5, 1.0)), dict(native_fraction=1.0)])
def test_min_size_filters_in_every_mode(tmp_path, mode):
    images = {"big": coords_image(80, 64), "small": coords_image(40, 30), "tiny": coords_image(20, 20)}
    m = ImageDataModule(source="folder", folder=folder_of(tmp_path, images), image_size=32, batch_size=1,
                        num_workers=0, min_size=32, drop_last=False, **mode)
    keys = [Path(k).stem for b in m.train_dataloader() for k in b["__key__"]]
    assert sorted(keys) == ["big"] and m.skip_stats()["too_small"] == 2
    with pytest.raises(SkipSample):
        open_image(Path(tmp_path / "tiny.png").read_bytes(), min_size=32)


def test_flip_is_a_mirror():
    img = coords_image(32, 32)
    p = Preprocess(image_size=32, crop="center", flip=True)
    outs = [p.apply(img, random.Random(s)) for s in range(8)]
    plain = np.asarray(img)
    assert any(np.array_equal(o, plain) for o in outs) and any(np.array_equal(o, plain[:, ::-1]) for o in outs)
