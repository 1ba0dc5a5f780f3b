"""Loading entry points: bad input gives one clear line, the CLI converts, hub sources resolve offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaetrain.cli
from vaetrain.formats import kl
from vaetrain.formats.io import CheckpointError, write_safetensors
from vaetrain.models.taesd import TAESD
from vaetrain.formats import load_autoencoder, save_autoencoder
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.presets import PRESETS, get_preset


def _small(**kw):
    return AutoencoderKL(latent_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, **kw).eval()


@pytest.fixture
def kl_file(tmp_path) -> Path:
    """An original-layout single file without metadata, as LDM/SGM checkpoints come."""
    path = tmp_path / "good.safetensors"
    write_safetensors(_small().state_dict(), path)
    return path


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert match in msg, msg
    return msg


# --- bad input ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    _one_line_error("file not found", tmp_path / "nope.ckpt")
    _one_line_error("file not found", "models/nope.safetensors")  # relative, hub-shaped, but a file name
    _one_line_error("file not found", [tmp_path / "enc.pth", tmp_path / "dec.pth"])


def test_truncated_files(tmp_path, kl_file):
    data = kl_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    msg = _one_line_error("not a readable safetensors file", cut)
    assert str(cut) in msg
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": _small().state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:4000])
    assert str(ckpt) in _one_line_error("truncated or corrupt", ckpt)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is a text file, not weights\n")
    assert str(text) in _one_line_error("not a checkpoint", text)
    png = tmp_path / "image.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert str(png) in _one_line_error("not a checkpoint", png)
    tensors = tmp_path / "random.safetensors"
    write_safetensors({"foo.weight": torch.zeros(3)}, tensors)
    _one_line_error("not a recognised autoencoder checkpoint; accepted: diffusers", tensors)


def test_wrong_keys_and_shapes(tmp_path):
    sd = _small().state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.down.0.block.0.norm2.bias"}
    write_safetensors(missing, tmp_path / "missing.safetensors")
    _one_line_error("missing keys: encoder.down.0.block.0.norm2.bias", tmp_path / "missing.safetensors", preset="sd1")

    write_safetensors({**sd, "encoder.mid.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    _one_line_error("unexpected keys: encoder.mid.extra.weight", tmp_path / "extra.safetensors", preset="sd1")

    bad = dict(sd)
    bad["decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    write_safetensors(bad, tmp_path / "shape.safetensors")
    _one_line_error("wrong shapes (file vs model): decoder.mid.block_1.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)",
                    tmp_path / "shape.safetensors", preset="sd1")

    no_out = {k: v for k, v in sd.items() if not k.startswith("decoder.conv_out.")}
    write_safetensors(no_out, tmp_path / "no_out.safetensors")
    _one_line_error("lacks decoder.conv_out.weight", tmp_path / "no_out.safetensors", preset="sd1")


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": _Evil(marker)}, evil)
    assert not marker.exists()
    msg = _one_line_error("refused to unpickle", evil)
    assert str(evil) in msg
    assert not marker.exists()


def test_cli_convert_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("garbage")
    with pytest.raises(SystemExit) as e:
        vaetrain.cli.main(["convert", str(bad), str(tmp_path / "out")])
    assert isinstance(e.value.code, str) and e.value.code.startswith("vaetrain convert: ")
    assert str(bad) in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    r = subprocess.run([sys.executable, "-m", "vaetrain.cli", "convert", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "not a checkpoint" in lines[0], r.stderr


# --- the convert command -------------------------------------------------------------------------------
def test_cli_convert_original_to_diffusers_and_back(tmp_path, kl_file, capsys):
    out = vaetrain.cli.run("convert", [str(kl_file), str(tmp_path / "hf"), "preset=sdxl"])
    assert f"to {tmp_path / 'hf'}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] == 0.13025
    assert cfg["block_out_channels"] == [32, 64] and cfg["layers_per_block"] == 1

    back = vaetrain.cli.run("convert", [str(out), str(tmp_path / "back.safetensors"), "format=original"])
    a, b = load_autoencoder(kl_file, preset="sdxl"), load_autoencoder(back)
    assert b.scaling_factor == 0.13025
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))

    with pytest.raises(SystemExit, match="format=diffusers or format=original"):
        vaetrain.cli.main(["convert", str(kl_file), str(tmp_path / "x"), "format=onnx"])


# --- hub resolution (no network) ------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download replaced by a local 'repo' holding a small KL model in a vae/ subfolder."""
    root = tmp_path / "snapshot"
    save_autoencoder(_small(scaling_factor=0.5), root / "vae", format="diffusers")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(root)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_preset_resolves_repo_subfolder_and_convention(fake_hub):
    ae = load_autoencoder(None, preset="flux1")
    files = ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert fake_hub == [("black-forest-labs/FLUX.1-dev", files)]
    # the preset's convention wins over the file's config (here a made-up 0.5)
    assert (ae.scaling_factor, ae.shift_factor) == (0.3611, 0.1159)


def test_hub_id_with_subfolder(fake_hub):
    ae = load_autoencoder("someone/some-vae", subfolder="vae")
    assert fake_hub == [("someone/some-vae", ["vae/*"])]
    assert ae.scaling_factor == 0.5
    load_autoencoder("stabilityai/sd-vae-ft-mse", preset="sd1", subfolder="vae")
    assert fake_hub[-1] == ("stabilityai/sd-vae-ft-mse", ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"])


def test_offline_without_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    msg = _one_line_error("could not get it from the Hugging Face hub", "nobody-xyz/no-such-vae-xyz")
    assert msg.startswith("nobody-xyz/no-such-vae-xyz:")


def test_presets_table():
    assert get_preset("sd1").repo == "stabilityai/sd-vae-ft-mse" and get_preset("sd1").scaling_factor == 0.18215
    assert get_preset("sd3").subfolder == "vae" and get_preset("sd3").shift_factor == 0.0609
    assert get_preset("flux2").arch["flux2"] and get_preset("flux2").arch["latent_channels"] == 32
    assert {"sd1", "sd1-ema", "sdxl", "sdxl-fp16-fix", "sd3", "flux1", "flux2",
            "taesd", "taesdxl", "taesd3", "taef1", "taef2"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset 'sd5'; known presets: sd1"):
        get_preset("sd5")
    for name in ("sd1", "sdxl", "sd3", "flux1", "flux2"):  # the teacher configs use these names
        assert (Path(vaetrain.cli.conf_dir()) / "teacher" / f"{name}.yaml").is_file()


def test_key_maps_are_inverse():
    sd = _small().state_dict()
    assert kl.diffusers_to_original(kl.original_to_diffusers(sd)).keys() == sd.keys()


def test_cli_convert_takes_a_list_of_halves(tmp_path):
    """`vaetrain convert '[enc,dec]' OUT`: the README's syntax for TAESD halves (the CLI passes it as one string)."""
    halves = save_autoencoder(TAESD(latent_channels=16, width=8), tmp_path / "src", "taesd", latent_space="sd3")
    enc, dec = halves / "taesd3_encoder.safetensors", halves / "taesd3_decoder.safetensors"
    out = vaetrain.cli.run("convert", [f"[{enc},{dec}]", str(tmp_path / "out"), "format=taesd"])
    assert sorted(p.name for p in out.iterdir()) == ["taesd3_decoder.safetensors", "taesd3_encoder.safetensors"]
