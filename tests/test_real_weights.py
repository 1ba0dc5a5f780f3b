"""Real tiny weights from shared/assets load strictly and reproduce their published quality.

The full TAEF2 Kodak24 check (24 images at 496 px, ~6 TFLOP) is the slowest test of the suite (about a
minute of 2 cores); it is the published number, so it always runs when the assets are present.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vaetrain.convention import uint8_to_model
from vaetrain.formats import tiny
from vaetrain.metrics import psnr
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.taesd import TAESD
from vaetrain.models.vae_approx import VAEApprox


@pytest.fixture(scope="module")
def kodak(assets):
    """Kodak24, 500x500 centre-cropped to 496x496, (24, 3, 496, 496) in [-1, 1]."""
    files = sorted((assets / "images/eval/kodak24").glob("*.png"))
    assert len(files) == 24
    ims = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    return uint8_to_model(torch.stack(ims)[:, :, 2:498, 2:498])


@pytest.fixture(scope="module")
def sd1_latents(assets, kodak):
    """Birch-san sd1.5 encoder latents of Kodak24: approximate SD1 diffusion-space latents (24, 4, 62, 62)."""
    w = assets / "weights/birchsan_approx_vae"
    ae = tiny.try_load([w / "encoder_sd1.5.pt", w / "decoder_sd1.5.pt"])
    with torch.inference_mode():
        return ae.encode(kodak)


@pytest.fixture(scope="module")
def taef2(assets):
    w = assets / "weights"
    ae = tiny.try_load([w / "taef2_encoder.pth", w / "taef2_decoder.pth"]).eval()
    assert isinstance(ae, TAESD) and ae.flux_2 and ae.latent_channels == 32 and ae.downsample_factor == 8
    return ae


@torch.inference_mode()
def test_taef2_quick_kodak_crops(taef2, kodak):
    """Three 256 px crops: 25.8 / 31.4 / 32.4 dB measured; without the pool branches it falls to ~16 dB."""
    x = kodak[:3, :, 120:376, 120:376]
    scores = psnr(taef2.decode(taef2.encode(x)).clamp(-1, 1), x)
    assert (scores > 25).all() and scores.mean() > 29.5, scores


@torch.inference_mode()
def test_taef2_kodak24_psnr(taef2, kodak):
    ae = taef2
    scores = []
    for batch in kodak.split(1):
        z = ae.encode(batch)
        assert z.shape[1:] == (32, 62, 62)
        scores.append(psnr(ae.decode(z).clamp(-1, 1), batch))
    mean = torch.cat(scores).mean().item()
    assert abs(mean - 30.14) < 0.05, f"TAEF2 Kodak24 PSNR {mean:.3f} dB, README says 30.14"


def test_taesana_encoder_is_32x(assets):
    ae = tiny.try_load(assets / "weights/taesana_encoder.pth")
    assert isinstance(ae, TAESD) and ae.downsample_factor == 32 and ae.latent_channels == 32
    assert ae.has_encoder and not ae.has_decoder
    with torch.inference_mode():
        z = ae.encode(torch.rand(1, 3, 64, 96) * 2 - 1)
    assert z.shape == (1, 32, 2, 3) and torch.isfinite(z).all() and z.std() > 0.1


def test_birchsan_sd15_pair_kodak24(assets, kodak, sd1_latents):
    w = assets / "weights/birchsan_approx_vae"
    ae = tiny.try_load([w / "encoder_sd1.5.pt", w / "decoder_sd1.5.pt"])
    assert isinstance(ae, MLPAutoencoder) and ae.output_scale == 1 and ae.scaling_factor == 0.18215
    # diffusion-space latents: std ~0.4-0.75 (raw SD1 latents would be ~5x larger)
    std = sd1_latents.transpose(0, 1).flatten(1).std(1)
    assert ((std > 0.3) & (std < 1.0)).all(), std
    with torch.inference_mode():
        score = psnr(ae.decode(sd1_latents), F.avg_pool2d(kodak, 8)).mean().item()
    assert abs(score - 29.6) < 0.1, score  # measured 29.59 dB at latent resolution


@pytest.mark.parametrize("name,ch", [("sd1", 4), ("sdxl", 4), ("sd3", 16)])
def test_vae_approx_loads_strictly_and_decodes(assets, name, ch):
    preset = "sdxl" if name == "sdxl" else None
    ae = tiny.try_load(assets / f"weights/vae_approx/vaeapprox-{name}.pt", preset=preset)
    assert isinstance(ae, VAEApprox) and ae.latent_channels == ch and ae.latent_space == name
    with torch.inference_mode():
        y = ae.decode(torch.randn(1, ch, 8, 8))
    assert y.shape == (1, 3, 16, 16) and torch.isfinite(y).all()


def test_vae_approx_takes_diffusion_space_latents(assets, kodak, sd1_latents):
    """The sd1 VAEApprox decodes Birch-san's (diffusion-space) latents far better as is than rescaled."""
    ae = tiny.try_load(assets / "weights/vae_approx/vaeapprox-sd1.pt")
    target, z = F.avg_pool2d(kodak[:8], 4), sd1_latents[:8]  # 8 images are plenty to tell a 6 dB gap
    with torch.inference_mode():
        scores = {s: psnr(ae.decode(z * s), target).mean().item() for s in (1.0, 0.18215, 1 / 0.18215)}
    assert scores[1.0] > 20 and scores[1.0] > max(scores[0.18215], scores[1 / 0.18215]) + 4, scores
