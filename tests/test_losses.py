"""Loss terms and the GAN: values against closed forms, and where gradients may and may not go."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaetrain.formats.io import CheckpointError
from vaetrain.losses import (KL, L1, LPIPS, MSE, ActivationPenalty, Adversarial, LatentMSE, LossInputs,
                             adaptive_weight, frozen)
from vaetrain.models.patchgan import NLayerDiscriminator

ROOT = Path(__file__).resolve().parents[1]


def images(b=2, s=32):
    return torch.rand(b, 3, s, s) * 2 - 1


def inputs(**kw) -> LossInputs:
    base = dict(real=None, target=None, recon=None)
    base.update(kw)
    return LossInputs(**base)


# --- pixel and latent terms ----------------------------------------------------------------------

def test_pixel_terms_zero_on_identical_and_match_formula():
    real, target = images(), images()
    recon = target.clone()
    assert MSE()(inputs(real=real, target=target, recon=recon)) == 0
    assert L1()(inputs(real=real, target=target, recon=recon)) == 0
    assert torch.allclose(MSE(target="real")(inputs(real=real, target=target, recon=recon)), (recon - real).pow(2).mean())
    assert torch.allclose(L1(target="real")(inputs(real=real, target=target, recon=recon)), (recon - real).abs().mean())


def test_pixel_term_errors_are_one_line():
    with pytest.raises(ValueError, match="target='bogus'"):
        MSE(target="bogus")
    with pytest.raises(ValueError, match="LossInputs.real is None"):
        L1(target="real")(inputs(target=images(), recon=images()))
    with pytest.raises(ValueError, match="differ in shape"):
        MSE()(inputs(target=images(s=32), recon=images(s=16)))


def test_kl_matches_closed_form_and_distributions():
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6) * 0.5
    got = KL(reduction="sum")(inputs(mean=mean, logvar=logvar))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    want = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(got, want, rtol=1e-5)
    # the default divides by the image's element count (3 H W), read off the student's image
    per_pixel = KL()(inputs(mean=mean, logvar=logvar, recon=torch.zeros(3, 3, 40, 48)))
    assert torch.allclose(per_pixel, want / (3 * 40 * 48), rtol=1e-5)
    assert KL()(inputs(mean=torch.zeros(2, 4, 3, 3), logvar=torch.zeros(2, 4, 3, 3), recon=torch.zeros(2, 3, 24, 24))) == 0
    with pytest.raises(ValueError, match="reduction"):
        KL(reduction="mean")


@pytest.mark.parametrize("size", [32, 256])
def test_kl_weight_pulls_as_hard_as_in_latent_diffusion(size):
    """A kl weight copied from latent-diffusion means the same: the ratio of the KL gradient to the pixel term's
    gradient on the posterior mean equals LPIPSWithDiscriminator's (contperceptual.py: nll = |x - rec| / exp(0) + 0
    summed over C,H,W / B, kl = posterior.kl() summed over C,h,w / B, loss = nll + kl_weight * kl)."""
    torch.manual_seed(0)
    b, kl_weight = 2, 1e-6
    mean = torch.randn(b, 4, size // 8, size // 8, requires_grad=True)
    logvar = torch.randn(b, 4, size // 8, size // 8) * 0.3 - 2
    mix = torch.randn(3, 4)
    x = torch.rand(b, 3, size, size) * 2 - 1

    def decode(z):  # a fixed linear "decoder", so the pixel term depends on the mean
        return F.interpolate(torch.einsum("oc,bchw->bohw", mix, z), scale_factor=8, mode="nearest")

    def grad(loss):
        return torch.autograd.grad(loss, mean, retain_graph=True)[0].norm()

    recon = decode(mean)
    ldm_nll = (x - recon).abs().sum() / b
    ldm_kl = (0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)).sum() / b
    ldm_ratio = grad(kl_weight * ldm_kl) / grad(ldm_nll)
    inp = inputs(real=x, target=x, recon=recon, mean=mean, logvar=logvar)
    ours = grad(KL(weight=kl_weight).weight * KL()(inp)) / grad(L1(target="real")(inp))
    assert 0.5 < float(ours / ldm_ratio) < 2.0
    # latent-diffusion's raw sum next to a mean pixel term is 3*H*W times stronger: what this replaced
    raw = grad(kl_weight * KL(reduction="sum")(inp)) / grad(L1(target="real")(inp))
    assert float(raw / ldm_ratio) == pytest.approx(3 * size * size, rel=1e-3)


def test_latent_mse():
    z = torch.randn(2, 4, 4, 4)
    assert LatentMSE()(inputs(z_pred=z, z_target=z.clone())) == 0
    z2 = z + 0.5
    assert torch.allclose(LatentMSE()(inputs(z_pred=z2, z_target=z)), torch.tensor(0.25))


# --- LPIPS ---------------------------------------------------------------------------------------

def test_lpips_random_gradient_reaches_student_only():
    term = LPIPS(mode="random", net="squeeze")
    student = nn.Conv2d(3, 3, 3, padding=1)
    target = images()
    recon = student(target)
    loss = term(inputs(target=target, recon=recon))
    assert loss > 0
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in term.parameters())
    assert term(inputs(target=target, recon=target.clone())) == 0


def test_lpips_stays_eval_under_train():
    term = LPIPS(mode="random", net="squeeze").train()
    assert term.training and not term.net.training and not any(m.training for m in term.net.modules())


def test_lpips_matches_lpips_package_forward():
    """Our forward (fp32, one backbone pass, zero-safe normalisation) equals lpips' own within float noise."""
    term = LPIPS(mode="random", net="squeeze")
    x, y = images(), images()
    assert torch.allclose(term.distance(x, y), term.net(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_lpips_zero_features_give_finite_gradient():
    """A constant image makes many ReLU feature vectors exactly zero: lpips' own normalisation gives NaN grads there."""
    term = LPIPS(mode="random", net="squeeze")
    x = torch.full((1, 3, 32, 32), -1.0, requires_grad=True)
    term.distance(x, images(1)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lpips_bf16_autocast_runs_in_fp32():
    term = LPIPS(mode="random", net="squeeze")
    x, y = images(), images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = term.distance(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert torch.allclose(d, term.distance(x.bfloat16().float(), y.bfloat16().float()))


def test_lpips_local_lins_and_backbone(tmp_path):
    """Local backbone (torchvision layout, whole model) and local linear weights, strictly checked."""
    import torchvision
    from safetensors.torch import save_file

    tv = torchvision.models.squeezenet1_1()
    torch.save(tv.state_dict(), tmp_path / "sq.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 384, 384, 512, 512])}
    save_file(lins, tmp_path / "lins.safetensors")
    term = LPIPS(net="squeeze", pretrained=False, backbone_weights=str(tmp_path / "sq.pth"),
                 lpips_weights=str(tmp_path / "lins.safetensors"))
    assert torch.equal(getattr(term.net.net.slice2, "3").squeeze.weight, tv.features[3].squeeze.weight)
    assert torch.equal(getattr(term.net.net.slice7, "12").expand3x3.weight, tv.features[12].expand3x3.weight)
    assert torch.equal(term.net.lin6.model[1].weight, lins["lin6.model.1.weight"])
    x, y = images(), images()
    assert torch.allclose(term.distance(x, y), term.net(x, y).flatten(), rtol=1e-4, atol=1e-6)
    with pytest.raises(CheckpointError, match="not a torchvision alex backbone"):
        LPIPS(net="alex", pretrained=False, backbone_weights=str(tmp_path / "sq.pth"),
              lpips_weights=str(tmp_path / "lins.safetensors"))
    with pytest.raises(ValueError, match="mode='random'"):
        LPIPS(net="squeeze", pretrained=False, backbone_weights=str(tmp_path / "sq.pth"))


def test_lpips_pretrained_uses_bundled_official_lins(tmp_path):
    import lpips
    import torchvision

    torch.save(torchvision.models.squeezenet1_1().features.state_dict(), tmp_path / "features.pth")  # features only
    term = LPIPS(net="squeeze", pretrained=True, backbone_weights=str(tmp_path / "features.pth"))
    official = torch.load(Path(lpips.__file__).parent / "weights/v0.1/squeeze.pth", map_location="cpu",
                          weights_only=True)
    assert term.mode_name == "LPIPS(squeeze, v0.1)"
    assert all(torch.equal(term.net.state_dict()[k], v) for k, v in official.items())


def test_lpips_caffe_squeeze_is_a_real_perceptual_distance(assets):
    term = LPIPS(mode="caffe_squeeze", net="squeeze",
                 backbone_weights=str(assets / "weights/squeezenet1_1_caffe_features.pth"))
    assert "LPIPS-like" in term.mode_name and "Caffe" in term.mode_name
    from PIL import Image
    import numpy as np

    img = Image.open(sorted((assets / "images/eval/kodak24").glob("*.png"))[0]).convert("RGB").resize((64, 64))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 64, 64)
    blur = F.avg_pool2d(x, 3, 1, 1)
    noise = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    shifted = (x + 0.05).clamp(-1, 1)
    d = {k: float(term.distance(x, v)) for k, v in dict(blur=blur, noise=noise, shifted=shifted, same=x).items()}
    assert d["same"] == 0
    # a real perceptual net ranks heavy noise far above a slight brightness shift; a random one often does not
    assert d["noise"] > d["blur"] > d["shifted"] > 0


# --- activation penalty --------------------------------------------------------------------------

def test_activation_penalty_hinge_and_hooks():
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        student[0].weight.fill_(10.0)
        student[0].bias.zero_()
    term = ActivationPenalty(patterns=["0"], threshold=5.0)
    assert term.attach(student) == ["0"]
    x = torch.ones(1, 3, 2, 2)
    student(x)  # conv0 outputs 30 everywhere -> (30/5 - 1)^2 = 25
    loss = term(inputs())
    assert torch.allclose(loss, torch.tensor(25.0))
    assert term.maxima["0"] == 30.0
    loss.backward()
    assert student[0].weight.grad.abs().sum() > 0 and student[2].weight.grad is None
    assert term(inputs()) == 0  # consumed
    with torch.no_grad():
        student(x)
    assert term(inputs()) == 0  # no-grad passes are not collected
    ema = copy.deepcopy(student)
    ema(x)  # an EMA copy carries the hook but must not count
    assert term(inputs()) == 0
    small = ActivationPenalty(patterns=["0"], threshold=100.0)
    small.attach(student)
    student(x)
    assert small(inputs()) == 0  # below threshold
    logmax = ActivationPenalty(patterns=["0"], threshold=3.0, mode="logmax")
    logmax.attach(student)
    student(x)
    assert torch.allclose(logmax(inputs()), torch.log(torch.tensor(10.0)))
    with pytest.raises(ValueError, match="no module of Sequential matches"):
        ActivationPenalty(patterns=["decoder.*"]).attach(student)


# --- discriminator and adversarial ---------------------------------------------------------------

def test_patchgan_layout_and_init():
    d = NLayerDiscriminator()  # taming defaults
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and convs[-1].out_channels == 1
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert abs(convs[2].weight.std().item() - 0.02) < 0.002
    # taming NLayerDiscriminator(3, 64, 3): biasless convs before BatchNorm, biased first and last conv
    by_hand = (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 2 * (128 + 256 + 512) + 512 * 16 + 1
    assert sum(p.numel() for p in d.parameters()) == by_hand
    assert set(d.state_dict()) >= {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.bias"}
    small = NLayerDiscriminator(ndf=8, n_layers=2, norm="none")
    assert small(images(2, 32)).shape == (2, 1, 6, 6)


def test_patchgan_conditional():
    d = NLayerDiscriminator(cond_channels=4, ndf=8, n_layers=2, norm="group")
    assert d.main[0].in_channels == 7
    z = torch.randn(2, 4, 4, 4)
    assert d(images(2, 32), z).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="without a latent"):
        d(images(2, 32))
    with pytest.raises(ValueError, match="latent has 16 channels"):
        d(images(2, 32), torch.randn(2, 16, 4, 4))


def small_gan(**kw) -> Adversarial:
    return Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), **kw)


class _FixedD(nn.Module):
    """A 'discriminator' returning given logits, to check the loss formulas exactly."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, :1] * self.scale


@pytest.mark.parametrize("kind", ["hinge", "non_saturating", "lsgan"])
def test_gan_formulas(kind):
    adv = Adversarial(_FixedD(), loss=kind)
    r = torch.tensor([0.5, -2.0, 3.0]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    f = torch.tensor([1.5, -0.5, 0.2]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    lr, lf = r[:, 0].flatten(), f[:, 0].flatten()
    d, stats = adv.d_loss(inputs(real=r, recon=f))
    g = adv.g_loss(inputs(recon=f))
    if kind == "hinge":
        want_d = 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf).mean())
        want_g = -lf.mean()
    elif kind == "non_saturating":
        want_d = 0.5 * (-F.logsigmoid(lr).mean() - F.logsigmoid(-lf).mean())
        want_g = -F.logsigmoid(lf).mean()
    else:
        want_d = 0.5 * ((lr - 1).pow(2).mean() + lf.pow(2).mean())
        want_g = (lf - 1).pow(2).mean()
    assert torch.allclose(d, want_d) and torch.allclose(g, want_g)
    assert torch.allclose(stats["logits_real"], lr.mean()) and torch.allclose(stats["logits_fake"], lf.mean())


def test_d_loss_does_not_touch_generator():
    adv = small_gan()
    gen = nn.Conv2d(3, 3, 3, padding=1)
    real = images()
    recon = gen(real)
    loss, _ = adv.d_loss(inputs(real=real, recon=recon))
    loss.backward()
    assert gen.weight.grad is None
    # every D parameter is in the graph (the last bias's hinge gradient is exactly 0.5 * (-1 + 1) inside the margin)
    assert all(p.grad is not None for p in adv.discriminator.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in adv.discriminator.named_parameters() if n.endswith("weight"))


def test_g_loss_reaches_generator_but_never_discriminator():
    adv = small_gan()
    gen = nn.Conv2d(3, 3, 3, padding=1)
    recon = gen(images())
    g = adv.g_loss(inputs(recon=recon))
    assert all(p.requires_grad for p in adv.discriminator.parameters())  # restored after the call
    g.backward()
    assert gen.weight.grad is not None and gen.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.discriminator.parameters())


def test_frozen_restores_flags_on_error():
    m = nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(m):
            assert not m.weight.requires_grad
            raise RuntimeError("boom")
    assert m.weight.requires_grad and not m.bias.requires_grad


def test_conditional_gan_uses_latent_and_detaches_it():
    adv = Adversarial(NLayerDiscriminator(cond_channels=4, ndf=8, n_layers=2, norm="none"), conditional=True)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    recon = images().requires_grad_()
    d, _ = adv.d_loss(inputs(real=images(), recon=recon, cond=z))
    d.backward()
    assert z.grad is None and recon.grad is None
    g = adv.g_loss(inputs(recon=recon, cond=z))
    g_other = adv.g_loss(inputs(recon=recon, cond=torch.randn(2, 4, 4, 4)))
    assert not torch.allclose(g, g_other)  # the latent matters
    with pytest.raises(ValueError, match="LossInputs.cond is None"):
        adv.g_loss(inputs(recon=recon))
    with pytest.raises(ValueError, match="cond_channels"):
        Adversarial(NLayerDiscriminator(cond_channels=4, ndf=8, n_layers=2), conditional=False)


def test_adaptive_weight_by_hand():
    last = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    rec = (x @ last.t()).pow(2).mean()
    g = -(x @ last.t()).mean() * 3
    grad_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    want = grad_rec.norm() / (grad_g.norm() + 1e-4)
    got = adaptive_weight(rec, g, last)
    assert torch.allclose(got, want) and not got.requires_grad
    assert adaptive_weight(rec, g * 1e-12, last, max_weight=10.0) == 10.0  # clamped
    adv = small_gan(weight=0.5, start_step=100)
    assert adv.g_weight(rec, g, last, step=99) == 0 and not adv.active(99)
    assert torch.allclose(adv.g_weight(rec, g, last, step=100), 0.5 * want) and adv.active(100)
    assert small_gan(weight=0.5, adaptive=False).g_weight(rec, g, last, step=0) == 0.5


def test_adaptive_weight_with_real_decoder_last_layer():
    """The G loss runs through D (frozen) into the student's last layer; the weight is finite and positive."""
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    adv = small_gan()
    target = images()
    recon = student(target)
    rec = F.mse_loss(recon, target * 0.5)
    g = adv.g_loss(inputs(recon=recon))
    w = adv.g_weight(rec, g, student[2].weight, step=0)
    assert torch.isfinite(w) and w > 0
    (rec + w * g).backward()
    assert all(p.grad is None for p in adv.discriminator.parameters())


def test_loss_configs_instantiate(monkeypatch, tmp_path):
    """Every conf/loss and conf/discriminator file builds (the hub-needing official LPIPS is built offline)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("assets"):
        from vaetrain.cli import assets_dir

        OmegaConf.register_new_resolver("assets", lambda p="": str(Path(assets_dir()) / p))
    built = {}
    for f in sorted((ROOT / "vaetrain/conf/loss").glob("*.yaml")) + sorted((ROOT / "vaetrain/conf/discriminator").glob("*.yaml")):
        cfg = OmegaConf.load(f)
        if f.stem == "lpips":
            continue  # needs torchvision's ImageNet AlexNet (download); covered by the error-message test below
        if f.stem == "lpips_caffe_squeeze" and not Path(OmegaConf.to_container(cfg, resolve=True)["backbone_weights"]).exists():
            continue
        built[f.stem] = instantiate(cfg, _convert_="all")
    assert isinstance(built["mse"], MSE) and built["kl"].weight == 1e-6
    assert isinstance(built["patchgan"], Adversarial) and built["patchgan_cond"].conditional
    assert built["patchgan_cond"].discriminator.cond_channels == 4


def test_official_lpips_offline_error_is_clear(monkeypatch):
    import torchvision

    def no_download(*a, **k):
        raise RuntimeError("offline: no download")

    monkeypatch.setattr(torchvision.models, "alexnet", no_download)
    with pytest.raises(ValueError, match="pass backbone_weights=PATH"):
        LPIPS(net="alex", pretrained=True)


def test_gan_and_adaptive_weight_under_bf16_autocast():
    student = nn.Conv2d(3, 3, 3, padding=1)
    adv = small_gan()
    target = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = student(target)
        rec = F.mse_loss(recon.float(), target)
        g = adv.g_loss(inputs(recon=recon))
        w = adv.g_weight(rec, g, student.weight, step=0)
        d, stats = adv.d_loss(inputs(real=target, recon=recon))
    assert g.dtype == d.dtype == w.dtype == torch.float32
    assert all(torch.isfinite(t) for t in (g, d, w, stats["logits_real"]))
