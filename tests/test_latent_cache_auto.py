"""``data.latent_cache``: decoder distillation trains from the teacher's cached latents, built once per key."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vaetrain.cli import run
from vaetrain.commands.cache_latents import cache_latents, ensure_latent_cache
from vaetrain.convention import uint8_to_model
from vaetrain.data import ImageDataModule
from vaetrain.formats import save_autoencoder
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.taesd import TAESD
from vaetrain.safe import UserError


def kl_teacher(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                         encoder_attention=False, decoder_attention=False, norm_groups=4,
                         scaling_factor=0.5, shift_factor=0.1).eval()


def images(**kw) -> ImageDataModule:
    # procedural images: random crops and flips of them differ, and no assets are needed
    args = dict(source="synthetic", synthetic_count=6, image_size=32, batch_size=3, num_workers=0, crop="random",
                flip=True, val_folder=None)
    args.update(kw)
    return ImageDataModule(**args)


def cached_batches(dm: ImageDataModule, teacher) -> list[dict]:
    dm.expect_teacher(teacher)
    return list(dm.train_dataloader())


def test_cache_built_with_flips_is_readable(tmp_path):
    teacher = kl_teacher()
    cache_latents(teacher, images(), str(tmp_path), device="cpu")
    meta = json.loads((tmp_path / "cache_meta.json").read_text())
    assert meta["preprocess"]["flip"] is True and meta["preprocess"]["crop"] == "random"
    dm = ImageDataModule(source="cached", shards=str(tmp_path), image_size=32, batch_size=3, num_workers=0,
                         crop="random", flip=False, shuffle=False)
    assert sum(len(b["__key__"]) for b in cached_batches(dm, teacher)) == 6


def test_built_once_per_key_and_reused(tmp_path, capsys):
    teacher, root = kl_teacher(), tmp_path / "lc"
    dm = ensure_latent_cache(images(latent_cache=str(root), latent_cache_passes=2), teacher, run_dir=tmp_path / "r")
    assert dm.source == "cached"
    (folder,) = [p for p in root.iterdir()]
    assert folder.name.startswith("AutoencoderKL-") and (folder / "complete.json").is_file()
    assert not list(root.glob(".*tmp-*"))  # the build folder was renamed into place
    batches = cached_batches(dm, teacher)
    assert sum(len(b["__key__"]) for b in batches) == 12  # 2 passes x 6 images
    for b in batches:  # the cached latents are the teacher's posterior mean of exactly the cached images
        with torch.no_grad():
            mean, _ = teacher.posterior(uint8_to_model(b["image"]))
        torch.testing.assert_close(b["latent"].float(), (mean - 0.1) * 0.5, atol=2e-3, rtol=2e-3)
    # the passes are the data with other crops / flips, not copies
    keys = {}
    for b in batches:
        for k, img in zip(b["__key__"], b["image"]):
            keys.setdefault(k, []).append(img)
    assert any(len(v) == 2 and not torch.equal(v[0], v[1]) for v in keys.values())

    stamp = (folder / "complete.json").stat().st_mtime_ns
    capsys.readouterr()
    again = ensure_latent_cache(images(latent_cache=str(root), latent_cache_passes=2), kl_teacher(),
                                run_dir=tmp_path / "r2")
    assert "teacher latents from the cache" in capsys.readouterr().out
    assert (folder / "complete.json").stat().st_mtime_ns == stamp and again.spec.shards == dm.spec.shards
    # another size, another teacher weight: other keys, new caches (a stale cache is never read)
    ensure_latent_cache(images(latent_cache=str(root), latent_cache_passes=2, image_size=40), teacher)
    other = kl_teacher()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    ensure_latent_cache(images(latent_cache=str(root), latent_cache_passes=2), other)
    assert len(list(root.iterdir())) == 3


def test_auto_root_beside_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("VAETRAIN_LATENT_CACHE", raising=False)
    ensure_latent_cache(images(latent_cache="auto"), kl_teacher(), run_dir=tmp_path / "runs" / "a")
    assert len(list((tmp_path / "runs" / "latent_cache").iterdir())) == 1
    monkeypatch.setenv("VAETRAIN_LATENT_CACHE", str(tmp_path / "elsewhere"))
    ensure_latent_cache(images(latent_cache="auto"), kl_teacher(), run_dir=tmp_path / "runs" / "a")
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1


def test_off_incomplete_and_launched_processes(tmp_path, monkeypatch):
    teacher, root = kl_teacher(), tmp_path / "lc"
    plain = images()
    assert ensure_latent_cache(plain, teacher) is plain  # data.latent_cache=null: nothing changes
    with pytest.raises(UserError, match="needs a teacher with an encoder"):
        ensure_latent_cache(images(latent_cache=str(root)), None)
    # torchrun / SLURM processes must not race to build it
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="would race to build it"):
        ensure_latent_cache(images(latent_cache=str(root)), teacher)
    monkeypatch.delenv("WORLD_SIZE")
    # a build killed before its rename leaves only a temporary folder, removed by the next build of that key
    dm = ensure_latent_cache(images(latent_cache=str(root)), teacher)
    final = Path(dm.spec.shards[0]).parent
    shutil.rmtree(final)
    leftover = root / f".{final.name}.tmp-{2 ** 22 + 12345}"  # above Linux's largest pid: its process is gone
    leftover.mkdir()
    ensure_latent_cache(images(latent_cache=str(root)), teacher)
    assert not leftover.exists() and (final / "complete.json").is_file()
    # ... and a folder at the key without its completion record is refused, not read
    os.remove(final / "complete.json")
    with pytest.raises(UserError, match="not a complete cache"):
        ensure_latent_cache(images(latent_cache=str(root)), teacher)
    monkeypatch.setenv("WORLD_SIZE", "2")
    (final / "complete.json").write_text("{}")
    assert ensure_latent_cache(images(latent_cache=str(root)), teacher).source == "cached"  # present: every rank reads


def test_decoder_recipe_trains_from_the_cache_it_builds(tmp_path):
    """The TAESD decoder recipe through the CLI: data.latent_cache=auto is its default; the run builds the cache
    beside its run folder, trains from it, and a second run reuses it."""
    torch.manual_seed(0)
    teacher = save_autoencoder(TAESD(latent_channels=32, width=8, flux_2=True), tmp_path / "taesd32", "taesd")
    common = ["experiment=taesd_flux2", f"teacher.source={teacher}", "teacher.preset=null", "student.width=8",
              "data=synthetic", "data.synthetic_count=6", "data.val_folder=null", "data.image_size=32",
              "data.batch_size=2", "data.num_workers=0", "data.epoch_length=4", "data.val_count=2",
              "data.val_image_size=64", "trainer=default", "trainer.accelerator=cpu", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
              "logger=csv", "module.warmup_steps=0", "export=[original]", "loss@loss.lpips=lpips_random",
              "loss.lpips.net=squeeze", "discriminator.discriminator.ndf=8", "discriminator.discriminator.n_layers=2"]
    for name in ("a", "b"):
        r = run("train", common + [f"run_dir={tmp_path / 'runs' / name}"])
        assert r["steps"] == 2 and r["nonfinite_skipped"] == 0
    built = list((tmp_path / "runs" / "latent_cache").iterdir())
    assert len(built) == 1 and json.loads((built[0] / "complete.json").read_text())["samples"] == 6
