"""Tiny architectures: TAESD variants, MLP, VAEApprox, latent interposer (shapes, conventions, gradients); the params
dataclass of every model."""

import dataclasses
import inspect

import pytest
import torch

from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.interposer import LatentInterposer
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD, Block, Clamp, Decoder, Encoder
from vaetrain.models.vae_approx import VAEApprox


@pytest.mark.parametrize("latent_channels", [4, 16, 32])
@pytest.mark.parametrize("flux_2", [False, True])
def test_taesd_shapes_and_range(latent_channels, flux_2):
    ae = TAESD(latent_channels, width=8, flux_2=flux_2)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, latent_channels, 4, 6)
    y = ae.decode(z)
    assert y.shape == x.shape
    assert ae.last_layer() is ae.decoder[-1].weight


def test_taesd_uses_unit_range_inside():
    """The [-1, 1] API must hand TAESD [0, 1] pixels and map its [0, 1] output back."""
    ae = TAESD(4, width=8)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.encode(x), ae.encoder((x + 1) / 2))
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(ae.decode(z), ae.decoder(z) * 2 - 1)


def test_original_index_layout():
    enc, dec = Encoder(4), Decoder(4)
    assert isinstance(dec[0], Clamp) and isinstance(enc[1], Block) and isinstance(dec[3], Block)
    assert enc[0].weight.shape == (64, 3, 3, 3) and enc[14].weight.shape == (4, 64, 3, 3)
    assert dec[1].weight.shape == (64, 4, 3, 3) and dec[19].weight.shape == (3, 64, 3, 3) and len(dec) == 20
    assert enc[2].bias is None and dec[7].bias is None  # stride / upsample convs have no bias in the original
    # TAESD 64-ch: 1.22M params per half (REFERENCE.md section 3)
    assert abs(sum(p.numel() for p in enc.parameters()) - 1.22e6) < 0.01e6


def test_flux2_pool_only_in_midblocks():
    enc, dec = Encoder(32, flux_2=True), Decoder(32, flux_2=True)
    pooled_enc = [i for i, m in enumerate(enc) if isinstance(m, Block) and m.pool is not None]
    pooled_dec = [i for i, m in enumerate(dec) if isinstance(m, Block) and m.pool is not None]
    assert pooled_enc == [11, 12, 13] and pooled_dec == [3, 4, 5]
    # README: 1,338,528 / 1,338,499 params for the real TAEF2 halves
    assert sum(p.numel() for p in enc.parameters()) == 1338528
    assert sum(p.numel() for p in dec.parameters()) == 1338499


def test_pool_branch_changes_output():
    torch.manual_seed(0)
    b = Block(8, 8, pool=True)
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        b.pool[-1].weight.zero_()
        base = b(x)
        b.pool[-1].weight.normal_()
    assert not torch.allclose(base, b(x))


def test_f32_variant_shapes():
    ae = TAESD(32, width=8, downsample_factor=32)
    z = ae.encode(torch.zeros(1, 3, 64, 96))
    assert z.shape == (1, 32, 2, 3)
    assert ae.decode(z).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="downsample_factor must be 4, 8 or 32"):
        TAESD(4, downsample_factor=16)


def test_f4_variant_is_the_8x_layout_minus_one_stage():
    f8, f4 = TAESD(4, width=8), TAESD(4, width=8, downsample_factor=4)
    assert f4.encode(torch.zeros(1, 3, 32, 48)).shape == (1, 4, 8, 12)
    assert f4.decode(torch.zeros(1, 4, 8, 12)).shape == (1, 3, 32, 48)
    assert len(f8.encoder) - len(f4.encoder) == 4 and len(f8.decoder) - len(f4.decoder) == 5  # conv + 3 blocks (+ up)


def test_half_models():
    enc_only = TAESD(4, width=8, decoder=False)
    assert enc_only.has_encoder and not enc_only.has_decoder
    with pytest.raises(RuntimeError, match="no decoder"):
        enc_only.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="at least one half"):
        TAESD(4, encoder=False, decoder=False)


def test_taesd_trains():
    ae = TAESD(4, width=8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = (ae(x) - x).pow(2).mean()
    loss.backward()
    assert ae.last_layer().grad is not None and ae.last_layer().grad.abs().sum() > 0


# --- MLP ---------------------------------------------------------------------------------------------------------
def test_mlp_is_per_pixel_at_latent_resolution():
    ae = MLPAutoencoder()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (1, 4, 4, 4) and ae.output_scale == 1
    # encoder = MLP of the 8x area-downsampled image
    torch.testing.assert_close(z, ae.encoder.mlp(torch.nn.functional.avg_pool2d(x, 8)))
    y = ae.decode(z)
    assert y.shape == (1, 3, 4, 4)
    # per pixel: changing one latent pixel changes exactly one output pixel
    z2 = z.clone()
    z2[..., 1, 2] += 1
    diff = (ae.decode(z2) - y).abs().sum(1)[0]
    assert diff[1, 2] > 0 and (diff > 0).sum() == 1


def test_mlp_raw_space_is_sd1_raw():
    ae = MLPAutoencoder()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.encode_raw(x) * 0.18215, ae.encode(x))
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(ae.decode_raw(z / 0.18215), ae.decode(z))


def test_mlp_upsampler_starts_as_nearest_and_trains():
    ae = MLPAutoencoder(upsampler_width=8, width=16, depth=2)
    assert ae.output_scale == 8
    z = torch.randn(1, 4, 3, 5)
    y = ae.decode(z)
    assert y.shape == (1, 3, 24, 40)
    torch.testing.assert_close(y, torch.nn.functional.interpolate(ae.decoder.mlp(z), scale_factor=8))
    y.pow(2).mean().backward()
    assert ae.last_layer().grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible by 8"):
        ae.encode(torch.zeros(1, 3, 20, 16))


# --- VAEApprox ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space,ch", [("sd1", 4), ("sdxl", 4), ("sd3", 16)])
def test_vae_approx(space, ch):
    ae = VAEApprox(space)
    assert ae.latent_channels == ch and not ae.has_encoder
    z = torch.randn(1, ch, 5, 6)
    assert ae.decode(z).shape == (1, 3, 10, 12)
    full = VAEApprox(space, upsample_to_full=True)
    full.load_state_dict(ae.state_dict())
    assert full.decode(z).shape == (1, 3, 40, 48)
    # raw latents go through the latent space's scale/shift first
    torch.testing.assert_close(ae.decode_raw(z / ae.scaling_factor + ae.shift_factor), ae.decode(z))
    assert sum(p.numel() for p in ae.parameters()) in range(52_000, 58_000)
    with pytest.raises(ValueError, match="latent_space"):
        VAEApprox("sd2")


# --- interposer ----------------------------------------------------------------------------------------------------
def test_interposer():
    net = LatentInterposer(4, 16, width=8, blocks=2)
    assert net(torch.randn(2, 4, 6, 6)).shape == (2, 16, 6, 6)
    up = LatentInterposer(4, 4, width=8, blocks=1, scale=2.0)
    out = up(torch.randn(1, 4, 3, 5))
    assert out.shape == (1, 4, 6, 10)
    out.mean().backward()
    assert up.head.weight.grad is not None
    assert sum(p.numel() for p in LatentInterposer().parameters()) > 1_300_000  # 64 ch, 12 blocks
    with pytest.raises(ValueError, match="expects 4-channel"):
        net(torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize("cls", [AutoencoderKL, TAESD, MLPAutoencoder, VAEApprox, LatentInterposer, NLayerDiscriminator])
def test_one_params_dataclass_per_model(cls):
    """The constructor's keywords are the params dataclass's fields (same names, order and defaults)."""
    sig = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    fields = dataclasses.fields(cls.Params)
    assert [p.name for p in sig] == [f.name for f in fields]
    assert [p.default for p in sig] == [f.default for f in fields]
    model = cls()
    assert model.params == cls.Params() and model.config() == dataclasses.asdict(cls.Params())
    again = cls.from_params(model.params)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_params_validate_and_normalise():
    p = AutoencoderKL(base_channels=16, channel_mult=[1, 2], norm_groups=8, flux2=True, scaling_factor=1).params
    assert p.channel_mult == (1, 2) and p.use_quant_conv is False and isinstance(p.scaling_factor, float)
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        AutoencoderKL(base_channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="at least one half"):
        TAESD(encoder=False, decoder=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TAESD().params.width = 8
