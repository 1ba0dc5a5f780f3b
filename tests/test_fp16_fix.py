"""fp16-fix (issue 12, section 1): the exact rescaling, the command, the multi-size audit and what exports record.

The rescaling must leave the fp32 output unchanged to within the norms' eps (bit for bit with eps = 0), on the SD
layout (4 channels, quant convs, midblock attention), the FLUX layout (16 channels, no quant convs), FLUX.2's inner
quant convs and a briefly trained model; the factors it picks must bring every reachable activation under the
headroom so that an emulated fp16 pass is finite.
"""

import importlib.util
import json
import math

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from vaetrain.cli import main
from vaetrain.commands.audit_fp16 import FP16_MAX, activation_stats, audit_fp16
from vaetrain.commands.fp16_fix import _stats
from vaetrain.formats import load_autoencoder, save_autoencoder
from vaetrain.formats.export import EXPORT_KEY
from vaetrain.formats.fp16_rescale import apply, choose, sites
from vaetrain.models.autoencoder_kl import AutoencoderKL

LAYOUTS = {
    "sd": dict(latent_channels=4, use_quant_conv=True),
    "flux": dict(latent_channels=16, use_quant_conv=False),
    "flux2": dict(latent_channels=8, flux2=True),
}


def _kl(layout="sd", **kw) -> AutoencoderKL:
    args = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, encoder_attention=True,
                decoder_attention=True, scaling_factor=0.5, **LAYOUTS[layout])
    args.update(kw)
    return AutoencoderKL(**args).eval()


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _teacher(ae: AutoencoderKL, size=32) -> AutoencoderKL:
    """``ae`` made to overflow fp16 in its residual streams, attention and block interiors (the demo script)."""
    spec = importlib.util.spec_from_file_location("make_overflow_teacher", ROOT / "scripts/make_overflow_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = mod.calibration_images(2, size)
    mod.inflate_resnets(ae, x, ["decoder.up.*.block.*", "encoder.mid.block_*"], target=2e5)
    mod.inflate_streams(ae, x, ["decoder.stream.*", "encoder.stream.*", "*.attn_1.v"], target=2e5)
    return ae


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_power_of_two_factors_are_exact_without_eps(layout):
    """The algebra of every edge: with the norms' eps at 0 any factors give the same output (to fp32 rounding)."""
    ae = _kl(layout)
    for m in ae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 0.0
    plan = sites(ae)
    g = torch.Generator().manual_seed(1)
    for s in plan.sites.values():
        s.exp = int(torch.randint(-8, 9, (1,), generator=g))
    x = _images()
    with torch.no_grad():
        y0 = ae(x)
        y1 = apply(ae, plan)(x)
    assert _rel(y1, y0) < 1e-6
    assert {s.kind for s in plan.sites.values()} >= {"stream", "inner", "attn_norm", "attn_qk", "attn_v"}
    if layout != "flux":  # a quant conv follows encoder.conv_out / precedes decoder.conv_in
        assert "latent" in {s.kind for s in plan.sites.values()}
    assert "decoder.conv_out" in plan.unreachable and "decoder.mid.block_1.norm1" in plan.unreachable


@pytest.mark.parametrize("layout", ["sd", "flux"])
def test_chosen_factors_keep_the_fp32_output_and_fit_the_headroom(layout):
    teacher = _teacher(_kl(layout))
    before = _stats(activation_stats(teacher, None, 32, 2))
    assert max(s.max_abs for s in before.values()) > FP16_MAX
    eps = 1e-6
    plan = choose(sites(teacher), before, headroom=2.0 ** 12, eps_tol=1e-5, norm_eps=eps)
    fixed = apply(_copy(teacher), plan)
    x = _images(seed=3)  # not the calibration images
    with torch.no_grad():
        assert _rel(fixed(x), teacher(x)) < 1e-4
    after = _stats(activation_stats(fixed, None, 32, 2))
    reachable = set(plan.scale_of())
    for name, s in after.items():
        if name in reachable and not name.endswith(".k") and not name.endswith(".q"):
            assert s.max_abs <= 2.0 ** 12, name
            assert s.rms * 1.0 >= 2.0 ** -14 or before[name].rms < 2.0 ** -14, name
    audit = audit_fp16(fixed, size=[32, 64], limit=1, mode="emulate", quiet=True)
    assert audit["safe"] and all(r["finite"] for r in audit["resolutions"].values())
    assert not audit_fp16(teacher, size=32, limit=1, mode="emulate", quiet=True)["fp16_output_finite"]


def _copy(ae):
    twin = AutoencoderKL.from_params(ae.params).eval()
    twin.load_state_dict(ae.state_dict())
    return twin


def test_exact_on_a_briefly_trained_model():
    ae = _kl("sd").train()
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    for step in range(15):
        x = _images(4, 32, seed=step)
        loss = (ae(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = _teacher(ae.eval())
    before = _stats(activation_stats(teacher, None, 32, 2))
    plan = choose(sites(teacher), before, headroom=2.0 ** 12)
    assert any(s.exp < 0 for s in plan.sites.values())
    fixed = apply(_copy(teacher), plan)
    x = _images(seed=7)
    with torch.no_grad():
        assert _rel(fixed(x), teacher(x)) < 1e-4


def test_eps_and_subnormal_guards_limit_the_factor():
    ae = _kl("sd")
    st = _stats(activation_stats(ae, None, 32, 1))
    plan = choose(sites(ae), st, headroom=1e-3, floor=1e-12, eps_tol=1e-5)  # asks for far too much
    limited = [s for s in plan.sites.values() if s.limit]
    assert limited and any("norm eps" in s.limit for s in limited)
    fixed = apply(_copy(ae), plan)
    x = _images()
    with torch.no_grad():
        assert _rel(fixed(x), ae(x)) < 1e-4  # the guard kept it exact
    plan = choose(sites(ae), st, headroom=2e-2, floor=1e-2, eps_tol=1.0)
    assert any("subnormal" in s.limit for s in plan.sites.values())


def test_fp16_fix_command_end_to_end(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    src = save_autoencoder(_teacher(_kl("sd")), tmp_path / "teacher.safetensors", "original")
    main(["fp16-fix", str(src), str(tmp_path / "fixed"), "size=32", "limit=1", "audit_sizes=[32,64]",
          "format=diffusers"])
    report = json.loads((tmp_path / "fixed" / "fp16_fix.json").read_text())
    assert report["max_activation_before"] > FP16_MAX and report["audit"]["safe"]
    assert report["fp32_output_change"]["max_rel_diff"] < 1e-4
    assert any(r["factor"] < 1 for r in report["layers"]) and report["unreachable"]
    cfg = json.loads((tmp_path / "fixed" / "config.json").read_text())
    assert cfg["force_upcast"] is False
    hf = diffusers.AutoencoderKL.from_pretrained(tmp_path / "fixed").eval()
    assert hf.config.force_upcast is False
    teacher, fixed = load_autoencoder(src), load_autoencoder(tmp_path / "fixed")
    x = _images(1)
    with torch.no_grad():
        assert _rel(fixed(x), teacher(x)) < 1e-4
        assert _rel(hf(x).sample, teacher(x)) < 1e-4


def test_multi_size_audit_in_metadata_card_and_force_upcast(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    # the 2048 px audit on a model narrow enough to take seconds
    tiny = AutoencoderKL(latent_channels=4, base_channels=4, channel_mult=(1, 2), num_res_blocks=1, norm_groups=2,
                         encoder_attention=False, decoder_attention=False).eval()
    src = save_autoencoder(tiny, tmp_path / "safe.safetensors", "original")
    audit = audit_fp16(str(src), size=[32, 256, 2048], limit=1, mode="emulate", out=str(tmp_path / "a.json"),
                       quiet=True)
    assert list(audit["resolutions"]) == ["32", "256", "2048"] and audit["safe"]
    assert all(r["headroom"] > 1 and math.isfinite(r["headroom_log2"]) for r in audit["resolutions"].values())
    main(["convert", str(src), str(tmp_path / "hf"), f"fp16_audit={tmp_path / 'a.json'}"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["force_upcast"] is False
    assert diffusers.AutoencoderKL.from_pretrained(tmp_path / "hf").config.force_upcast is False
    with safe_open(str(tmp_path / "hf" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[EXPORT_KEY])
    assert meta["fp16_safe"] is True and set(meta["fp16_audit"]["resolutions"]) == {"32", "256", "2048"}
    main(["push", str(tmp_path / "hf"), "me/x", "dry_run=true"])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| 2048 | finite |" in card

    bad = save_autoencoder(_teacher(_kl("sd")), tmp_path / "bad.safetensors", "original")
    main(["audit-fp16", str(bad), "size=[32,64]", "limit=1", "mode=emulate", f"out={tmp_path / 'b.json'}"])
    main(["convert", str(bad), str(tmp_path / "hf_bad"), f"fp16_audit={tmp_path / 'b.json'}"])
    assert json.loads((tmp_path / "hf_bad" / "config.json").read_text())["force_upcast"] is True
