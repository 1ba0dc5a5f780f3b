"""The streaming data module: real-photo shards, splits, determinism, conversions and faults."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetrain.data import ImageDataModule, SkipSample, crop_resize, open_image, tar_members, _Stream
from vaetrain.shards import ShardWriter, make_shards

N_PHOTOS = 32


@pytest.fixture(scope="module")
def photo_dir(assets, tmp_path_factory) -> Path:
    """32 real photos (one with an apostrophe in its name) copied into a folder."""
    src = assets / "images" / "train" / "imagenet400"
    files = sorted(src.iterdir())
    pick = [f for f in files if "'" in f.name][:1] + [f for f in files if "'" not in f.name][: N_PHOTOS - 1]
    out = tmp_path_factory.mktemp("photos")
    for f in pick:
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def photo_shards(photo_dir, tmp_path_factory) -> Path:
    """The photos downscaled to 64 px and packed 8 per shard: 4 equal shards."""
    out = tmp_path_factory.mktemp("shards")
    m = make_shards([str(photo_dir)], str(out), max_samples=8, max_size=64, quality=90)
    assert m["samples"] == N_PHOTOS and len(m["shards"]) == 4
    return out


def dm(shards, **kw) -> ImageDataModule:
    args = dict(source="webdataset", shards=shards if isinstance(shards, list) else str(shards),
                image_size=32, batch_size=4, num_workers=0,
                shuffle_buffer=16, seed=3)
    args.update(kw)
    return ImageDataModule(**args)


def collect(loader) -> list[dict]:
    return [b for b in loader]


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def test_real_shards_round_trip(photo_shards):
    batches = collect(dm(photo_shards).train_dataloader())
    assert len(batches) == N_PHOTOS // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
    assert sorted(keys_of(batches)) == [f"{i:08d}" for i in range(N_PHOTOS)]
    imgs = torch.cat([b["image"] for b in batches]).float()
    assert imgs.std() > 20  # real content, not a constant fill
    fl = collect(dm(photo_shards, output="float", num_workers=0).train_dataloader())[0]["image"]
    assert fl.dtype == torch.float32 and fl.min() >= -1 and fl.max() <= 1 and fl.min() < -0.5 < 0.5 < fl.max()


def test_determinism_per_seed_and_epoch(photo_shards):
    a = collect(dm(photo_shards).train_dataloader())
    b = collect(dm(photo_shards).train_dataloader())
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    m = dm(photo_shards)
    loader = m.train_dataloader()
    e0, e1 = keys_of(collect(loader)), keys_of(collect(loader))  # the second pass is epoch 1
    assert e0 == keys_of(a) and e1 != e0 and sorted(e1) == sorted(e0)
    assert m.state_dict()["next_epoch"] == 2
    m2 = dm(photo_shards)
    m2.set_epoch(1)
    assert keys_of(collect(m2.train_dataloader())) == e1
    m3 = dm(photo_shards)  # a resumed run: the checkpointed data module state picks the epoch
    m3.load_state_dict({"next_epoch": 1})
    assert keys_of(collect(m3.train_dataloader())) == e1
    other_seed = collect(dm(photo_shards, seed=4).train_dataloader())
    assert keys_of(other_seed) != keys_of(a)


def test_two_ranks_two_workers_disjoint_equal(photo_shards):
    # epoch_length 16 = one pass: each of the 2x2 (rank, worker) slots reads one of the 4 shards once
    per_rank = [keys_of(collect(dm(photo_shards, rank=r, world_size=2, num_workers=2,
                                   epoch_length=16).train_dataloader())) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == N_PHOTOS // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:08d}" for i in range(N_PHOTOS)]
    # fixed epoch length: each rank cycles over its own shards, still disjoint, exactly 6 batches
    fixed = [collect(dm(photo_shards, rank=r, world_size=2, num_workers=2, epoch_length=24).train_dataloader())
             for r in range(2)]
    assert len(fixed[0]) == len(fixed[1]) == 6
    assert not set(keys_of(fixed[0])) & set(keys_of(fixed[1]))


def test_resampled_uneven_shards_equal_batches(photo_dir, tmp_path):
    m = make_shards([str(photo_dir)], str(tmp_path), max_samples=5, max_size=48, quality=85)
    assert [s["samples"] for s in m["shards"]] == [5] * 6 + [2]  # uneven on purpose
    lens = [len(collect(dm(tmp_path, rank=r, world_size=2, num_workers=2, resampled=True,
                           epoch_length=20).train_dataloader())) for r in range(2)]
    assert lens == [5, 5]
    with pytest.raises(ValueError, match="epoch_length"):
        dm(tmp_path, resampled=True).train_dataloader()
    with pytest.raises(ValueError, match="same number of batches"):  # multi-process training on shards
        dm(tmp_path, rank=0, world_size=2).train_dataloader()


def test_folder_source_and_odd_names(photo_dir):
    m = ImageDataModule(source="folder", folder=str(photo_dir), image_size=32, batch_size=4, num_workers=0,
                        crop="center", flip=False, shuffle=False)
    keys = keys_of(collect(m.train_dataloader()))
    assert len(keys) == N_PHOTOS and any("'" in Path(k).name for k in keys)


def test_pipe_url(photo_shards):
    first = sorted(photo_shards.glob("*.tar"))[0]
    batches = collect(dm(f"pipe:cat '{first}'", shuffle=False).train_dataloader())
    assert keys_of(batches) == [f"{i:08d}" for i in range(8)]


def test_synthetic_source_and_val():
    m = ImageDataModule(source="synthetic", image_size=32, batch_size=4, num_workers=0, synthetic_count=8,
                        val_count=3, val_image_size=24)
    batches = collect(m.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 3, 32, 32)
    img = batches[0]["image"].float()
    # edges and texture: strong horizontal gradients somewhere, many distinct values
    assert (img[..., 1:] - img[..., :-1]).abs().amax() > 100 and img.unique().numel() > 100
    again = collect(ImageDataModule(source="synthetic", image_size=32, batch_size=4, num_workers=0,
                                    synthetic_count=8).train_dataloader())
    assert torch.equal(again[0]["image"], batches[0]["image"])
    val = collect(m.val_dataloader())
    assert sum(len(b["__key__"]) for b in val) == 3 and val[0]["image"].shape[1:] == (3, 24, 24)


def test_val_folder_centre_crop(assets):
    m = ImageDataModule(source="synthetic", image_size=32, batch_size=2, num_workers=0,
                        val_folder=str(assets / "images" / "eval" / "kodak24"), val_count=3, val_image_size=32)
    a, b = collect(m.val_dataloader()), collect(m.val_dataloader())
    assert [x["__key__"] for x in a] == [x["__key__"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert sum(x["image"].shape[0] for x in a) == 3 and Path(a[0]["__key__"][0]).name == "kodim01.png"


# ---------------------------------------------------------------------------------------------
# decoding: every mode conversion
# ---------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_la_pa_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(open_image(encode(rgba, "PNG")))
    assert out.shape == (8, 8, 3) and tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (8, 8), (0, 128))
    out = np.asarray(open_image(encode(la, "PNG")))
    assert tuple(out[0, 0]) == (127, 127, 127)  # black over white at half alpha
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    out = np.asarray(open_image(encode(p, "PNG", transparency=1)))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[3, 3]) == (255, 255, 255)
    out = np.asarray(open_image(encode(p, "PNG")))  # no transparency: the palette colour
    assert tuple(out[3, 3]) == (0, 255, 0)


def test_grey_bilevel_cmyk_16bit_to_rgb():
    out = np.asarray(open_image(encode(Image.new("L", (8, 8), 77), "PNG")))
    assert out.shape == (8, 8, 3) and (out == 77).all()
    out = np.asarray(open_image(encode(Image.new("1", (8, 8), 1), "PNG")))
    assert (out == 255).all()
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(open_image(encode(cmyk, "JPEG", quality=100))).astype(int)
    assert out.shape == (16, 16, 3) and out[8, 8, 0] > 240 and out[8, 8, 1:].max() < 15
    arr16 = np.array([[65535, 32896], [0, 257]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    img16 = Image.fromarray(arr16)  # uint16 -> mode I;16
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    out = np.asarray(open_image(data))
    assert out[0, 0].tolist() == [255] * 3 and out[0, 4].tolist() == [128] * 3 and out[4, 4].tolist() == [1] * 3
    tif = np.asarray(open_image(encode(img16, "TIFF")))
    assert tif[0, 0].tolist() == [255] * 3


def test_exif_orientation_applied():
    img = Image.new("RGB", (16, 8), (255, 0, 0))
    img.paste((0, 0, 255), (8, 0, 16, 8))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 deg clockwise
    out = np.asarray(open_image(encode(img, "JPEG", quality=100, exif=exif.tobytes())))
    assert out.shape == (16, 8, 3)
    assert out[2, 4, 0] > 200 and out[13, 4, 2] > 200  # left (red) went to the top


def test_min_size_and_bad_bytes():
    with pytest.raises(SkipSample) as e:
        open_image(encode(Image.new("RGB", (20, 40)), "PNG"), min_size=32)
    assert e.value.reason == "too_small"
    with pytest.raises(SkipSample) as e:
        open_image(b"not an image at all")
    assert e.value.reason == "corrupt_image"
    jpg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(SkipSample) as e:
        open_image(jpg[: len(jpg) // 2])
    assert e.value.reason == "truncated_image"


def test_crop_resize_draft_matches_full_decode():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).resize((960, 640), Image.BICUBIC)
    data = encode(big, "JPEG", quality=95)
    # white noise at the target's Nyquist: the worst case for DCT downscaling
    a = crop_resize(open_image(data, draft_short=128), 64, "center", False, random.Random(0)).astype(float)
    b = crop_resize(open_image(data), 64, "center", False, random.Random(0)).astype(float)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).mean() < 1.5  # the loader drafts to 2x


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def salted(photo_shards, tmp_path_factory) -> list[str]:
    """3 shards + a missing one: 2 corrupt JPEGs, 1 truncated JPEG, 2 image-less samples, 1 truncated tar."""
    good = []
    for shard in sorted(photo_shards.glob("*.tar")):
        good += [d for n, d in tar_members(_Stream(str(shard))) if n.endswith(".jpg")]
    out = tmp_path_factory.mktemp("salted")
    w = ShardWriter(out, "bad", max_samples=9)
    meta = json.dumps({"x": 1}).encode()
    for i in range(6):                                   # shard 0: 6 good, 2 corrupt, 1 truncated
        w.write(f"a{i}", {"jpg": good[i], "json": meta})
    w.write("a_corrupt1", {"jpg": b"\xff\xd8garbage" * 20, "json": meta})
    w.write("a_corrupt2", {"jpg": bytes(300), "json": meta})
    w.write("a_trunc", {"jpg": good[6][: len(good[6]) // 2], "json": meta})
    for i in range(7):                                   # shard 1: 7 good, 2 without an image
        w.write(f"b{i}", {"jpg": good[7 + i], "json": meta})
    w.write("b_noimg1", {"json": meta, "txt": b"a caption"})
    w.write("b_noimg2", {"txt": b"only text"})
    for i in range(8):                                   # shard 2: 8 good, cut inside sample 5
        w.write(f"c{i}", {"jpg": good[14 + i], "json": meta})
    shards = w.close()
    third = out / shards[2]["name"]
    data = third.read_bytes()
    pos = data.index(b"c5.jpg")  # the header of sample 5's image; cut 100 bytes into its data
    third.write_bytes(data[: pos - pos % 512 + 512 + 100])
    return [str(out / s["name"]) for s in shards] + [str(out / "missing.tar")]


EXPECTED = {"corrupt_image": 2, "truncated_image": 1, "no_image": 2, "too_small": 0, "truncated_tar": 1,
            "unreadable_source": 1, "bad_cache_record": 0, "samples": 6 + 7 + 5}


def test_salted_shards_exact_skip_counts(salted):
    m = dm(salted, num_workers=2, batch_size=2, max_skip_rate=0.5, min_samples_for_skip_rate=10, drop_last=False)
    keys = keys_of(collect(m.train_dataloader()))
    assert m.skip_stats() == EXPECTED  # aggregated over both worker processes
    assert sorted(keys) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(7)] +
                                  [f"c{i}" for i in range(5)])


def test_salted_shards_train_through_lightning(salted):
    import lightning.pytorch as pl

    from vaetrain.convention import uint8_to_model

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.seen = 0

        def training_step(self, batch, _):
            self.seen += batch["image"].shape[0]
            x = uint8_to_model(batch["image"])
            return (self.conv(x) - x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    m = dm(salted, num_workers=2, batch_size=2, max_skip_rate=0.5, min_samples_for_skip_rate=10, drop_last=False)
    model = Tiny()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=m)
    assert model.seen == 18 and trainer.global_step >= 9
    assert m.skip_stats() == EXPECTED


def test_skip_rate_abort_is_one_clear_error(salted):
    m = dm(salted, num_workers=0, batch_size=2, max_skip_rate=0.1, min_samples_for_skip_rate=4)
    msg = r"skip rate \d+\.\d% exceeds max_skip_rate=10\.0% \(\d+ skipped of \d+; top reasons: [a-z_]+=\d"
    with pytest.raises(RuntimeError, match=msg):
        collect(m.train_dataloader())
    # the main-process check (what Lightning calls before each batch) says the same
    with pytest.raises(RuntimeError, match="top reasons"):
        m.check_skip_rate()


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="use one of"):
        ImageDataModule(source="nope")
    with pytest.raises(ValueError, match="needs shards"):
        ImageDataModule(source="webdataset")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule(source="folder", folder="/nonexistent/x").train_dataloader()


def test_lightning_epochs_follow_seed_and_epoch(photo_shards):
    """Under Lightning (persistent workers, set_epoch at each epoch start as the training module does),
    epoch e streams exactly what a plain loop's epoch e streams."""
    import lightning.pytorch as pl

    seen: list[list[str]] = []

    class Record(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def on_train_epoch_start(self):
            self.trainer.datamodule.set_epoch(self.current_epoch)
            seen.append([])

        def training_step(self, batch, _):
            seen[-1].extend(batch["__key__"])
            return self.w * batch["image"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    m = dm(photo_shards, num_workers=2)
    pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Record(), datamodule=m)
    loader = dm(photo_shards, num_workers=2).train_dataloader()
    plain = [keys_of(collect(loader)) for _ in range(3)]
    assert seen == plain and plain[0] != plain[1] != plain[2]


def test_http_url(photo_shards):
    """http(s):// shards stream through curl (a local server stands in for a bucket)."""
    import functools
    import http.server
    import threading

    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(photo_shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/shard-{{000000..000001}}.tar"
        batches = collect(dm(url, shuffle=False).train_dataloader())
        assert keys_of(batches) == [f"{i:08d}" for i in range(16)]
        m = dm(f"http://127.0.0.1:{port}/missing.tar", shuffle=False)
        assert collect(m.train_dataloader()) == [] and m.skip_stats()["unreadable_source"] == 1
    finally:
        server.shutdown()
