"""Exports that the real tools load (issue 11, section 4), checked with the readers pip provides.

diffusers is the oracle for the diffusers format (``from_pretrained``, ``Class(**config).config``), for original
single files (``from_single_file(..., config=...)`` and its LDM converter ``convert_ldm_vae_checkpoint``, which also
stands in for ComfyUI's/A1111's fixed-architecture builders: they build the SD widths and load the file into them);
ComfyUI's TAESD naming is checked with its ``vae_list`` rule, the taesd.py layout with the published TAEF2 files.
"""

import inspect
import json
import os
import stat

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from vaetrain.cli import main, run
from vaetrain.commands.audit_fp16 import audit_fp16
from vaetrain.commands import push as push_mod
from vaetrain.commands.latent_stats import latent_stats
from vaetrain.formats import ExportInfo, ExportWarning, build, describe, load_autoencoder, save_autoencoder
from vaetrain.formats.compat import kl_loader_problems
from vaetrain.formats.diffusers_config import SCHEMAS
from vaetrain.formats.io import CheckpointError, read_state_dict
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.interposer import LatentInterposer
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD
from vaetrain.models.vae_approx import VAEApprox

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402  (test oracle)

SAFE_AUDIT = {"256": {"finite": True, "max_abs": 900.0}, "512": {"finite": True, "max_abs": 2100.0}}
UNSAFE_AUDIT = {"256": {"finite": True, "max_abs": 900.0}, "1024": {"finite": False, "max_abs": float("inf")}}


def _kl(**kw):
    args = dict(latent_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, scaling_factor=0.18215)
    torch.manual_seed(0)
    ae = AutoencoderKL(**{**args, **kw})
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ae.eval()


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _diffusers_reads_config_back(folder, cls):
    """diffusers' own schema: every key written is one of ``cls``'s and ``cls(**config).config`` keeps its value."""
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == cls.__name__
    assert cfg["_diffusers_version"] == diffusers.__version__
    public = {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert set(public) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    rebuilt = cls(**public).config
    for k, v in public.items():
        assert _norm(rebuilt[k]) == _norm(v), k
    return cfg


# --- diffusers: config from the schema -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_diffusers_signature(name):
    params = inspect.signature(getattr(diffusers, name).__init__).parameters
    assert list(SCHEMAS[name]) == [p for p in params if p != "self"]
    for key, default in SCHEMAS[name].items():
        assert _norm(default) == _norm(params[key].default), key


def test_diffusers_kl_config_fp16_safe_latent_stats(tmp_path):
    ae = _kl()
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.1, 0.9, 1.0, 1.2]
    out = save_autoencoder(ae, tmp_path / "hf", "diffusers", ExportInfo(fp16_audit=SAFE_AUDIT, sample_size=256),
                           latents_mean=mean, latents_std=std, scaling_factor=0.5, shift_factor=0.25)
    cfg = _diffusers_reads_config_back(out, diffusers.AutoencoderKL)
    assert cfg["force_upcast"] is False  # an fp16-safe model must not be upcast by diffusers' SDXL pipeline
    assert cfg["latents_mean"] == mean and cfg["latents_std"] == std
    assert (cfg["scaling_factor"], cfg["shift_factor"], cfg["sample_size"]) == (0.5, 0.25, 256)
    back = diffusers.AutoencoderKL.from_pretrained(out).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x).latent_dist.mean, ae.posterior(x)[0], atol=1e-5, rtol=0)
    meta = json.loads(safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt").metadata()["vaetrain_export"])
    assert meta["fp16_safe"] is True and meta["fp16_audit"]["512"]["max_abs"] == 2100.0

    # unaudited -> diffusers' default (upcast); audited unsafe -> upcast; latent space -> default sample size
    for audit, upcast in ((None, True), (UNSAFE_AUDIT, True)):
        cfg = json.loads((save_autoencoder(ae, tmp_path / f"u{upcast}{audit is None}", "diffusers",
                                           fp16_audit=audit) / "config.json").read_text())
        assert cfg["force_upcast"] is upcast and cfg["latents_mean"] is None and cfg["sample_size"] == 512


def test_diffusers_flux2_and_tiny_configs(tmp_path):
    flux2 = _kl(latent_channels=8, flux2=True, scaling_factor=1.0)
    _diffusers_reads_config_back(save_autoencoder(flux2, tmp_path / "f2", "diffusers"), diffusers.AutoencoderKLFlux2)
    tiny = TAESD(latent_channels=4, width=16)
    out = save_autoencoder(tiny, tmp_path / "tiny", "diffusers", fp16_audit={"safe": True})
    assert _diffusers_reads_config_back(out, diffusers.AutoencoderTiny)["force_upcast"] is False
    out = save_autoencoder(tiny, tmp_path / "tiny2", "diffusers", fp16_audit={"safe": False})
    assert json.loads((out / "config.json").read_text())["force_upcast"] is True


def test_fp16_audit_and_latent_stats_from_the_real_commands(tmp_path):
    """What ``vaetrain audit-fp16 out=`` and ``vaetrain latent-stats out=`` write feeds ``vaetrain convert``."""
    src = save_autoencoder(_kl(), tmp_path / "m.safetensors", "original")
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "imgs" / f"img{i}.png")
    audit_fp16(str(src), size=32, limit=1, out=str(tmp_path / "audit.json"), quiet=True)
    stats = latent_stats(str(src), tmp_path / "imgs", size=32, out=str(tmp_path / "stats.json"), quiet=True)
    run("convert", [str(src), str(tmp_path / "hf"), f"fp16_audit={tmp_path / 'audit.json'}",
                    f"latent_stats={tmp_path / 'stats.json'}", "latent_convention=shift_and_scale"])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert cfg["force_upcast"] is (not audit["safe"])
    assert cfg["latents_mean"] == pytest.approx(stats["per_channel_mean"])
    assert cfg["scaling_factor"] == pytest.approx(stats["suggested"]["shift_and_scale"]["scaling_factor"])
    with pytest.raises(SystemExit, match=r"latents_mean has 4 values but the model has 16"):
        main(["convert", str(save_autoencoder(_kl(latent_channels=16), tmp_path / "m16.safetensors", "original")),
              str(tmp_path / "x"), f"latent_stats={tmp_path / 'stats.json'}"])


# --- original: what ComfyUI / A1111 can build -----------------------------------------------------------------
SD_CONFIG = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4)


def _fixed_builder_loads(ae) -> bool:
    """What ComfyUI/A1111 do with an original file: build the SD widths, convert the LDM keys, load strictly."""
    target = diffusers.AutoencoderKL(**SD_CONFIG)
    try:
        missing, unexpected = target.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), SD_CONFIG),
                                                     strict=False)
    except RuntimeError:  # size mismatch
        return False
    return not missing and not unexpected


def test_loader_check_agrees_with_a_fixed_architecture_builder():
    standard = AutoencoderKL(latent_channels=4)  # SD1/SDXL widths
    assert kl_loader_problems(standard) == {} and _fixed_builder_loads(standard)
    for bad in (AutoencoderKL(latent_channels=4, base_channels=64),  # narrower: size mismatch
                AutoencoderKL(latent_channels=4, encoder_attention=False, decoder_attention=False)):  # no attention
        problems = kl_loader_problems(bad)
        assert set(problems) == {"ComfyUI", "A1111"} and not _fixed_builder_loads(bad)
    assert "midblock attention" in kl_loader_problems(AutoencoderKL(decoder_attention=False))["ComfyUI"]
    sd3 = kl_loader_problems(AutoencoderKL(latent_channels=16, use_quant_conv=False))
    assert sd3 == {}
    assert set(kl_loader_problems(AutoencoderKL(latent_channels=32, use_quant_conv=False, flux2=True))) == {"A1111"}


@pytest.mark.parametrize("kw", [{}, dict(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305,
                                           shift_factor=0.0609)], ids=["sd1-like", "sd3-like"])
def test_original_export_warns_records_and_loads_with_from_single_file(tmp_path, kw):
    ae = _kl(**kw)
    hf = save_autoencoder(ae, tmp_path / "hf", "diffusers")
    with pytest.warns(ExportWarning) as caught:
        f = save_autoencoder(ae, tmp_path / "vae.safetensors", "original", dtype="fp16")
    (line,) = [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]
    assert "\n" not in line and "ComfyUI" in line and "A1111" in line and "format=diffusers" in line
    meta = json.loads(safe_open(str(f), "pt").metadata()["vaetrain_export"])
    assert set(meta["loaders"]) == {"ComfyUI", "A1111"} and meta["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in read_state_dict(f).values())
    # the real single-file reader, given the diffusers config of the same architecture
    single = diffusers.AutoencoderKL.from_single_file(str(f), config=str(hf), torch_dtype=torch.float32).eval()
    converted = convert_ldm_vae_checkpoint(read_state_dict(f), single.config)
    assert set(converted) == set(single.state_dict())  # 0 missing, 0 unexpected
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = ae.half().float()  # the fp16 export holds the fp16-rounded weights
        torch.testing.assert_close(single.encode(x).latent_dist.mean, ref.posterior(x)[0], atol=1e-5, rtol=0)
        z = torch.randn(1, ae.latent_channels, 16, 16)
        torch.testing.assert_close(single.decode(z).sample, ref.decode_raw(z), atol=1e-5, rtol=0)


# --- taesd: ComfyUI names, the published layout, fp16 -----------------------------------------------------------
def comfyui_vae_list(files):
    """ComfyUI nodes.py VAELoader.vae_list: a TAESD is offered when <name>_encoder.* and <name>_decoder.* exist."""
    image_taes = ["taesd", "taesdxl", "taesd3", "taef1", "taef2", "taeqi2_1"]
    enc, dec = set(), set()
    for v in files:
        parts = v.rsplit("_", 1)
        if len(parts) == 2 and parts[0] in image_taes:
            (enc if parts[1].startswith("encoder.") else dec if parts[1].startswith("decoder.") else set()).add(parts[0])
    return sorted(enc & dec)


@pytest.mark.parametrize("channels,info,name", [(4, dict(latent_space="sdxl"), "taesdxl"),
                                                (4, dict(latent_space="sd1"), "taesd"),
                                                (16, dict(latent_space="flux1"), "taef1"),
                                                (16, dict(taesd_prefix="taesd3"), "taesd3"),
                                                (32, dict(), "taef2")])
def test_taesd_names_comfyui_recognises(tmp_path, channels, info, name):
    ae = TAESD(latent_channels=channels, flux_2=channels == 32)
    out = save_autoencoder(ae, tmp_path / "original", "taesd", **info)  # the training export's folder name
    assert comfyui_vae_list(os.listdir(out)) == [name]
    meta = json.loads(safe_open(str(out / f"{name}_decoder.safetensors"), "pt").metadata()["vaetrain_export"])
    assert meta["loaders"] == "ComfyUI and A1111 can load it"


def test_taesd_name_from_the_teacher_preset_and_file_names(tmp_path):
    ae = TAESD(latent_channels=4, width=8)
    ae.latent_space = "sdxl"  # what a taesdxl preset / taesdxl_*.pth file names / the training teacher give
    out = save_autoencoder(ae, tmp_path / "a", "taesd")
    again = load_autoencoder(out)  # the names survive a conversion
    assert again.latent_space == "sdxl"
    assert comfyui_vae_list(os.listdir(save_autoencoder(again, tmp_path / "b", "taesd"))) == ["taesdxl"]
    with pytest.warns(ExportWarning, match="latent space is not known"):
        save_autoencoder(TAESD(latent_channels=4, width=8), tmp_path / "c", "taesd")
    with pytest.raises(SystemExit, match="taesd_prefix=taef2 names a 32-channel latent space but this TAESD has 4"):
        main(["convert", str(out), str(tmp_path / "d"), "format=taesd", "taesd_prefix=taef2"])


def test_published_taef2_files_round_trip_bit_exact_in_fp16(assets, tmp_path):
    """The taesd.py / ComfyUI layout is the published files' layout: same keys, shapes, values and fp16 dtype."""
    w = assets / "weights"
    src = [w / "taef2_encoder.pth", w / "taef2_decoder.pth"]
    out = run("convert", [f"[{src[0]},{src[1]}]", str(tmp_path / "export"), "format=taesd"])
    assert comfyui_vae_list(os.listdir(out)) == ["taef2"]
    for half in ("encoder", "decoder"):
        ref = torch.load(w / f"taef2_{half}.pth", map_location="cpu", weights_only=True)
        ours = read_state_dict(out / f"taef2_{half}.safetensors")
        assert ours.keys() == ref.keys()
        assert all(ours[k].dtype == ref[k].dtype == torch.float16 and torch.equal(ours[k], ref[k]) for k in ref)
    fp32 = run("convert", [str(out), str(tmp_path / "fp32"), "format=taesd", "dtype=fp32"])
    assert read_state_dict(fp32 / "taef2_decoder.safetensors")["1.weight"].dtype == torch.float32


def _published_layout_decoder(latent_channels):
    """madebyollin's published 8x decoder as an nn.Sequential (Clamp, conv, ReLU, 3x[3 Blocks, Upsample, conv], Block,
    conv), written from its documented layout: the key names and shapes a taesd.py/ComfyUI loader expects."""
    class Block(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))
            self.skip, self.fuse = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    layers = [Clamp(), nn.Conv2d(latent_channels, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [Block(64), Block(64), Block(64), nn.Upsample(scale_factor=2), nn.Conv2d(64, 64, 3, padding=1, bias=False)]
    return nn.Sequential(*layers, Block(64), nn.Conv2d(64, 3, 3, padding=1))


def test_taesd_decoder_loads_strictly_into_the_published_layout(tmp_path):
    ae = TAESD(latent_channels=4)
    out = save_autoencoder(ae, tmp_path / "t", "taesd", latent_space="sd1")
    ref = _published_layout_decoder(4)
    ref.load_state_dict(read_state_dict(out / "taesd_decoder.safetensors"), strict=True)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ref(z).clamp(0, 1) * 2 - 1, ae.decode(z).clamp(-1, 1), atol=1e-5, rtol=0)


# --- files honour the umask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_export_file_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_autoencoder(_kl(), tmp_path / "hf", "diffusers", command="vaetrain train", metrics={"psnr": 20.0})
        save_autoencoder(_kl(), tmp_path / "o.safetensors", "original")
        save_autoencoder(TAESD(4, width=8), tmp_path / "t", "taesd")
        save_autoencoder(TAESD(4, width=8), tmp_path / "td", "diffusers")
        save_autoencoder(LatentInterposer(4, 4, width=8, blocks=1), tmp_path / "i", "safetensors")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 9 and (tmp_path / "hf" / "README.md") in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


# --- vaetrain checkpoints: describe / build, .ckpt -> convert / eval -----------------------------------------------
MODELS = [lambda: _kl(), lambda: _kl(flux2=True, latent_channels=8, scaling_factor=1.0),
          lambda: TAESD(latent_channels=32, width=8, flux_2=True, encoder=False),
          lambda: MLPAutoencoder(upsampler_width=8), lambda: VAEApprox("sd3", True),
          lambda: LatentInterposer(4, 16, width=8, blocks=1, scale=2.0), lambda: NLayerDiscriminator(ndf=8, n_layers=2)]


@pytest.mark.parametrize("make", MODELS)
def test_describe_build_round_trip_through_weights_only_pickle(tmp_path, make):
    model = make()
    torch.save({"d": describe(model)}, tmp_path / "d.pt")
    again = build(torch.load(tmp_path / "d.pt", weights_only=True)["d"])
    assert type(again) is type(model) and again.params == model.params
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_refuses_other_classes():
    with pytest.raises(CheckpointError, match="not a vaetrain model class"):
        build({"class": "os.system", "params": {}})
    with pytest.raises(CheckpointError, match="cannot build TAESD"):
        build({"class": "vaetrain.models.taesd.TAESD", "params": {"latent_channels": 4, "nope": 1}})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run("train", ["experiment=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2",
                           "callbacks.checkpoint.every_n_steps=2", f"run_dir={run_dir}"])
    return run_dir, result


def test_ckpt_converts_ema_by_default_or_student(tiny_run, tmp_path):
    run_dir, result = tiny_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["vaetrain"]["student"]["class"] == "vaetrain.models.autoencoder_kl.AutoencoderKL"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for weights, prefix in ((None, "ema.module."), ("student", "student.")):
        extra = [f"weights={weights}"] if weights else []
        out = run("convert", [str(ckpt), str(tmp_path / f"hf_{weights}"), "format=diffusers", *extra])
        dvae = diffusers.AutoencoderKL.from_pretrained(out).eval()
        own = build(state["vaetrain"]["student"])
        own.load_state_dict({k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)})
        with torch.no_grad():
            torch.testing.assert_close(dvae.encode(x).latent_dist.mean, own.eval().posterior(x)[0], atol=1e-5, rtol=0)
    assert not torch.equal(state["state_dict"]["ema.module.decoder.conv_out.weight"],
                           state["state_dict"]["student.decoder.conv_out.weight"])
    # the run's own export is the same EMA weights
    exported = load_autoencoder(result["exports"]["original"])
    ema = load_autoencoder(str(ckpt))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_eval_reads_a_ckpt(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    (tmp_path / "imgs").mkdir()
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "imgs" / "a.png")
    summary = run("eval", [f"model.source={run_dir / 'checkpoints' / 'last.ckpt'}", f"folder={tmp_path / 'imgs'}",
                           "size=32", "lpips=null", "grid=0", "+model.weights=student"])
    assert summary["images"] == 1 and summary["student_vs_real"]["psnr"] > 0


def test_old_ckpt_without_description_uses_the_run_config(tmp_path):
    ae = TAESD(latent_channels=4, width=8)
    sd = {f"student.{k}": v for k, v in ae.state_dict().items()}
    config = {"student": {"_target_": "vaetrain.models.taesd.TAESD", **ae.config()}}
    torch.save({"state_dict": sd, "vaetrain": {"config": config, "mode": "autoencode"}}, tmp_path / "old.ckpt")
    again = load_autoencoder(tmp_path / "old.ckpt")
    assert isinstance(again, TAESD) and all(torch.equal(again.state_dict()[k], v) for k, v in ae.state_dict().items())
    with pytest.raises(CheckpointError, match="without ema weights"):
        load_autoencoder(tmp_path / "old.ckpt", weights="ema")


# --- push -----------------------------------------------------------------------------------------------------
class FakeApi:
    calls = []

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))
        files = sorted(p for p in os.listdir(kw["folder_path"]) if any(p == pat for pat in kw["allow_patterns"]))
        FakeApi.calls.append(("files", files))
        return "https://hub.example/commit/1"


def test_push_writes_the_card_and_uploads_the_export(tiny_run, monkeypatch):
    run_dir, result = tiny_run
    FakeApi.calls = []
    monkeypatch.setattr(push_mod, "HfApi", FakeApi)
    out = run("push", [result["exports"]["diffusers"], "me/tiny-vae", "command='vaetrain train experiment=tiny'"])
    (_, repo, kw), (_, up), (_, files) = FakeApi.calls
    assert repo == "me/tiny-vae" and kw["exist_ok"] and up["repo_id"] == "me/tiny-vae"
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"] == out["files"]
    card = (run_dir / "export" / "diffusers" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    assert "AutoencoderKL.from_pretrained(\"me/tiny-vae\")" in card and "vaetrain train experiment=tiny" in card
    assert '"max_steps": 2' in card  # the run's resolved config
    assert f"| validation: val/psnr_gt | {result['val']['val/psnr_gt']:.4g} |" in card  # the run's measured metrics
    # a single-file export: the file and its card
    FakeApi.calls = []
    run("push", [result["exports"]["original"], "me/tiny-vae-original"])
    assert FakeApi.calls[-1] == ("files", ["README.md", "original.safetensors"])
    assert "Compatibility" in (run_dir / "export" / "README.md").read_text()


def test_push_failure_is_one_line(tiny_run, monkeypatch):
    class Refusing(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise RuntimeError("401 Client Error: Unauthorized\nInvalid token")

    monkeypatch.setattr(push_mod, "HfApi", Refusing)
    with pytest.raises(SystemExit) as e:
        main(["push", tiny_run[1]["exports"]["diffusers"], "me/x"])
    assert "\n" not in str(e.value) and "huggingface-cli login" in str(e.value)
