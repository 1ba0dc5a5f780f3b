"""VAETrainModule: parameter selection, EMA, schedules, teacher isolation, the GAN step discipline,
non-finite skipping, and the logged total. Tiny models (width 8, 32 px) and a few steps."""

import csv
import functools
import math

import lightning as L
import pytest
import torch
from torch import nn

from vaetrain.data import ImageDataModule
from vaetrain.losses import KL, MSE, Adversarial, LossTerm
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.engine.callbacks import DataStats
from vaetrain.engine.ema import EMA
from vaetrain.engine.guards import NonFiniteLossError
from vaetrain.engine.module import VAETrainModule
from vaetrain.engine.params import select_parameters
from vaetrain.engine.schedule import WarmupCosine


def tiny_kl(**kw):
    args = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, encoder_attention=False,
                decoder_attention=False, norm_groups=4)
    args.update(kw)
    return AutoencoderKL(**args)


def tiny_data(n_batches=2, batch_size=2, size=32, seed=0):
    return ImageDataModule(source="synthetic", image_size=size, batch_size=batch_size, num_workers=0,
                           epoch_length=n_batches * batch_size, val_count=2, seed=seed, synthetic_count=64)


def tiny_adv(start_step=0, **kw):
    return Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), loss="hinge", start_step=start_step, **kw)


def fit(module, steps=2, data=None, tmp_path=None, **trainer_kw):
    kw = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    kw.update(trainer_kw)
    trainer = L.Trainer(default_root_dir=str(tmp_path) if tmp_path else None, **kw)
    trainer.fit(module, datamodule=data or tiny_data())
    return trainer


class NaNAt(LossTerm):
    """A term that is NaN on chosen calls (micro-batches; -1: always), to exercise the skip logic."""

    def __init__(self, calls, weight=1.0):
        super().__init__(weight)
        self.calls, self.n = set(calls), 0

    def forward(self, inp):
        v = (inp.recon - inp.target).abs().mean()
        bad = self.n in self.calls or -1 in self.calls
        self.n += 1
        return v * float("nan") if bad else v


# ---------------------------------------------------------------- parameter selection, EMA, schedule

def test_select_parameters_decoder_only_keeps_latent_space_frozen():
    ae = tiny_kl()
    names = select_parameters(ae, trainable=["decoder.*", "post_quant_conv.*"])
    assert names and all(n.startswith(("decoder.", "post_quant_conv.")) for n in names)
    assert not any(p.requires_grad for n, p in ae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    select_parameters(ae, frozen=["encoder.*", "quant_conv.*"])
    assert {n for n, p in ae.named_parameters() if p.requires_grad} == set(names)
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(ae, trainable=["decodr.*"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(ae, frozen=["*"])


def test_decoder_mode_freezes_encoder_by_default_and_keeps_it_in_eval():
    student = tiny_kl(channel_mult=(1, 2), norm_groups=4)
    teacher = tiny_kl()
    m = VAETrainModule(student, teacher=teacher, losses={"mse": MSE()}, mode="decoder", ema_decay=None)
    assert all(n.startswith(("decoder.", "post_quant_conv.")) for n in m.trainable_names)
    m.train()
    assert not student.encoder.training and not student.quant_conv.training and student.decoder.training
    assert not teacher.training


def test_teacher_is_referenced_not_registered():
    teacher = tiny_kl()
    m = VAETrainModule(tiny_kl(), teacher=teacher, losses={"mse": MSE()}, ema_decay=0.9)
    assert m.teacher is teacher
    t_ids = {id(p) for p in teacher.parameters()}
    assert not t_ids & {id(p) for p in m.parameters()}
    assert not any(k.startswith(("_frozen", "teacher")) for k in m.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(k.startswith("ema.module.") for k in m.state_dict())


def test_ema_update_matches_hand_computation():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # n=0: d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, 0.1 * w0 + 0.9 * net.weight)
    prev = ema.module.weight.clone()
    ema.update(net)  # n=1: d = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * prev + (1 - d) * net.weight)
    ema.train()
    assert not ema.training


def test_warmup_cosine():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_bad_configuration_messages():
    with pytest.raises(ValueError, match="mode="):
        VAETrainModule(tiny_kl(), losses={"mse": MSE()}, mode="decode")
    with pytest.raises(ValueError, match="distils a teacher"):
        VAETrainModule(tiny_kl(), losses={"mse": MSE()}, mode="decoder")
    with pytest.raises(ValueError, match="no loss terms"):
        VAETrainModule(tiny_kl(), losses={"mse": None, "kl": KL(weight=0)})


# ---------------------------------------------------------------- the GAN step

def test_gan_step_updates_both_and_g_loss_never_reaches_discriminator(tmp_path):
    student, adv = tiny_kl(), tiny_adv(start_step=0)
    d0 = {k: v.clone() for k, v in adv.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    m = VAETrainModule(student, losses={"mse": MSE(target="real")}, adversarial=adv, ema_decay=None,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                       d_optimizer=functools.partial(torch.optim.SGD, lr=0.1), grad_clip=None)
    # record which parameters receive gradient in each backward
    seen = []
    orig = m.manual_backward

    def spy(loss, *a, **k):
        orig(loss, *a, **k)
        seen.append(({n for n, p in adv.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0},
                     {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))

    m.manual_backward = spy
    trainer = fit(m, steps=2, tmp_path=tmp_path)
    assert trainer.global_step == 2  # counts generator updates, not D's
    assert len(seen) == 4  # G and D backward per step
    g_d, g_s = seen[0]
    assert not g_d and g_s  # G backward: student only, the discriminator was frozen
    d_d, d_s = seen[1]
    # D backward: the discriminator gets gradient; the student's gradients are exactly unchanged (fakes detached)
    assert d_d and d_s.keys() == g_s.keys() and all(torch.equal(d_s[k], g_s[k]) for k in g_s)
    assert any(not torch.equal(d0[k], v) for k, v in adv.state_dict().items())  # D was stepped
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())


def test_discriminator_waits_for_start_step(tmp_path):
    adv = tiny_adv(start_step=5)
    d0 = {k: v.clone() for k, v in adv.state_dict().items()}
    m = VAETrainModule(tiny_kl(), losses={"mse": MSE(target="real")}, adversarial=adv, ema_decay=None)
    fit(m, steps=2, tmp_path=tmp_path)
    assert all(torch.equal(d0[k], v) for k, v in adv.state_dict().items())


# ---------------------------------------------------------------- non-finite steps

def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    student = tiny_kl()
    m = VAETrainModule(student, losses={"bad": NaNAt(calls=[0])}, ema_decay=None)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = fit(m, steps=1, data=tiny_data(n_batches=4), tmp_path=tmp_path)
    # batch 0 was NaN and skipped (no update, no step counted); batch 1 stepped
    assert m.nonfinite_total == 1 and trainer.global_step == 1
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())


def test_too_many_nonfinite_in_a_row_stops_with_a_clear_message(tmp_path):
    m = VAETrainModule(tiny_kl(), losses={"bad": NaNAt(calls=[-1])}, ema_decay=None, max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses/gradients in a row"):
        fit(m, steps=5, data=tiny_data(n_batches=6), tmp_path=tmp_path)


# ---------------------------------------------------------------- logging

def test_logged_total_is_the_optimised_total(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    adv = tiny_adv(start_step=0)
    m = VAETrainModule(tiny_kl(), losses={"mse": MSE(target="real", weight=2.0), "kl": KL(weight=1e-3)},
                       adversarial=adv, ema_decay=None)
    logger = CSVLogger(str(tmp_path), name="", version="")
    fit(m, steps=2, tmp_path=tmp_path, logger=logger, log_every_n_steps=1, callbacks=[DataStats()])
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/total")]
    assert len(rows) == 2
    for r in rows:
        expect = (2.0 * float(r["train/mse"]) + 1e-3 * float(r["train/kl"])
                  + float(r["train/adv_weight"]) * float(r["train/adv_g"]))
        assert float(r["train/total"]) == pytest.approx(expect, rel=1e-5, abs=1e-6)
        for k in ("train/grad_norm", "train/d_grad_norm", "train/d_logits_real", "train/d_logits_fake",
                  "train/psnr_target", "train/psnr_real", "train/lr", "data/samples"):
            assert r.get(k, "") != "", k


# ---------------------------------------------------------------- teacher dtype, hooks, accumulation

def test_bf16_teacher_gives_float_targets():
    teacher = tiny_kl()
    m = VAETrainModule(tiny_kl(), teacher=teacher, losses={"mse": MSE()}, teacher_dtype="bfloat16", ema_decay=None)
    m.teachers[0].to(torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    inp = m.forward_mode(m.student, {"image": torch.rand(2, 3, 32, 32) * 2 - 1}, m.setup_, True)
    assert inp.target.dtype == torch.float32 and inp.z_target.dtype == torch.float32
    assert inp.recon.dtype == torch.float32 and inp.mean is not None and inp.logvar is not None
    with pytest.raises(ValueError, match="teacher_dtype"):
        VAETrainModule(tiny_kl(), teacher=teacher, losses={"mse": MSE()}, teacher_dtype="half-ish")


def test_activation_penalty_hooks_the_student_not_its_ema():
    from vaetrain.losses import ActivationPenalty

    student = tiny_kl()
    m = VAETrainModule(student, losses={"mse": MSE(), "act": ActivationPenalty(patterns=["decoder.conv_out"])},
                       ema_decay=0.9)
    assert student.decoder.conv_out._forward_hooks
    assert not m.ema.module.decoder.conv_out._forward_hooks


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """accumulate=2 over batches of 2 == one step on the batch of 4 (same samples, no posterior noise)."""
    results = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        student = tiny_kl()
        m = VAETrainModule(student, losses={"mse": MSE(target="real")}, ema_decay=None, accumulate=accumulate,
                           sample_posterior=False, grad_clip=None,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5))
        trainer = fit(m, steps=1, data=tiny_data(n_batches=4 // batch_size, batch_size=batch_size),
                      tmp_path=tmp_path)
        assert trainer.global_step == 1
        results.append({k: v.clone() for k, v in student.state_dict().items()})
    a, b = results
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_discriminator_warm_up_trains_d_before_its_verdict_reaches_g(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    adv = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), d_start_step=0, start_step=3)
    d0 = {k: v.clone() for k, v in adv.state_dict().items()}
    m = VAETrainModule(tiny_kl(), losses={"mse": MSE(target="real")}, adversarial=adv, ema_decay=None)
    fit(m, steps=2, tmp_path=tmp_path, logger=CSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert any(not torch.equal(d0[k], v) for k, v in adv.state_dict().items()), "D did not train in its warm-up"
    assert sum(bool(r.get("train/d_loss")) for r in rows) == 2
    assert not any(r.get("train/adv_g") for r in rows), "the adversarial term reached G before start_step"
