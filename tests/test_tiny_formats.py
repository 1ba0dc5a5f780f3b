"""Tiny-model formats: diffusers AutoencoderTiny parity, taesd halves, MLP / VAEApprox files, bad input."""

import json

import pytest
import torch

from vaetrain.formats import tiny
from vaetrain.formats.io import CheckpointError, read_state_dict
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.taesd import TAESD
from vaetrain.models.vae_approx import VAEApprox

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderTiny  # noqa: E402  (test oracle only)

W = 16  # reduced width keeps these tests tiny


def _randomize(module):
    """Random, non-trivial weights (diffusers' init leaves biases at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return module


def _reference(latent_channels, factor=8):
    n = factor.bit_length()  # stages: 4 for the published 8x layout, 3 for 4x
    return _randomize(AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(W,) * n,
                                      decoder_block_out_channels=(W,) * n, num_encoder_blocks=(1,) + (3,) * (n - 1),
                                      num_decoder_blocks=(3,) * (n - 1) + (1,))).eval()


@pytest.mark.parametrize("latent_channels,factor", [(4, 8), (16, 8), (4, 4)])
def test_diffusers_folder_parity(tmp_path, latent_channels, factor):
    ref = _reference(latent_channels, factor)
    ref.save_pretrained(tmp_path / "tiny")
    ae = tiny.try_load(tmp_path / "tiny")
    assert isinstance(ae, TAESD) and ae.latent_channels == latent_channels and ae.width == W and not ae.flux_2
    assert ae.downsample_factor == factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_ref = ref.encode(x).latents  # AutoencoderTiny: [-1, 1] in, unscaled (diffusion-space) latents out
        torch.testing.assert_close(ae.encode(x), z_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ae.decode(z_ref), ref.decode(z_ref).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("latent_channels,factor", [(16, 8), (4, 4)])
def test_export_to_diffusers_loads_in_diffusers(tmp_path, latent_channels, factor):
    ours = _randomize(TAESD(latent_channels, width=W, downsample_factor=factor)).eval()
    out = tiny.save(ours, tmp_path / "exp", "diffusers")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny" and cfg["latent_channels"] == latent_channels
    assert cfg["encoder_block_out_channels"] == [W] * factor.bit_length() and cfg["upsampling_scaling_factor"] == 2
    ref = AutoencoderTiny.from_pretrained(out).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
        torch.testing.assert_close(ref.encode(x).latents, z, atol=1e-5, rtol=0)
        torch.testing.assert_close(ref.decode(z).sample, ours.decode(z), atol=1e-5, rtol=0)
    again = tiny.try_load(out)  # and our loader reads its own export
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z), ours.decode(z), atol=0, rtol=0)


@pytest.mark.parametrize("flags,name", [(dict(latent_channels=32, flux_2=True), "taef2"),
                                        (dict(latent_channels=4), "taesd"),
                                        (dict(latent_channels=32, downsample_factor=32), "mymodel"),
                                        (dict(latent_channels=4, downsample_factor=4), "taesd")])
def test_taesd_halves_roundtrip(tmp_path, flags, name):
    ours = _randomize(TAESD(width=8, **flags)).eval()
    with pytest.warns(UserWarning):  # width 8 is not what ComfyUI builds, and it says so
        out = tiny.save(ours, tmp_path / "mymodel", "taesd")
    # ComfyUI's vae_approx names for the latent space; none fits a plain 32-channel (Sana) TAESD
    enc, dec = out / f"{name}_encoder.safetensors", out / f"{name}_decoder.safetensors"
    assert enc.is_file() and dec.is_file()
    assert "0.weight" in read_state_dict(enc) and "1.weight" in read_state_dict(dec)  # original Sequential keys
    f = flags.get("downsample_factor", 8)
    x = torch.rand(1, 3, 2 * f, 2 * f) * 2 - 1
    with torch.no_grad():
        ref = ours.decode(ours.encode(x))
    for source in (out, [enc, dec], [dec, enc]):  # folder or list, in any order
        again = tiny.try_load(source)
        assert again.config() == ours.config()
        with torch.no_grad():
            torch.testing.assert_close(again.decode(again.encode(x)), ref, atol=0, rtol=0)
    dec_only = tiny.try_load(dec)  # one half alone
    assert dec_only.has_decoder and not dec_only.has_encoder and dec_only.flux_2 == ours.flux_2


def test_keys_decide_not_names(tmp_path):
    """A decoder named like an encoder is still loaded as a decoder."""
    ours = TAESD(16, width=8)
    tiny.save(ours, tmp_path / "m", "taesd")
    misnamed = tmp_path / "taesd_encoder_for_sdxl.safetensors"
    (tmp_path / "m" / "taesd3_decoder.safetensors").rename(misnamed)
    ae = tiny.try_load(misnamed)
    assert ae.has_decoder and not ae.has_encoder and ae.latent_channels == 16


def test_diffusers_refuses_flux2_and_halves(tmp_path):
    with pytest.raises(ValueError, match="flux_2.*no diffusers"):
        tiny.save(TAESD(32, width=8, flux_2=True), tmp_path / "a", "diffusers")
    with pytest.raises(ValueError, match="both halves"):
        tiny.save(TAESD(4, width=8, encoder=False), tmp_path / "b", "diffusers")
    with pytest.raises(ValueError, match="8x and 4x only"):
        tiny.save(TAESD(32, width=8, downsample_factor=32), tmp_path / "c", "diffusers")
    assert not (tmp_path / "a").exists()


def test_not_mine_returns_none(tmp_path):
    torch.save({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "kl.pt")
    assert tiny.try_load(tmp_path / "kl.pt") is None
    assert tiny.try_load(tmp_path / "missing.pt") is None
    assert tiny.save(torch.nn.Module(), tmp_path / "x", "taesd") is None


def test_bad_taesd_file_one_line_error(tmp_path):
    sd = {k: v.clone() for k, v in TAESD(4, width=8, decoder=False).encoder.state_dict().items()}
    del sd["3.conv.2.bias"]
    sd["5.conv.0.weight"] = torch.zeros(8, 8, 5, 5)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        tiny.try_load(tmp_path / "broken.pth")
    msg = str(e.value)
    assert "\n" not in msg and "broken.pth" in msg and "TAESD encoder" in msg
    assert "missing keys: 3.conv.2.bias" in msg and "5.conv.0.weight (8, 8, 5, 5) vs (8, 8, 3, 3)" in msg


def test_mismatched_pair_is_an_error(tmp_path):
    tiny.save(TAESD(4, width=8), tmp_path / "a", "taesd")
    tiny.save(TAESD(16, width=8), tmp_path / "b", "taesd")
    with pytest.raises(CheckpointError, match="different TAESD variants"):
        tiny.try_load([tmp_path / "a" / "taesd_encoder.safetensors", tmp_path / "b" / "taesd3_decoder.safetensors"])
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a tiny-autoencoder half"):
        tiny.try_load([tmp_path / "a" / "taesd_encoder.safetensors", tmp_path / "other.pt"])


def test_mlp_birchsan_layout_roundtrip(tmp_path):
    ours = _randomize(MLPAutoencoder(width=16, depth=2, upsampler_width=8, scaling_factor=0.13025))
    out = tiny.save(ours, tmp_path / "mlp", "original")
    enc_sd = read_state_dict(out / "mlp_encoder.safetensors")
    assert set(enc_sd) == {f"{n}.{p}" for n in ("in_proj", "hidden_layers.0", "hidden_layers.1", "out_proj")
                           for p in ("weight", "bias")}
    again = tiny.try_load([out / "mlp_encoder.safetensors", out / "mlp_decoder.safetensors"])
    assert isinstance(again, MLPAutoencoder) and again.config() == ours.config()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(again.decode(again.encode(x)), ours.decode(ours.encode(x)), atol=0, rtol=0)
    # Birch-san's own .pt (no metadata): keys alone, SD1 scale
    torch.save({k: v for k, v in enc_sd.items()}, tmp_path / "enc.pt")
    plain = tiny.try_load(tmp_path / "enc.pt")
    assert plain.has_encoder and not plain.has_decoder and plain.scaling_factor == 0.18215 and plain.depth == 2
    with pytest.raises(ValueError, match="no diffusers layout"):
        tiny.save(ours, tmp_path / "d", "diffusers")


def test_vae_approx_roundtrip(tmp_path):
    ours = _randomize(VAEApprox("sd3", upsample_to_full=True))
    out = tiny.save(ours, tmp_path / "va", "original")
    sd = read_state_dict(out / "va_decoder.safetensors")
    assert set(sd) == {f"conv{i}.{p}" for i in range(1, 9) for p in ("weight", "bias")}
    again = tiny.try_load(out)
    assert isinstance(again, VAEApprox) and again.config() == ours.config()
    # an A1111-style .pt holds no flags: 4 channels are sd1 unless the preset says sdxl
    torch.save(VAEApprox("sd1").decoder.state_dict(), tmp_path / "a1111.pt")
    assert tiny.try_load(tmp_path / "a1111.pt").latent_space == "sd1"
    assert tiny.try_load(tmp_path / "a1111.pt", preset="sdxl").scaling_factor == 0.13025


def test_through_load_and_save_autoencoder(tmp_path):
    loading = pytest.importorskip("vaetrain.formats.loading")
    from vaetrain.formats import load_autoencoder, save_autoencoder

    ours = _randomize(TAESD(16, width=8)).eval()
    out = save_autoencoder(ours, tmp_path / "t", format="taesd", latent_space="flux1")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = ours.decode(ours.encode(x))
    for source in ([out / "taef1_encoder.safetensors", out / "taef1_decoder.safetensors"], out, str(out)):
        ae = load_autoencoder(source)
        assert isinstance(ae, TAESD) and not ae.training
        torch.testing.assert_close(ae.decode(ae.encode(x)), ref, atol=0, rtol=0)
    d = save_autoencoder(ours, tmp_path / "d", format="diffusers")
    torch.testing.assert_close(load_autoencoder(d).decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=0, rtol=0)
    assert loading is not None


def test_folder_with_pth_and_safetensors_copies(tmp_path):
    ours = TAESD(4, width=8)
    out = tiny.save(ours, tmp_path / "f", "taesd")
    for half in ("encoder", "decoder"):  # hub repos ship both .pth and .safetensors of each half
        torch.save(read_state_dict(out / f"taesd_{half}.safetensors"), out / f"taesd_{half}.pth")
    assert tiny.try_load(out).config() == ours.config()
    torch.save(read_state_dict(out / "taesd_encoder.safetensors"), out / "other_encoder.pth")
    with pytest.raises(CheckpointError, match="holds 3 tiny-autoencoder halves.*as a list"):
        tiny.try_load(out)
