"""AutoencoderKL against diffusers (the oracle), through every format we read and write. Tiny widths."""

import json
import warnings

import pytest
import torch

from vaetrain.formats import kl
from vaetrain.formats.io import CheckpointError, write_safetensors
from vaetrain.formats import load_autoencoder, load_weights, save_autoencoder
from vaetrain.models.autoencoder_kl import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

# (name, diffusers kwargs, scale, shift): the real families' latent/quant layout at reduced width
FAMILIES = [
    ("sd1", dict(latent_channels=4, block_out_channels=(32, 64)), 0.18215, None),
    ("sdxl", dict(latent_channels=4, block_out_channels=(32, 32, 64)), 0.13025, None),
    ("sd3", dict(latent_channels=16, block_out_channels=(32, 64), use_quant_conv=False, use_post_quant_conv=False),
     1.5305, 0.0609),
    ("flux1", dict(latent_channels=16, block_out_channels=(32, 64), use_quant_conv=False, use_post_quant_conv=False),
     0.3611, 0.1159),
]


def _perturb(model):
    """Random norms/biases too, so a swapped or skipped key mapping cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _diffusers_kl(kwargs, scale, shift):
    n = len(kwargs["block_out_channels"])
    cfg = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
               layers_per_block=1, norm_num_groups=32, scaling_factor=scale, shift_factor=shift, sample_size=32)
    return _perturb(diffusers.AutoencoderKL(**cfg, **kwargs))


def _images(n=2, size=32):
    return torch.rand(n, 3, size, size) * 2 - 1


def _assert_parity(ours, dvae, scale, shift):
    x = _images()
    shift = shift or 0.0
    with torch.no_grad():
        post = dvae.encode(x).latent_dist
        mean, logvar = ours.posterior(x)
        assert (mean - post.mean).abs().max() < 1e-4
        assert (logvar - post.logvar).abs().max() < 1e-4
        z = ours.encode(x)
        assert (z - (post.mean - shift) * scale).abs().max() < 1e-4
        ref = dvae.decode(z / scale + shift).sample
        assert (ours.decode(z) - ref).abs().max() < 1e-4
    return x


@pytest.mark.parametrize("name,kwargs,scale,shift", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_parity_and_round_trips(tmp_path, name, kwargs, scale, shift):
    dvae = _diffusers_kl(kwargs, scale, shift)
    dvae.save_pretrained(tmp_path / "hf")

    # 1. diffusers folder (and its vae/ subfolder layout, as in pipeline repos)
    ours = load_autoencoder(tmp_path / "hf")
    assert isinstance(ours, AutoencoderKL)
    assert (ours.scaling_factor, ours.shift_factor) == (scale, shift or 0.0)
    assert ours.params.use_quant_conv == kwargs.get("use_quant_conv", True)
    x = _assert_parity(ours, dvae, scale, shift)

    # 2. original single file, made with our diffusers->original key map, prefixed as full checkpoints are
    orig = kl.diffusers_to_original(dvae.state_dict())
    assert "decoder.up.0.block.0.conv1.weight" in orig and "encoder.mid.attn_1.q.weight" in orig
    if name == "sd1":  # Lightning LDM autoencoder .ckpt: nested under state_dict, loss.* and EMA state to drop
        f = tmp_path / "model.ckpt"
        sd = {**orig, "loss.discriminator.main.0.weight": torch.zeros(2), "model_ema.decay": torch.tensor(0.999)}
        torch.save({"state_dict": sd, "global_step": 7}, f)
    else:  # SGM full checkpoint (VAE beside the UNet), bare SD3 file, BFL-style "vae." prefix
        f = tmp_path / "ae.safetensors"
        prefix = {"sdxl": "first_stage_model.", "flux1": "vae."}.get(name, "")
        sd = {prefix + k: v for k, v in orig.items()}
        if name == "sdxl":
            sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
        write_safetensors(sd, f)
    with pytest.warns(UserWarning, match="scale/shift"):
        bare = load_autoencoder(f)  # an original file does not say its convention
    assert (bare.scaling_factor, bare.shift_factor) == (1.0, 0.0)
    from_orig = load_autoencoder(f, preset=name)
    _assert_parity(from_orig, dvae, scale, shift)

    # 3. export to diffusers -> diffusers reads it and gives identical outputs
    save_autoencoder(from_orig, tmp_path / "export", format="diffusers")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["scaling_factor"] == scale and cfg["latent_channels"] == kwargs["latent_channels"]
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert torch.equal(back.encode(x).latent_dist.mean, dvae.encode(x).latent_dist.mean)
        z = torch.randn(1, kwargs["latent_channels"], 8, 8)
        assert torch.equal(back.decode(z).sample, dvae.decode(z).sample)
    assert back.config.shift_factor == shift

    # 4. original export -> reload: same weights and same convention (kept in the file's metadata)
    written = save_autoencoder(from_orig, tmp_path / "orig.safetensors", format="original")
    again = load_autoencoder(written)
    assert (again.scaling_factor, again.shift_factor) == (scale, shift or 0.0)
    for k, v in from_orig.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_pipeline_vae_subfolder_and_old_attention_names(tmp_path):
    dvae = _diffusers_kl(dict(latent_channels=4, block_out_channels=(32, 64)), 0.18215, None)
    dvae.save_pretrained(tmp_path / "pipe" / "vae")
    _assert_parity(load_autoencoder(tmp_path / "pipe"), dvae, 0.18215, None)

    # pre-0.14 diffusers single file: query/key/value/proj_attn, Linear weights
    old = {}
    for k, v in dvae.state_dict().items():
        for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    write_safetensors(old, tmp_path / "old.safetensors")
    _assert_parity(load_autoencoder(tmp_path / "old.safetensors", preset="sd1"), dvae, 0.18215, None)


def test_flux2_parity_and_round_trip(tmp_path):
    assert hasattr(diffusers, "AutoencoderKLFlux2")
    dvae = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                        latent_channels=8, norm_num_groups=32, sample_size=32)
    _perturb(dvae)
    with torch.no_grad():
        dvae.bn.running_mean.copy_(torch.randn(32))
        dvae.bn.running_var.copy_(torch.rand(32) + 0.5)
    dvae.save_pretrained(tmp_path / "hf")

    ours = load_autoencoder(tmp_path / "hf")
    assert ours.params.flux2 and ours.quant_conv is None and ours.encoder.quant_conv is not None
    assert ours.latent_channels == 8 and ours.bn.running_mean.shape == (32,)
    x = _images()
    with torch.no_grad():
        ref_mean = dvae.encode(x).latent_dist.mean  # (B, 8, 16, 16)
        z = ours.encode(x)
        assert (z - ref_mean).abs().max() < 1e-4
        assert (ours.decode(z) - dvae.decode(z).sample).abs().max() < 1e-4
        # transformer space exactly as the FLUX.2 pipeline computes it
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        patched = Flux2Pipeline._patchify_latents(ref_mean)
        ref_norm = (patched - dvae.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            dvae.bn.running_var.view(1, -1, 1, 1) + dvae.config.batch_norm_eps)
        zn = ours.normalize_latents(z)
        assert zn.shape == (2, 32, 8, 8) and (zn - ref_norm).abs().max() < 1e-4
        assert (ours.denormalize_latents(zn) - z).abs().max() < 1e-4

    # BFL original layout: quant convs inside encoder/decoder, bn at the top
    written = save_autoencoder(ours, tmp_path / "ae.safetensors", format="original")
    from safetensors.torch import load_file

    keys = set(load_file(written))
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_var"} <= keys
    assert "quant_conv.weight" not in keys
    again = load_autoencoder(written)
    with torch.no_grad():
        assert torch.equal(again.encode(x), z) and torch.equal(again.decode(z), ours.decode(z))

    save_autoencoder(again, tmp_path / "export", format="diffusers")
    back = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert torch.equal(back.encode(x).latent_dist.mean, ref_mean)
        assert torch.equal(back.bn.running_mean, dvae.bn.running_mean)


def _small(**kw):
    return AutoencoderKL(latent_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, **kw)


def test_shapes_sampling_and_last_layer():
    ae = _small(scaling_factor=0.5, shift_factor=0.1).eval()
    x = _images(size=32)
    mean, logvar = ae.posterior(x)
    assert mean.shape == (2, 4, 16, 16) and logvar.min() >= -30 and logvar.max() <= 20
    assert torch.allclose(ae.encode(x), (mean - 0.1) * 0.5)
    assert not torch.equal(ae.encode_raw(x, sample=True), mean)
    assert ae.decode(ae.encode(x)).shape == x.shape
    assert ae.last_layer() is ae.decoder.conv_out.weight
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderKL(base_channels=24)


def test_full_size_parameter_counts():
    """REFERENCE.md section 3: 34.16M / 49.49M (SD/SDXL), 34.27M / 49.55M (SD3/FLUX.1)."""
    count = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 2)  # noqa: E731
    with torch.device("meta"):
        sd = AutoencoderKL()
        f1 = AutoencoderKL(latent_channels=16, use_quant_conv=False)
    assert (count(sd.encoder), count(sd.decoder)) == (34.16, 49.49)
    assert (count(f1.encoder), count(f1.decoder)) == (34.27, 49.55)


def test_midblock_attention_drop(tmp_path):
    teacher = _perturb(_small())
    save_autoencoder(teacher, tmp_path / "t.safetensors", format="original")

    student = _small(decoder_attention=False)
    with pytest.raises(CheckpointError, match=r"t\.safetensors.*decoder\.mid\.attn_1\..*allow_drop_attention"):
        load_weights(student, tmp_path / "t.safetensors")
    with pytest.warns(UserWarning, match=r"dropped 10 midblock attention tensors \(decoder\.mid\.attn_1"):
        load_weights(student, tmp_path / "t.safetensors", allow_drop_attention=True)
    assert torch.equal(student.decoder.conv_out.weight, teacher.decoder.conv_out.weight)
    assert torch.equal(student.encoder.mid.attn_1.q.weight, teacher.encoder.mid.attn_1.q.weight)

    # a decoder-only student takes its half of a full checkpoint
    half = AutoencoderKL(latent_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, encoder=False)
    load_weights(half, tmp_path / "t.safetensors")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(half.decode_raw(z), teacher.decode_raw(z))

    # load_autoencoder: without the option the attention is kept, with it both sides lose it
    assert load_autoencoder(tmp_path / "t.safetensors").params.decoder_attention
    with pytest.warns(UserWarning, match="dropped 20 midblock"):
        dropped = load_autoencoder(tmp_path / "t.safetensors", allow_drop_attention=True)
    assert not dropped.params.encoder_attention and not dropped.params.decoder_attention
    assert not any(".attn_1." in k for k in dropped.state_dict())


def test_no_attention_exports_to_diffusers(tmp_path):
    ae = _perturb(_small(encoder_attention=False, decoder_attention=False, scaling_factor=0.18215))
    save_autoencoder(ae, tmp_path / "hf", format="diffusers")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["mid_block_add_attention"] is False
    dvae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        x = _images()
        assert (dvae.encode(x).latent_dist.mean - ae.encode_raw(x)).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_autoencoder(tmp_path / "hf")
    assert not again.params.decoder_attention and again.scaling_factor == 0.18215

    # one-sided attention has no diffusers form: a clear refusal, the original format works
    with pytest.raises(ValueError, match="format=original"):
        save_autoencoder(_small(decoder_attention=False), tmp_path / "x", format="diffusers")


def test_attention_over_query_chunks_is_the_same(monkeypatch):
    """Chunked queries (what keeps a 2048 px midblock off a 16 GiB score matrix) give the unchunked result."""
    from vaetrain.models import autoencoder_kl

    block = autoencoder_kl.AttnBlock(8, 4).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(autoencoder_kl, "SCORE_BLOCK", 144 * 5)  # 5 queries per chunk, a ragged last one
        chunked = block(x)
    assert torch.allclose(whole, chunked, atol=1e-6)
