"""The streaming data module: real-photo shards, splits, determinism, URL handling, conversions and faults."""

from __future__ import annotations

import functools
import http.server
import io
import json
import random
import shutil
import tarfile
import threading
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vaetrain.cli import main
from vaetrain.commands.shards import make_shards
from vaetrain.convention import uint8_to_model
from vaetrain.data import DataError, ImageDataModule, SkipSample, crop_resize, open_image
from vaetrain.data.faults import REASONS
from vaetrain.data.sources import gopen_s3
from vaetrain.data.tars import ShardWriter, members_of
from vaetrain.safe import UserError

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
                image_size=32, batch_size=4, num_workers=0, shuffle_buffer=16, seed=3)
    args.update(kw)
    return ImageDataModule(**args)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def all_keys(n: int = N_PHOTOS) -> list[str]:
    return [f"{i:08d}" for i in range(n)]


def test_real_shards_round_trip(photo_shards):
    batches = list(dm(photo_shards).train_dataloader())
    assert len(batches) == N_PHOTOS // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
    assert set(b) == {"image", "__key__"}  # the loader's bookkeeping never reaches the trainer
    assert sorted(keys_of(batches)) == all_keys()
    imgs = torch.cat([b["image"] for b in batches]).float()
    assert imgs.std() > 20  # real content, not a constant fill
    fl = next(iter(dm(photo_shards, output="float").train_dataloader()))["image"]
    assert fl.dtype == torch.float32 and fl.min() >= -1 and fl.max() <= 1 and fl.min() < -0.5 < 0.5 < fl.max()


def test_order_is_a_function_of_seed_and_epoch(photo_shards):
    a = list(dm(photo_shards, num_workers=2).train_dataloader())
    b = list(dm(photo_shards, num_workers=2).train_dataloader())
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    loader = dm(photo_shards, num_workers=2).train_dataloader()
    e0, e1 = keys_of(loader), keys_of(loader)  # the second pass is epoch 1
    assert e0 == keys_of(a) and e1 != e0 and sorted(e1) == sorted(e0)
    m2 = dm(photo_shards, num_workers=2)
    m2.set_epoch(1)  # before the loader exists
    assert keys_of(m2.train_dataloader()) == e1
    m3 = dm(photo_shards, num_workers=2)
    m3.load_state_dict({"loader": loader.state_dict()})  # a checkpoint written after epoch 1
    assert keys_of(m3.train_dataloader()) == keys_of(loader)  # == epoch 2
    assert keys_of(dm(photo_shards, num_workers=2, seed=4).train_dataloader()) != e0


def test_two_ranks_two_workers_disjoint_equal(photo_shards):
    # epoch_length 16 = one pass: each of the 2x2 (rank, worker) slots reads one of the 4 shards once
    per_rank = [keys_of(dm(photo_shards, rank=r, world_size=2, num_workers=2, epoch_length=16).train_dataloader())
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == N_PHOTOS // 2
    assert sorted(per_rank[0] + per_rank[1]) == all_keys()
    # a longer fixed epoch: each rank cycles over its own shards, still disjoint, exactly 6 batches
    fixed = [list(dm(photo_shards, rank=r, world_size=2, num_workers=2, epoch_length=24).train_dataloader())
             for r in range(2)]
    assert len(fixed[0]) == len(fixed[1]) == 6
    assert not set(keys_of(fixed[0])) & set(keys_of(fixed[1]))


@pytest.mark.parametrize("resampled", [True, False])
def test_seven_uneven_shards_on_two_ranks_two_workers(photo_dir, tmp_path, resampled):
    """The DDP-hang case: 7 shards of 5, 5, 5, 5, 5, 5, 2 samples on 2 ranks x 2 workers. Every rank yields
    the same number of full batches, whatever share of the shards its workers got."""
    m = make_shards([str(photo_dir)], str(tmp_path), max_samples=5, max_size=48, quality=85)
    assert [s["samples"] for s in m["shards"]] == [5] * 6 + [2]  # uneven on purpose
    runs = [list(dm(tmp_path, rank=r, world_size=2, num_workers=2, resampled=resampled, epoch_length=20,
                    batch_size=2).train_dataloader()) for r in range(2)]
    assert [len(r) for r in runs] == [10, 10] and all(len(b["__key__"]) == 2 for r in runs for b in r)
    if not resampled:  # each rank reads only its own shards
        assert not set(keys_of(runs[0])) & set(keys_of(runs[1]))
    with pytest.raises(DataError, match="data.resampled=true needs data.epoch_length"):
        dm(tmp_path, resampled=True)
    with pytest.raises(DataError, match="same number of batches"):  # multi-process training without a fixed epoch
        dm(tmp_path, rank=0, world_size=2).train_dataloader()


def test_more_workers_than_shards_is_refused_in_one_line(photo_shards):
    one = sorted(str(p) for p in photo_shards.glob("*.tar"))[:1]
    with pytest.raises(DataError, match=r"^data: rank 0 loader worker 1 has no webdataset units .*resampled=true"):
        list(dm(one, num_workers=2, epoch_length=8).train_dataloader())


def test_folder_source_and_odd_names(photo_dir):
    m = ImageDataModule(source="folder", folder=str(photo_dir), image_size=32, batch_size=4, num_workers=0,
                        crop="center", flip=False, shuffle=False)
    keys = keys_of(m.train_dataloader())
    assert len(keys) == N_PHOTOS and any("'" in Path(k).name for k in keys)
    assert keys == sorted(keys)  # shuffle=false: the stored order


def test_pipe_urls_need_an_explicit_opt_in(photo_shards):
    first = sorted(photo_shards.glob("*.tar"))[0]
    url = f"pipe:cat '{first}'"
    with pytest.raises(DataError, match=r"runs a shell command; set data.allow_pipe=true") as e:
        dm(url).train_dataloader()
    assert url in str(e.value) and "\n" not in str(e.value)
    assert keys_of(dm(url, shuffle=False, allow_pipe=True).train_dataloader()) == all_keys(8)
    # a command that fails is an unreadable source, counted, not a crash
    m = dm([url, "pipe:exit 3"], shuffle=False, allow_pipe=True)
    assert keys_of(m.train_dataloader()) == all_keys(8) and m.skip_stats()["unreadable_source"] == 1


def test_http_urls_through_webdataset_gopen(photo_shards):
    """http(s):// shards stream through webdataset's curl handler (a local server stands in for a bucket)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(photo_shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        batches = list(dm(f"{base}/shard-{{000000..000001}}.tar", shuffle=False).train_dataloader())
        assert keys_of(batches) == all_keys(16)
        m = dm([f"{base}/shard-000000.tar", f"{base}/missing.tar"], shuffle=False)
        assert keys_of(m.train_dataloader()) == all_keys(8) and m.skip_stats()["unreadable_source"] == 1
    finally:
        server.shutdown()


def test_s3_urls_go_to_the_aws_cli(photo_shards, monkeypatch):
    """s3:// opens through `aws s3 cp URL -` (registered in webdataset's scheme table); here it cannot reach a
    bucket, so the shard is an unreadable source, counted, next to a readable one."""
    assert wds.gopen_schemes["s3"] is gopen_s3
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookups over the network
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    first = str(sorted(photo_shards.glob("*.tar"))[0])
    m = dm([first, "s3://vaetrain-no-such-bucket/shard.tar"], shuffle=False)
    assert keys_of(m.train_dataloader()) == all_keys(8) and m.skip_stats()["unreadable_source"] == 1


def test_synthetic_source_and_val():
    m = ImageDataModule(source="synthetic", image_size=32, batch_size=4, num_workers=0, synthetic_count=8,
                        val_count=3, val_image_size=24)
    batches = list(m.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 3, 32, 32)
    img = batches[0]["image"].float()
    # edges and texture: strong horizontal gradients somewhere, many distinct values
    assert (img[..., 1:] - img[..., :-1]).abs().amax() > 100 and img.unique().numel() > 100
    again = list(ImageDataModule(source="synthetic", image_size=32, batch_size=4, num_workers=0,
                                 synthetic_count=8).train_dataloader())
    assert torch.equal(again[0]["image"], batches[0]["image"])
    val = list(m.val_dataloader())
    assert sum(len(b["__key__"]) for b in val) == 3 and val[0]["image"].shape[1:] == (3, 24, 24)


def test_val_folder_centre_crop(assets):
    m = ImageDataModule(source="synthetic", image_size=32, batch_size=2, num_workers=0,
                        val_folder=str(assets / "images" / "eval" / "kodak24"), val_count=3, val_image_size=32)
    a, b = list(m.val_dataloader()), list(m.val_dataloader())
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
def good_jpegs(photo_shards) -> list[bytes]:
    out = []
    for shard in sorted(photo_shards.glob("*.tar")):
        out += [d for n, d in members_of(shard.read_bytes()) if n.endswith(".jpg")]
    return out


@pytest.fixture(scope="module")
def salted(photo_shards, tmp_path_factory) -> list[str]:
    """3 shards: 2 corrupt JPEGs, 1 truncated JPEG, 2 image-less samples, 1 tar cut inside a member and one
    cut exactly at a member boundary (what tarfile's stream mode takes for a complete archive)."""
    good = good_jpegs(photo_shards)
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
    shards = [out / s["name"] for s in w.close()]
    w = ShardWriter(out, "cut", max_samples=9)
    for i in range(4):                                   # shard 3: 4 good, cut right after sample 2
        w.write(f"d{i}", {"jpg": good[22 + i]})
    shards += [out / s["name"] for s in w.close()]
    data = shards[2].read_bytes()
    pos = data.index(b"c5.jpg")  # the header of sample 5's image; cut 100 bytes into its data
    shards[2].write_bytes(data[: pos - pos % 512 + 512 + 100])
    data = shards[3].read_bytes()
    pos = data.index(b"d3.jpg")  # the header of sample 3: cut exactly before it
    shards[3].write_bytes(data[: pos - pos % 512])
    return [str(s) for s in shards]


EXPECTED = {"corrupt_image": 2, "truncated_image": 1, "no_image": 2, "too_small": 0, "truncated_tar": 2,
            "unreadable_source": 0, "malformed_sample": 0, "bad_cache_record": 0, "samples": 6 + 7 + 5 + 3}
GOOD = [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(7)] + [f"c{i}" for i in range(5)] + \
    [f"d{i}" for i in range(3)]


def test_truncation_at_a_member_boundary_is_seen(salted):
    with tarfile.open(salted[3], "r|") as tf:  # what webdataset's tar_file_iterator relies on
        assert len([m for m in tf]) == 3      # three members, no error: looks complete
    m = dm([salted[3]], batch_size=1, shuffle=False)
    assert keys_of(m.train_dataloader()) == ["d0", "d1", "d2"] and m.skip_stats()["truncated_tar"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_salted_shards_exact_skip_counts(salted, workers):
    m = dm(salted, num_workers=workers, batch_size=2, max_skip_rate=0.5, min_samples_for_skip_rate=10,
           drop_last=False)
    keys = keys_of(m.train_dataloader())
    assert m.skip_stats() == EXPECTED  # aggregated over the worker processes
    assert sorted(keys) == sorted(GOOD)


def test_salted_shards_train_through_lightning(salted):
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

    def make():
        return dm(salted, num_workers=2, batch_size=3, max_skip_rate=0.5, min_samples_for_skip_rate=10,
                  drop_last=False)

    plain = list(make().train_dataloader())
    m, model = make(), Tiny()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=m)
    assert model.seen == len(GOOD) and trainer.global_step == len(plain)
    assert m.skip_stats() == EXPECTED


def test_skip_rate_abort_is_one_clear_line(salted):
    msg = r"skip rate \d+\.\d% exceeds data.max_skip_rate=10\.0% \(\d+ skipped of \d+; top reasons: [a-z_]+=\d"
    for workers in (0, 2):
        m = dm(salted, num_workers=workers, batch_size=2, max_skip_rate=0.1, min_samples_for_skip_rate=4)
        with pytest.raises(DataError, match=msg) as e:
            list(m.train_dataloader())
        text = str(e.value)
        assert "\n" not in text and "Traceback" not in text and "Caught" not in text  # not torch's wrapper
        assert isinstance(e.value, UserError)


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("allbad")
    w = ShardWriter(out, "bad", max_samples=3)
    for i in range(6):
        w.write(f"x{i}", {"jpg": b"\xff\xd8 not a jpeg " * 4})
    w.close()
    return out


@pytest.mark.parametrize("options", [dict(), dict(epoch_length=8), dict(epoch_length=8, resampled=True),
                                     dict(epoch_length=8, resampled=True, max_skip_rate=1.0)])
def test_a_dataset_that_is_all_bad_stops_with_one_line(all_bad, options):
    """Few samples (below min_samples_for_skip_rate), endless resampling, even max_skip_rate=1: never a hang."""
    m = dm(all_bad, num_workers=1, batch_size=2, min_samples_for_skip_rate=200, **options)
    with pytest.raises(DataError) as e:
        list(m.train_dataloader())
    text = str(e.value)
    assert "\n" not in text and "corrupt_image=" in text and "Traceback" not in text, text


def test_missing_shard_file_is_named(salted, tmp_path):
    missing = str(tmp_path / "shard-000007.tar")
    with pytest.raises(DataError, match=r"^data.shards: shard file .*shard-000007.tar does not exist"):
        dm(salted + [missing]).train_dataloader()
    with pytest.raises(DataError, match="data.folder: image folder /nonexistent/x does not exist"):
        ImageDataModule(source="folder", folder="/nonexistent/x").train_dataloader()


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", -1, r"data.batch_size=-1: use an integer >= 1"),
    ("num_workers", -2, r"data.num_workers=-2"),
    ("image_size", 0, r"data.image_size=0"),
    ("max_skip_rate", 1.5, r"data.max_skip_rate=1.5"),
    ("epoch_length", 3, r"data.epoch_length=3: samples per rank per epoch, at least one batch"),
    ("source", "nope", r"data.source='nope': use one of"),
    ("crop", "middle", r"data.crop='middle'"),
    ("resample", "cubic", r"data.resample='cubic'"),
    ("aspect_ratio", 1.3, r"data.aspect_ratio=1.3: the width .* must be a multiple of 8"),
    ("scale", [0.5, 0.2], r"data.scale=\[0.5, 0.2\]"),
    ("resize_to", 16, r"data.resize_to=16: use null or an integer >= data.image_size"),
    ("colour", 1, r"data.colour: no such data option"),
])
def test_bad_options_are_one_line_naming_key_and_value(key, value, match):
    with pytest.raises(DataError, match=match) as e:
        ImageDataModule(**{**dict(source="synthetic", image_size=32, batch_size=4, epoch_length=8), key: value})
    assert "\n" not in str(e.value)


def test_cli_prints_data_errors_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "experiment=tiny", "data.batch_size=-1", f"run_dir={tmp_path}"])
    assert "data.batch_size=-1" in str(e.value.code) and "\n" not in str(e.value.code)


def test_every_reason_is_counted_somewhere():
    assert set(EXPECTED) == set(REASONS) | {"samples"}
