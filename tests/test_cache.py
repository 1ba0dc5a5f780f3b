"""`vaetrain cache-latents`: the cache round trip, rank splits, and stale caches refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vaetrain.commands.cache_latents import cache_latents
from vaetrain.commands.shards import make_shards
from vaetrain.convention import uint8_to_model
from vaetrain.data import DataError, ImageDataModule
from vaetrain.data.latent_cache import teacher_fingerprint
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.taesd import TAESD


@pytest.fixture(scope="module")
def photos(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    for f in sorted((assets / "images" / "train" / "bsds500").iterdir())[:12]:
        shutil.copy(f, out / f.name)
    return out


def kl_teacher(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    # scale/shift != (1, 0) so the cache must store the diffusion-space posterior
    return AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                         encoder_attention=False, decoder_attention=False, norm_groups=4,
                         scaling_factor=0.5, shift_factor=0.1).eval()


def tiny_taesd() -> TAESD:
    torch.manual_seed(1)
    return TAESD(latent_channels=4, width=8).eval()


def image_dm(photos, **kw) -> ImageDataModule:
    args = dict(source="folder", folder=str(photos), image_size=32, batch_size=4, num_workers=0,
                crop="center", flip=False, shuffle=False)
    args.update(kw)
    return ImageDataModule(**args)


def cached_dm(out, **kw) -> ImageDataModule:
    args = dict(source="cached", shards=str(out), image_size=32, batch_size=4, num_workers=0, crop="center",
                flip=False, shuffle=False)
    args.update(kw)
    return ImageDataModule(**args)


@pytest.fixture(scope="module")
def cache(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    teacher, teacher_b = kl_teacher(), tiny_taesd()
    summary = cache_latents(teacher, image_dm(photos), str(out), teacher_b=teacher_b, dtype="fp16",
                            device="cpu", samples_per_shard=5)
    return out, teacher, teacher_b, summary


def test_cache_round_trip(photos, cache):
    out, teacher, teacher_b, summary = cache
    assert summary["samples"] == 12 and [s["samples"] for s in summary["shards"]] == [5, 5, 2]
    meta = json.loads((out / "cache_meta.json").read_text())
    assert meta["teacher"] == teacher_fingerprint(teacher) and meta["teacher_b"] == teacher_fingerprint(teacher_b)
    pre = meta["preprocess"]
    assert (pre["image_size"], pre["crop"], pre["flip"], pre["resample"], meta["dtype"]) == (32, "center", False,
                                                                                             "bicubic", "fp16")
    m = cached_dm(out)
    m.expect_teacher(teacher, teacher_b)
    batches = list(m.train_dataloader())
    ref = list(image_dm(photos).train_dataloader())
    assert len(batches) == 3 and all(b["latent"].dtype == torch.float16 for b in batches)
    for b, r in zip(batches, ref):
        assert torch.equal(b["image"], r["image"])  # the preprocessed image, bit for bit
        x = uint8_to_model(b["image"])
        with torch.no_grad():
            mean, logvar = teacher.posterior(x)
            want = (mean - 0.1) * 0.5
            assert b["latent"].shape == (4, 4, 16, 16)
            torch.testing.assert_close(b["latent"].float(), want, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(b["logvar"].float(), logvar + 2 * torch.log(torch.tensor(0.5)),
                                       atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(b["latent_b"].float(), teacher_b.encode(x), atol=2e-3, rtol=2e-3)
    # expectations beyond preprocessing are optional; 2 workers split the 3 shards between them
    two = list(cached_dm(out, num_workers=2, drop_last=False).train_dataloader())
    assert sorted(k for b in two for k in b["__key__"]) == sorted(k for b in batches for k in b["__key__"])


def test_stale_cache_refused(photos, cache):
    out, teacher, _, _ = cache
    other = kl_teacher()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight changed
    m = cached_dm(out)
    m.expect_teacher(other)
    with pytest.raises(DataError, match=r"stale latent cache \(teacher: cache has 'AutoencoderKL\("):
        m.train_dataloader()
    with pytest.raises(DataError, match=r"preprocess.image_size: cache has 32, expected 64"):
        cached_dm(out, image_size=64).train_dataloader()
    # every crop option that shaped the cached images is part of the identity
    for option, value in (("resample", "nearest"), ("resize_to", 48), ("min_size", 16), ("native_fraction", 0.5)):
        with pytest.raises(DataError, match=rf"preprocess.{option}: cache has .*, expected {value!r}"):
            cached_dm(out, **{option: value}).train_dataloader()
    with pytest.raises(DataError, match="data.flip=true with data.source=cached"):
        cached_dm(out, flip=True)
    m = cached_dm(out, expect_cache_meta={"teacher": "TAESD()@0"})
    with pytest.raises(DataError, match="rebuild it with `vaetrain cache-latents`"):
        m.train_dataloader()


def test_not_a_cache_refused(photos, tmp_path):
    make_shards([str(photos)], str(tmp_path), max_size=48)
    with pytest.raises(DataError, match="not a vaetrain latent cache"):
        cached_dm(tmp_path).train_dataloader()


def test_fingerprint_identity():
    a, b = kl_teacher(), kl_teacher()
    assert teacher_fingerprint(a) == teacher_fingerprint(b)
    half = kl_teacher().half()  # fp16 weights (as shipped) ...
    fp16_fp = teacher_fingerprint(half)
    assert teacher_fingerprint(half.float()) == fp16_fp  # ... loaded into fp32: same values, same identity
    assert teacher_fingerprint(a) != teacher_fingerprint(kl_teacher(seed=5))
    assert "AutoencoderKL(" in teacher_fingerprint(a) and "scaling_factor=0.5" in teacher_fingerprint(a)


def test_ranks_take_disjoint_shares(photos, tmp_path):
    import tarfile

    teacher = tiny_taesd()
    sums = [cache_latents(teacher, image_dm(photos), str(tmp_path), dtype="bf16", device="cpu", rank=r,
                          world_size=2) for r in range(2)]
    assert [s["samples"] for s in sums] == [6, 6]
    sources = []
    for r in range(2):
        shard = tmp_path / f"cache-r{r:03d}-000000.tar"
        assert json.loads((tmp_path / f"manifest-r{r:03d}.json").read_text())["rank"] == r
        for b in cached_dm(tmp_path, shards=str(shard)).train_dataloader():
            assert b["latent"].dtype == torch.bfloat16 and "logvar" not in b  # TAESD is deterministic
        with tarfile.open(shard) as tf:
            sources.append({json.loads(tf.extractfile(n).read())["source"] for n in tf.getnames()
                            if n.endswith(".json") and not n.startswith("__")})
    assert len(sources[0]) == len(sources[1]) == 6 and not sources[0] & sources[1]


def test_cli_with_real_taef2(assets, tmp_path):
    from vaetrain.cli import run
    from vaetrain.formats import load_autoencoder

    out = tmp_path / "c"
    s = run("cache-latents", [f"output={out}", "data=synthetic", "data.image_size=32", "data.synthetic_count=6",
                              "data.num_workers=0", "data.batch_size=3", "device=cpu"])
    assert s["samples"] == 6 and s["meta"]["latent_channels"] == 32 and s["meta"]["has_logvar"] is False
    w = assets / "weights"
    taef2 = load_autoencoder([str(w / "taef2_encoder.pth"), str(w / "taef2_decoder.pth")])
    m = cached_dm(out, batch_size=3)
    m.expect_teacher(taef2)
    b = next(iter(m.train_dataloader()))
    assert b["latent"].shape == (3, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(b["latent"].float(), taef2.encode(uint8_to_model(b["image"])), atol=5e-3, rtol=5e-3)


def test_a_stale_shard_among_good_ones_stops_the_worker_in_one_line(photos, cache, tmp_path):
    """Every shard carries its meta record: a shard from another teacher's cache, mixed in, is refused when a
    loader worker reaches it, as the same one line as in the main process (not torch's worker traceback)."""
    out, teacher, _, _ = cache
    cache_latents(tiny_taesd(), image_dm(photos), str(tmp_path), dtype="fp16", device="cpu", samples_per_shard=6)
    mixed = [str(p) for p in sorted(out.glob("cache-*.tar"))] + [str(sorted(tmp_path.glob("cache-*.tar"))[0])]
    m = cached_dm(out, shards=mixed, num_workers=1)
    m.expect_teacher(teacher)
    with pytest.raises(DataError, match=r"^\S+cache-r000-000000.tar: stale latent cache \(teacher: cache has 'TAESD") as e:
        list(m.train_dataloader())
    assert "\n" not in str(e.value) and "Caught" not in str(e.value)
