"""eval / audit-fp16 / latent-stats on tiny models, plus real-weight checks when the assets are present."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetrain.convention import uint8_to_model
from vaetrain.commands.audit_fp16 import audit_fp16
from vaetrain.commands.eval import evaluate
from vaetrain.commands.images import read_images
from vaetrain.commands.latent_stats import latent_stats
from vaetrain.losses import LPIPS
from vaetrain.metrics import psnr, ssim
from vaetrain.models.autoencoder_kl import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]


def tiny_kl(**kw) -> AutoencoderKL:
    args = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                scaling_factor=0.5, shift_factor=0.1)
    args.update(kw)
    return AutoencoderKL(**args).eval()


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three small photos-ish images, one with an apostrophe in its name and one of another size."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (40, 36), "jack-o'-lantern.png": (40, 36), "sub/c.jpg": (50, 42)}.items():
        base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        arr = (base * 0.7 + rng.uniform(0, 76, (h, w, 3))).astype(np.uint8)
        Image.fromarray(arr).save(d / name)
    return d


def test_read_images_center_and_native(folder):
    items = list(read_images(folder, size=32))
    assert [n for n, _ in items] == ["a.png", "jack-o'-lantern.png", "sub/c.jpg"]
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.uint8 for _, t in items)
    native = dict(read_images(folder, size=None, multiple=8))
    assert native["a.png"].shape == (3, 32, 40) and native["sub/c.jpg"].shape == (3, 40, 48)
    src = np.asarray(Image.open(folder / "sub/c.jpg").convert("RGB"))
    assert torch.equal(native["sub/c.jpg"], torch.from_numpy(src[1:41, 1:49].copy()).permute(2, 0, 1))  # centred
    with pytest.raises(ValueError, match="crop='random'"):
        list(read_images(folder, crop="random"))


def test_evaluate_writes_csv_json_grid_and_numbers_match(folder, tmp_path):
    model, teacher = tiny_kl(), tiny_kl()
    lp = LPIPS(mode="random", net="squeeze")
    out = tmp_path / "eval"
    s = evaluate(model, folder, teacher=teacher, size=32, lpips=lp, batch_size=2, out=str(out), grid=2, grid_tile=32,
                 quiet=True)
    assert s["images"] == 3 and s["lpips"].startswith("LPIPS-random")
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["image"] for r in rows] == ["a.png", "jack-o'-lantern.png", "sub/c.jpg"]
    assert json.loads((out / "summary.json").read_text())["student_vs_real"]["psnr"] == pytest.approx(
        np.mean([float(r["student_vs_real_psnr"]) for r in rows]))
    # recompute one image by hand
    _, img = next(read_images(folder, size=32))
    x = uint8_to_model(img[None])
    with torch.no_grad():
        rec = model.decode(model.encode(x)).clamp(-1, 1)
        trec = teacher(x).clamp(-1, 1)
    assert float(rows[0]["student_vs_real_psnr"]) == pytest.approx(float(psnr(rec, x)), rel=1e-5)
    assert float(rows[0]["student_vs_teacher_ssim"]) == pytest.approx(float(ssim(rec, trec)), rel=1e-5)
    assert float(rows[0]["teacher_vs_real_lpips"]) == pytest.approx(float(lp.distance(trec, x)), rel=1e-4)
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 36 + 4, 2 * 36 + 4)  # 3 columns (input | teacher | student), 2 rows, 4 px gaps


def test_evaluate_same_model_as_teacher_is_exact(folder):
    model = tiny_kl()
    s = evaluate(model, folder, teacher=model, size=32, quiet=True, grid=0)
    assert s["student_vs_teacher"]["ssim"] == 1.0 and s["student_vs_teacher"]["psnr"] > 100
    assert s["student_vs_real"]["psnr"] == pytest.approx(s["teacher_vs_real"]["psnr"])


def test_evaluate_decoder_only_uses_teacher_latents(folder):
    teacher = tiny_kl()
    decoder_only = tiny_kl(encoder=False)
    decoder_only.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith(("encoder.",
                                                                                                       "quant_conv."))})
    with pytest.raises(ValueError, match="decoder-only: give a teacher"):
        evaluate(decoder_only, folder, size=32, quiet=True)
    s = evaluate(decoder_only, folder, teacher=teacher, size=None, quiet=True, grid=0)  # native, mixed sizes
    assert s["student_vs_teacher"]["psnr"] > 100 and s["crop"] == "native"


def test_audit_fp16_safe_model_native_and_emulated():
    model = tiny_kl()
    for mode in ("native", "emulate"):
        r = audit_fp16(model, size=16, limit=1, mode=mode, quiet=True)
        assert r["safe"] and r["fp16_output_finite"] and not r["overflowing_layers"]
        assert r["fp16_psnr_vs_fp32"] > 40 and r["fp16_mode"] == mode
        names = [l["name"] for l in r["layers"]]
        assert "encoder.conv_in" in names and "decoder.conv_out" in names
        assert r["max_activation"] == max(l["max_abs"] for l in r["layers"]) > 0


def _overflow_script():
    spec = importlib.util.spec_from_file_location("make_overflow_teacher", ROOT / "scripts/make_overflow_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overflow_teacher_keeps_fp32_output_and_fails_fp16():
    mod = _overflow_script()
    model = tiny_kl()
    before = tiny_kl()
    before.load_state_dict(model.state_dict())
    x = mod.calibration_images(1, 16)
    scales = mod.inflate_resnets(model, x, ["decoder.mid.block_1"], target=2e5)
    assert list(scales) == ["decoder.mid.block_1"] and min(scales.values()) > 1000
    with torch.no_grad():
        diff = (model(x) - before(x)).abs().max()
    assert diff < 1e-3  # GroupNorm after conv1 cancels the scale
    for mode in ("native", "emulate"):
        r = audit_fp16(model, size=16, limit=1, mode=mode, quiet=True)
        assert not r["safe"] and "decoder.mid.block_1.conv1" in r["overflowing_layers"]
        assert not r["fp16_output_finite"] and r["fp16_first_nonfinite_layer"] == "decoder.mid.block_1.conv1"


def test_latent_stats_against_direct_computation(folder):
    model = tiny_kl()
    r = latent_stats(model, folder, size=32, batch_size=2, quiet=True)
    with torch.no_grad():
        z = torch.cat([model.encode_raw(uint8_to_model(t[None])) for _, t in read_images(folder, size=32)]).double()
    assert r["images"] == 3 and r["latent_channels"] == 4
    assert r["mean"] == pytest.approx(float(z.mean()), abs=1e-6)
    assert r["std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-5)
    assert r["per_channel_std"] == pytest.approx(z.transpose(0, 1).flatten(1).std(1, unbiased=False).tolist(), rel=1e-5)
    sug = r["suggested"]["shift_and_scale"]
    zd = (z - sug["shift_factor"]) * sug["scaling_factor"]
    assert float(zd.mean()) == pytest.approx(0, abs=1e-6) and float(zd.std(unbiased=False)) == pytest.approx(1, rel=1e-5)
    assert r["current"]["diffusion_std"] == pytest.approx(r["std"] * 0.5)
    batches = [{"image": torch.stack([t for _, t in read_images(folder, size=32)])}]  # a loader's dict batches
    r2 = latent_stats(model, batches, limit=2, quiet=True)
    assert r2["images"] == 2 and r2["mean"] == pytest.approx(float(z[:2].mean()), abs=1e-6)
    with pytest.raises(ValueError, match="needs a model with an encoder"):
        latent_stats(tiny_kl(encoder=False), folder, quiet=True)


def test_cli_commands(folder, tmp_path, capsys):
    from vaetrain.cli import run
    from vaetrain.formats import save_autoencoder

    path = save_autoencoder(tiny_kl(), tmp_path / "m", "original")
    r = run("audit-fp16", [str(path), "size=16", "limit=1", "mode=emulate", f"out={tmp_path / 'audit.json'}"])
    assert r["safe"] and json.loads((tmp_path / "audit.json").read_text())["fp16_mode"] == "emulate"
    assert "verdict: SAFE in fp16" in capsys.readouterr().out
    s = run("eval", [f"model={path}", f"folder={folder}", "size=32", "lpips=null", "grid=0"])
    assert s["images"] == 3 and s["lpips"] is None and "student_vs_teacher" not in s
    st = run("latent-stats", [f"model.source={path}", f"folder={folder}", "size=32", "limit=2"])
    assert st["images"] == 2 and "SD3/FLUX convention" in capsys.readouterr().out


def test_real_taef2_eval_and_stats(assets, tmp_path):
    """TAEF2 (real weights) on 2 Kodak images: sensible quality, LPIPS-like on, its latents near unit scale."""
    from vaetrain.formats import load_autoencoder

    w = assets / "weights"
    taef2 = load_autoencoder([str(w / "taef2_encoder.pth"), str(w / "taef2_decoder.pth")])
    lp = LPIPS(mode="caffe_squeeze", net="squeeze", backbone_weights=str(w / "squeezenet1_1_caffe_features.pth"))
    kodak = assets / "images/eval/kodak24"
    s = evaluate(taef2, kodak, size=64, limit=2, lpips=lp, quiet=True, out=str(tmp_path / "e"))
    assert 20 < s["student_vs_real"]["psnr"] < 40 and 0 < s["student_vs_real"]["lpips"]
    r = audit_fp16(taef2, kodak, size=32, limit=1, mode="emulate", quiet=True)
    assert r["safe"] and r["fp16_psnr_vs_fp32"] > 30
