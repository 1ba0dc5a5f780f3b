"""Every recipe in conf/experiment/ composes and trains a few steps through the real CLI path.

Each experiment is run with ``vaetrain.cli.run("train", ...)`` (Hydra compose -> instantiate -> ``vaetrain.train``)
on tiny overrides: widths 8, 64 px synthetic images, 2 steps. Hub teachers cannot be downloaded here, so they are
replaced by tiny random local models OF THE SAME KIND (KL f8 with 4 or 16 channels, a 32-channel flux_2 TAESD), saved
in the formats users have; the experiments' own structure (mode, losses, discriminator, frozen parts, phases, data
source) is what runs. The *_taef2 and *_cpu real-run variants use the real TAEF2 / photos from the shared assets.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from vaetrain.cli import compose, conf_dir, run
from vaetrain.formats.export import EXPORT_KEY
from vaetrain.formats.io import read_metadata, read_state_dict
from vaetrain.metrics import psnr
from vaetrain.formats import load_autoencoder, save_autoencoder
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.taesd import TAESD

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))

# tiny, fast and offline: 64 px images, 2 steps, one validation batch, CSV logs, native export only
RUN = ["data.image_size=64", "data.batch_size=2", "data.num_workers=0", "data.epoch_length=4", "data.val_count=2",
       "data.val_image_size=64", "trainer=default", "trainer.accelerator=cpu", "trainer.max_steps=2",
       "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
       "trainer.log_every_n_steps=1", "logger=csv", "module.warmup_steps=0", "export=[original]"]
TINY = ["data=synthetic", "data.synthetic_count=8", "data.val_folder=null", *RUN]  # procedural images


def cached(shards: Path) -> list[str]:
    return ["data=cached", f"data.shards={shards}", "data.val_folder=null", *RUN]
SMALL_GAN = ["discriminator.discriminator.ndf=8", "discriminator.discriminator.n_layers=2", "discriminator.start_step=1"]
# official LPIPS needs torchvision's AlexNet/VGG download: the random-backbone LPIPS exercises the same code path
RANDOM_LPIPS = ["loss@loss.lpips=lpips_random", "loss.lpips.net=squeeze"]
TINY_KL = ["student.base_channels=8", "student.channel_mult=[1,1,1,1]", "student.num_res_blocks=1",
           "+student.norm_groups=4"]


def _kl(latent_channels: int, quant: bool, scale: float, shift: float = 0.0) -> AutoencoderKL:
    # f8 like the real SD/SD3/FLUX VAEs (TAESD students are f8), attention on like theirs
    return AutoencoderKL(latent_channels=latent_channels, base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1,
                         encoder_attention=True, decoder_attention=True, use_quant_conv=quant, norm_groups=4,
                         scaling_factor=scale, shift_factor=shift)


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Tiny random stand-ins for the hub teachers, saved like the real ones (original single file / TAESD halves)."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    out = {
        "kl4": save_autoencoder(_kl(4, True, 0.18215), root / "kl4", "original"),        # SD1 / SDXL-like
        "kl4b": save_autoencoder(_kl(4, True, 0.13025), root / "kl4b", "original"),      # a second 4-ch space
        "kl16": save_autoencoder(_kl(16, False, 1.5305, 0.0609), root / "kl16", "original"),  # SD3 / FLUX.1-like
        "taesd32": save_autoencoder(TAESD(latent_channels=32, width=8, flux_2=True), root / "taesd32", "taesd"),
    }
    return {k: str(v) for k, v in out.items()}


def _train(overrides: list[str], run_dir: Path) -> dict:
    result = run("train", overrides + [f"run_dir={run_dir}"])
    assert result["steps"] >= 2, result
    assert result["nonfinite_skipped"] == 0, result
    return result


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def _local_teacher(path: str, group: str = "teacher") -> list[str]:
    return [f"{group}.source={path}", f"{group}.preset=null"]


# ------------------------------------------------------------------------------------------------ composition

@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    """Each recipe composes alone, is a documented `# @package _global_` delta, and names a valid mode."""
    from omegaconf import OmegaConf

    text = (conf_dir() / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), f"{name}: experiments are global deltas"
    assert sum(line.startswith("#") for line in text.splitlines()) >= 3, f"{name}: say what it does and how to run it"
    cfg = OmegaConf.to_container(compose("train", [f"experiment={name}"]), resolve=False)
    assert cfg["mode"] in ("autoencode", "decoder", "encoder", "latent")
    assert cfg["student"]["_target_"]
    live = {k: v for k, v in cfg["loss"].items() if v is not None}
    assert live or cfg.get("discriminator"), f"{name}: no loss term"
    assert all("_target_" in v for v in live.values()), f"{name}: a loss entry without _target_: {live}"
    disc = cfg.get("discriminator")
    assert disc is None or "_target_" in disc, f"{name}: stray discriminator options without a discriminator: {disc}"


def test_phases_compose_on_top_of_a_latent_space():
    from omegaconf import OmegaConf

    enc = OmegaConf.to_container(compose("train", ["experiment=[taesd_sd3,taesd_encoder]"]), resolve=False)
    assert enc["mode"] == "encoder" and enc["student"]["encoder"] and not enc["student"]["decoder"]
    assert enc["student"]["latent_channels"] == 16 and enc["teacher"]["preset"] == "sd3"
    assert {k for k, v in enc["loss"].items() if v is not None} == {"latent_mse"} and enc["discriminator"] is None
    hi = OmegaConf.to_container(compose("train", ["experiment=[taesd_flux2,taesd_hires]"]), resolve=False)
    assert hi["mode"] == "decoder" and hi["data"]["image_size"] == 256 and hi["student"]["flux_2"]
    assert hi["discriminator"]["conditional"] and hi["trainer"]["max_steps"] > 100000
    gan = OmegaConf.to_container(compose("train", ["experiment=sd_vae_ft_ema", "discriminator=patchgan"]), resolve=False)
    assert gan["discriminator"]["_target_"] == "vaetrain.losses.Adversarial"  # the optional GAN switches on


# ------------------------------------------------------------------------------------------------ recipe 1: TAESD

@pytest.mark.parametrize("name,teacher", [("taesd_sd1", "kl4"), ("taesd_sdxl", "kl4b"), ("taesd_sd3", "kl16"),
                                          ("taesd_flux1", "kl16"), ("taesd_flux2", "taesd32")])
def test_taesd_decoder_per_latent_space(name, teacher, teachers, tmp_path):
    r = _train([f"experiment={name}", *TINY, *SMALL_GAN, *RANDOM_LPIPS, "student.width=8",
                *_local_teacher(teachers[teacher])], tmp_path)
    rows = _metrics(tmp_path)
    assert _logged(rows, "train/d_loss"), "the latent-conditioned discriminator was never stepped"
    assert _logged(rows, "val/psnr_teacher")
    student = load_autoencoder(r["exports"]["original"])
    assert isinstance(student, TAESD) and student.has_decoder and not student.has_encoder


def test_taesd_encoder_phase_then_hires_phase(teachers, tmp_path):
    enc = _train(["experiment=[taesd_sd1,taesd_encoder]", *TINY, "student.width=8", *_local_teacher(teachers["kl4"])],
                 tmp_path / "enc")
    assert _logged(_metrics(tmp_path / "enc"), "train/latent_mse")
    assert load_autoencoder(enc["exports"]["original"]).has_encoder

    low = tmp_path / "low"
    _train(["experiment=taesd_sd1", *TINY, *SMALL_GAN, *RANDOM_LPIPS, "student.width=8",
            *_local_teacher(teachers["kl4"])], low)
    # phase 2 continues the low-res run (same student, D, optimizers) at a higher resolution
    hi = _train(["experiment=[taesd_sd1,taesd_hires]", *TINY, *SMALL_GAN, *RANDOM_LPIPS, "student.width=8",
                 "data.image_size=128", "data.batch_size=1", "trainer.max_steps=3", f"resume={low}",
                 *_local_teacher(teachers["kl4"])], tmp_path / "hi")
    assert hi["steps"] == 3


def test_taesd_taef2_real_run_config(assets, tmp_path):
    cache_root, photos = tmp_path / "latent_cache", tmp_path / "photos"
    photos.mkdir()
    for f in sorted((assets / "images" / "train" / "bsds500").iterdir())[:6]:  # caching all 808 would take minutes
        shutil.copy(f, photos / f.name)
    r = _train(["experiment=taesd_taef2", "data=folder", f"data.folder={photos}", *RUN, *SMALL_GAN,
                "discriminator.d_start_step=0", "student.width=8", f"data.latent_cache={cache_root}"], tmp_path / "run")
    assert r["val"]["val/psnr_teacher"] > 0
    # the teacher's latents came from the cache the run built (data.latent_cache, on by default in this recipe)
    built = [p for p in cache_root.iterdir() if (p / "complete.json").is_file()]
    assert len(built) == 1 and built[0].name.startswith("TAESD-")
    student = load_autoencoder(r["exports"]["original"])
    assert student.latent_channels == 32 and student.flux_2


# ------------------------------------------------------------------------------------------------ recipe 2: MLP

def _cache(teacher_overrides: list[str], out: Path, extra: list[str] = ()) -> Path:
    run("cache-latents", [*teacher_overrides, f"output={out}", "data=synthetic", "data.image_size=64",
                          "data.synthetic_count=6", "data.batch_size=3", "data.num_workers=0", "device=cpu", *extra])
    return out


def test_mlp_decoder_from_cached_latents_at_latent_resolution(teachers, tmp_path):
    cache = _cache(_local_teacher(teachers["kl4"]), tmp_path / "cache")
    # validation at 128 px: the student's 16x16 output still fits SSIM's 11x11 window
    r = _train(["experiment=mlp_decoder", *cached(cache), "data.val_image_size=128", *_local_teacher(teachers["kl4"])],
               tmp_path / "run")
    student = load_autoencoder(r["exports"]["original"])
    assert student.output_scale == 1  # Birch-san's one pixel per latent
    with torch.no_grad():
        assert student.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 8, 8)
    assert _logged(_metrics(tmp_path / "run"), "train/mse")


def test_mlp_decoder_full_resolution_and_taef2_variant(assets, tmp_path):
    taef2 = ["teacher=taef2"]
    cache = _cache(taef2, tmp_path / "cache")
    r = _train(["experiment=mlp_decoder_taef2", *cached(cache)], tmp_path / "run")
    student = load_autoencoder(r["exports"]["original"])
    assert student.latent_channels == 32 and student.output_scale == 8
    assert r["val"]["val/psnr_gt"] > 0  # trained against the cached photos: validated against them


# ------------------------------------------------------------------------------------------------ recipe 3: SD-VAE-FT

@pytest.mark.parametrize("name", ["sd_vae_ft_ema", "sd_vae_ft_mse"])
def test_sd_vae_ft_trains_the_decoder_only(name, teachers, tmp_path):
    src = teachers["kl4"]
    r = _train([f"experiment={name}", *TINY, *RANDOM_LPIPS, f"student.source={src}", "student.subfolder=null",
                "student.preset=null", "module.ema_decay=0.5"], tmp_path)
    before, after = read_state_dict(src), read_state_dict(r["exports"]["original"])
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "the latent space moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    rows = _metrics(tmp_path)
    assert _logged(rows, "train/l1" if name == "sd_vae_ft_ema" else "train/mse")
    assert _logged(rows, "val/psnr_gt")


def test_sd_vae_ft_with_optional_gan(teachers, tmp_path):
    _train(["experiment=sd_vae_ft_ema", *TINY, *RANDOM_LPIPS, f"student.source={teachers['kl4']}",
            "student.subfolder=null", "discriminator=patchgan", *SMALL_GAN, "discriminator.discriminator.norm=group"],
           tmp_path)
    assert _logged(_metrics(tmp_path), "train/d_loss")


# ------------------------------------------------------------------------------------------------ recipe 4: fp16-fix

def test_fp16_fix_finetunes_the_rescaled_copy_of_an_overflowing_teacher(teachers, tmp_path):
    import sys

    from vaetrain.commands.fp16_fix import fp16_fix

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_overflow_teacher import calibration_images, inflate_resnets

    ae = load_autoencoder(teachers["kl4"])
    inflate_resnets(ae, calibration_images(1, 64), target=2e5)
    src = save_autoencoder(ae, tmp_path / "overflow", "original")
    # stage 1, exact; stage 2 (the recipe) starts from it
    fixed = fp16_fix(str(src), tmp_path / "rescaled.safetensors", size=64, limit=1, audit_sizes=None, quiet=True)
    assert fixed["max_activation_before"] > 65504 >= 4096 >= fixed["max_activation_after"]
    r = _train(["experiment=fp16_fix", *TINY, *_local_teacher(src), f"student.source={fixed['out']}",
                "student.preset=null", "loss.activation.threshold=1000", "trainer.max_steps=3",
                "export_fp16_audit=[32,64]"], tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert _logged(rows, "train/activation") and _logged(rows, "train/latent_mse")
    # plain SGD from a student that already matches the teacher: it stays where it is
    teacher, student = load_autoencoder(src), load_autoencoder(r["exports"]["original"])
    x = calibration_images(1, 64)
    with torch.no_grad():
        assert float(psnr(student(x), teacher(x)).mean()) > 40
    # the exports carry the fp16 audit of the student at each size (its verdict decides diffusers' force_upcast)
    audit = json.loads((tmp_path / "run" / "fp16_audit.json").read_text())
    meta = json.loads(read_metadata(r["exports"]["original"])[EXPORT_KEY])
    assert set(audit["resolutions"]) == {"32", "64"} and audit["safe"] and meta["fp16_safe"] is True
    assert set(meta["fp16_audit"]["resolutions"]) == {"32", "64"}


def test_fp16_fix_cpu_config_points_at_the_overflow_teacher():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose("train", ["experiment=fp16_fix_cpu"]), resolve=False)
    # the student starts from the exact rescaling of the teacher (vaetrain fp16-fix), not the teacher itself
    assert cfg["teacher"]["source"].endswith("teacher.safetensors")
    assert cfg["student"]["source"].endswith("rescaled.safetensors")
    assert cfg["optimizer"]["_target_"] == "torch.optim.SGD" and cfg["optimizer"]["momentum"] > 0
    assert cfg["module"]["teacher_dtype"] == "float32"


# ------------------------------------------------------------------------------------------------ recipe 5: no attention

@pytest.mark.parametrize("name", ["no_midblock_attn", "no_midblock_attn_cpu"])
def test_midblock_attention_removed_student(name, teachers, tmp_path):
    src = teachers["kl4"]
    lp = RANDOM_LPIPS if name == "no_midblock_attn" else []
    r = _train([f"experiment={name}", *TINY, *lp, *_local_teacher(src), f"student.source={src}", "student.preset=null"],
               tmp_path)
    student = load_autoencoder(r["exports"]["original"])
    assert student.decoder.mid.attn_1 is None and student.encoder.mid.attn_1 is None
    assert not any("attn" in k for k in read_state_dict(r["exports"]["original"]))
    assert any("attn" in k for k in read_state_dict(src))
    assert _logged(_metrics(tmp_path), "train/latent_mse")  # the latent space is held to the teacher's


# ------------------------------------------------------------------------------------------------ recipe 6: 16 channels

@pytest.mark.parametrize("name", ["vae16_scratch", "vae16_cpu"])
def test_vae16_from_scratch_then_latent_stats(name, tmp_path):
    lp = RANDOM_LPIPS if name == "vae16_scratch" else []
    kl = TINY_KL if name == "vae16_scratch" else [k.lstrip("+") for k in TINY_KL]
    r = _train([f"experiment={name}", *TINY, *lp, *kl, *SMALL_GAN, "discriminator.discriminator.norm=group"],
               tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert _logged(rows, "train/kl") and _logged(rows, "train/d_loss")
    ae = load_autoencoder(r["exports"]["original"])
    assert ae.latent_channels == 16 and ae.decoder.mid.attn_1 is not None
    folder = tmp_path / "imgs"
    folder.mkdir()
    from vaetrain.data import synthetic_image

    for i in range(2):
        synthetic_image(i, 1, 64, 64).save(folder / f"{i}.png")
    stats = run("latent-stats", [f"model.source={r['exports']['original']}", f"folder={folder}", "size=64"])
    assert stats["latent_channels"] == 16 and len(stats["per_channel_std"]) == 16
    sug = stats["suggested"]["shift_and_scale"]
    assert sug["scaling_factor"] == pytest.approx(1 / stats["std"]) and sug["shift_factor"] == stats["mean"]


# ------------------------------------------------------------------------------------------------ recipe 7: interposer

def test_interposer_sd1_to_sdxl_from_paired_cache(teachers, tmp_path):
    pair = [*_local_teacher(teachers["kl4"]), *_local_teacher(teachers["kl4b"], "teacher_b")]
    cache = _cache(["teacher@teacher_b=sdxl", *pair], tmp_path / "cache")
    r = _train(["experiment=interposer_sd1_sdxl", *cached(cache), "student.width=8", "student.blocks=1", *pair],
               tmp_path / "run")
    assert _logged(_metrics(tmp_path / "run"), "train/latent_mse")
    assert r["exports"]["safetensors"].endswith(".safetensors")
