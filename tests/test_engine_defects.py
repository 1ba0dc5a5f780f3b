"""One test per confirmed engine defect (the KL scale is pinned in test_losses.py): each failed on the engine
before its fix. Tiny models (width 8, 32 px), a few CPU steps."""

import copy
import csv
import functools
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file

from vaetrain.commands.train import resolve_strategy, train
from vaetrain.data import ImageDataModule
from vaetrain.engine.checkpoints import Checkpoint
from vaetrain.engine.callbacks import Preemption
from vaetrain.engine.module import VAETrainModule
from vaetrain.engine.parallel import TwoWrapperDDPStrategy
from vaetrain.engine.schedule import WarmupCosine
from vaetrain.losses import MSE, Adversarial, LatentMSE, LossTerm
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD
from vaetrain.safe import UserError


def kl(f=2, seed=0):
    torch.manual_seed(seed)
    mult = {2: (1, 2), 8: (1, 1, 1, 1)}[f]
    return AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=mult, num_res_blocks=1,
                         encoder_attention=False, decoder_attention=False, norm_groups=4)


def data(n_batches=4, batch_size=2, seed=0, workers=0):
    return ImageDataModule(source="synthetic", image_size=32, batch_size=batch_size, num_workers=workers,
                           epoch_length=n_batches * batch_size, val_count=2, seed=seed, synthetic_count=64)


def fit(module, steps=2, dm=None, **kw):
    args = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(kw)
    trainer = L.Trainer(**args)
    trainer.fit(module, datamodule=dm or data())
    return trainer


ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")


# 2 ---------------------------------------------------------------------------------------------------------
def test_seed_controls_initialisation_across_fresh_processes(tmp_path):
    def export(seed, name):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "vaetrain.cli", "train", "experiment=tiny", f"seed={seed}", "trainer.max_steps=3",
               f"run_dir={run}", "export=[original]", "trainer.enable_progress_bar=false"]
        p = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        (f,) = (run / "export").rglob("*.safetensors")
        return load_file(f)

    a, b, c = export(0, "a"), export(0, "b"), export(1, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert any(not torch.equal(a[k], c[k]) for k in a), "seed=1 gave seed=0's weights"


# 3 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_dtype, expect", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_teacher_runs_in_exactly_its_dtype_under_bf16_autocast(teacher_dtype, expect):
    teacher = kl(f=8, seed=1)
    seen = set()
    for m in teacher.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm)):
            m.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
    student = TAESD(latent_channels=4, width=8, encoder=False, decoder=True)
    student_dtypes = set()
    student.decoder[1].register_forward_hook(lambda mod, i, o: student_dtypes.add(o.dtype))
    m = VAETrainModule(student, teacher=teacher, losses={"mse": MSE()}, mode="decoder", teacher_dtype=teacher_dtype,
                       ema_decay=None)
    fit(m, steps=1, precision="bf16-mixed", limit_val_batches=1, val_check_interval=1)
    assert seen == {expect}, f"teacher layers ran in {seen}, configured {teacher_dtype}"
    assert torch.bfloat16 in student_dtypes  # the student itself does run under autocast


# 4 ---------------------------------------------------------------------------------------------------------
class InfAt(LossTerm):
    """MSE to the target, inf on chosen calls (forces an fp16 overflow in backward)."""

    def __init__(self, calls=()):
        super().__init__(1.0)
        self.calls, self.n = set(calls), 0

    def forward(self, inp):
        v = (inp.recon.float() - inp.target.float()).pow(2).mean()
        self.n += 1
        return v * float("inf") if self.n - 1 in self.calls else v


def _fp16_scaler_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))


def test_16_mixed_clips_unscaled_gradients_and_backs_off_on_overflow():
    def one_step(plugins):
        student = kl()
        m = VAETrainModule(student, losses={"mse": InfAt()}, ema_decay=None, sample_posterior=False, grad_clip=0.01,
                           optimizer=functools.partial(torch.optim.SGD, lr=1.0))
        w0 = copy.deepcopy(student.state_dict())
        fit(m, steps=1, plugins=plugins)
        delta = torch.cat([(student.state_dict()[k] - w0[k]).flatten() for k in w0])
        return delta, m._norms["train/grad_norm"]

    d32, n32 = one_step([])
    d16, n16 = one_step([_fp16_scaler_plugin()])
    # clipping saw the true gradient (not 4096x it): the update has the clip's size, like fp32's
    assert float(d32.norm()) == pytest.approx(0.01, rel=1e-3)
    assert float(d16.norm()) == pytest.approx(float(d32.norm()), rel=0.05)
    assert float(n16) == pytest.approx(float(n32), rel=0.05), "logged norm is not the unscaled one"

    # an overflow goes through the scaler's skip: the scale drops, no update is made, training continues
    student = kl()
    m = VAETrainModule(student, losses={"mse": InfAt(calls=[1])}, ema_decay=None, max_nonfinite_in_a_row=3)
    plugin = _fp16_scaler_plugin()
    scales = []
    cb = L.Callback()
    cb.on_train_batch_end = lambda trainer, *a: scales.append(plugin.scaler.get_scale())
    trainer = fit(m, steps=4, plugins=[plugin], callbacks=[cb], dm=data(n_batches=6))
    assert trainer.global_step == 4
    assert scales[1] < scales[0], f"the scale did not back off after the overflow: {scales}"
    assert all(torch.isfinite(p).all() for p in student.parameters())


# 5 ---------------------------------------------------------------------------------------------------------
def test_conditional_gan_gradient_reaches_encoder_only_through_the_image(tmp_path):
    student = kl()
    disc = NLayerDiscriminator(cond_channels=4, ndf=8, n_layers=2, norm="none")
    adv = Adversarial(disc, conditional=True, adaptive=False, weight=1.0, start_step=0)
    s0, d0 = copy.deepcopy(student.state_dict()), copy.deepcopy(adv.state_dict())
    m = VAETrainModule(student, losses={}, adversarial=adv, ema_decay=None, sample_posterior=False)
    seen = {}
    orig_step, orig_backward = m.training_step, m.manual_backward

    def step_spy(batch, batch_idx):
        seen.setdefault("batch", {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return orig_step(batch, batch_idx)

    def backward_spy(loss, *a, **k):
        orig_backward(loss, *a, **k)
        seen.setdefault("enc", {n: p.grad.clone() for n, p in student.named_parameters()
                                if n.startswith("encoder.") and p.grad is not None})

    m.training_step, m.manual_backward = step_spy, backward_spy
    fit(m, steps=1)

    ref, ref_adv = kl(), copy.deepcopy(adv)
    ref.load_state_dict(s0)
    ref_adv.load_state_dict(d0)
    inp = m.forward_mode(ref, seen["batch"], m.setup_, True)
    g = ref_adv.g_loss(replace(inp, cond=inp.cond.detach()))  # the image path alone
    g.backward()
    for n, p in ref.named_parameters():
        if n.startswith("encoder."):
            assert torch.allclose(seen["enc"][n], p.grad, atol=1e-7), f"{n}: gradient arrived through the condition"


# 6 ---------------------------------------------------------------------------------------------------------
class _SigtermAtBatch(L.Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_preemption_inside_an_accumulation_window_resumes_exactly(tmp_path):
    def run(run_dir, steps, extra=None, resume=None):
        r = train(kl(), data(n_batches=4), loss={"mse": MSE(target="real")},
                  optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                  module={"ema_decay": 0.9, "accumulate": 2, "warmup_steps": 0},
                  trainer=dict(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                               num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False),
                  callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=100),
                             "preempt": functools.partial(Preemption, requeue=False), **(extra or {})},
                  run_dir=str(run_dir), resume=resume, export=None, seed=5)
        return r, torch.load(r["checkpoint"] or Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)

    _, straight = run(tmp_path / "straight", 4)
    # SIGTERM arrives at the first micro-batch of the second window: the checkpoint waits for its end
    r, ckpt = run(tmp_path / "split", 4, extra={"kill": _SigtermAtBatch(2)})
    assert r["preempted"] and ckpt["global_step"] == 2
    _, resumed = run(tmp_path / "split", 4, resume="auto")
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), f"{k} differs after a mid-window pre-emption"


# 7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("student", ["kl", "taesd_encoder"])
def test_encoder_mode_with_discriminator_uses_a_fixed_gan_weight(student, tmp_path, caplog):

    s = kl(f=8) if student == "kl" else TAESD(latent_channels=4, width=8, encoder=True, decoder=False)
    adv = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), weight=0.3, start_step=0)
    m = VAETrainModule(s, teacher=kl(f=8, seed=1), losses={"latent": LatentMSE()}, adversarial=adv, mode="encoder",
                       decode_latents=True, ema_decay=None)
    with caplog.at_level(logging.INFO):
        fit(m, steps=2, logger=CSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/adv_weight")]
    assert len(rows) == 2 and all(float(r["train/adv_weight"]) == pytest.approx(0.3) for r in rows)
    assert "adaptive GAN weight is off" in caplog.text


# 8 ---------------------------------------------------------------------------------------------------------
def test_psnr_teacher_is_against_the_teacher_for_reduced_resolution_decoders():
    teacher = kl(f=8, seed=1)
    student = MLPAutoencoder(latent_channels=4, width=8, depth=1, encoder=False, decoder=True, upsampler_width=None,
                             scaling_factor=1.0)
    m = VAETrainModule(student, teacher=teacher, losses={"mse": MSE(target="real")}, mode="decoder", target="real",
                       ema_decay=None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    inp = m.forward_mode(student, {"image": x}, m.setup_, False)
    with torch.no_grad():
        want_teacher = F.interpolate(teacher.decode(teacher.encode(x)), size=(4, 4), mode="area")
    assert inp.recon.shape[-2:] == (4, 4)
    assert torch.allclose(inp.teacher, want_teacher, atol=1e-6), "the 'teacher' reference is not the teacher's image"
    assert torch.allclose(inp.target, F.interpolate(x, size=(4, 4), mode="area"))  # target=real: the photo


# 9 ---------------------------------------------------------------------------------------------------------
def test_auto_strategy_with_several_devices_gets_a_gan_aware_ddp():
    # GAN-aware by layout: the student and D in DDP wrappers of their own, each used only in its own backward
    s = resolve_strategy({"strategy": "auto", "devices": 2, "accelerator": "cpu"}, gan=True)
    assert isinstance(s, TwoWrapperDDPStrategy) and not s._ddp_kwargs["find_unused_parameters"]
    # or in Lightning's one wrapper, which must then search for the unused parameters
    s = resolve_strategy({"strategy": "ddp_one_wrapper", "devices": 2, "accelerator": "cpu"}, gan=True)
    assert type(s) is DDPStrategy and s._ddp_kwargs["find_unused_parameters"]
    s = resolve_strategy({"strategy": "ddp_one_wrapper", "devices": 2, "accelerator": "cpu"}, gan=False)
    assert type(s) is DDPStrategy and not s._ddp_kwargs["find_unused_parameters"]
    assert resolve_strategy({"strategy": "auto", "devices": 1}, gan=True) == "auto"
    assert resolve_strategy({"strategy": "auto", "devices": 1, "num_nodes": 2}, gan=True) != "auto"
    # end to end with two gloo processes: tests/test_ddp.py runs the CLI with trainer.strategy=auto


# 10 --------------------------------------------------------------------------------------------------------
def test_lightning_clip_and_accumulate_options_map_onto_the_module(tmp_path, capsys):
    r = train(kl(), data(n_batches=4), loss={"mse": MSE(target="real")},
              trainer=dict(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
                           enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.5,
                           accumulate_grad_batches=2),
              run_dir=str(tmp_path / "r"), export=None)
    out = capsys.readouterr().out
    assert r["steps"] == 2 and "module.grad_clip" in out and "module.accumulate" in out
    with pytest.raises(UserError, match="module.grad_clip"):
        train(kl(), data(), loss={"mse": MSE()}, trainer=dict(accelerator="cpu", max_steps=1,
                                                              gradient_clip_algorithm="value", gradient_clip_val=1.0),
              run_dir=str(tmp_path / "v"), export=None)


# settled: the LR schedule follows the configuration on resume; D's schedule spans the D steps -------------------
def test_resume_with_a_longer_run_follows_the_configured_schedule(tmp_path):
    def run(steps, resume=None):
        student = kl()
        adv = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), start_step=1)
        return train(student, data(n_batches=4), loss={"mse": MSE(target="real")}, discriminator=adv,
                     optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                     d_optimizer=functools.partial(torch.optim.SGD, lr=0.2),
                     module={"ema_decay": None, "warmup_steps": 0, "min_lr_ratio": 0.0},
                     trainer=dict(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0,
                                  num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False),
                     callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=100)},
                     run_dir=str(tmp_path / "r"), resume=resume, export=None)

    run(2)
    r = run(8, resume="auto")
    ckpt = torch.load(r["checkpoint"], weights_only=True)
    g_lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    d_lr = ckpt["optimizer_states"][1]["param_groups"][0]["lr"]
    assert g_lr == pytest.approx(0.1 * WarmupCosine(0, 8, 0.0)(8))  # the new length (8), not the first run's (2)
    # D stepped 7 times (steps 1..7) over a schedule of 8 - 1 = 7 D steps: it ends where it should
    assert d_lr == pytest.approx(0.2 * WarmupCosine(0, 7, 0.0)(7), abs=1e-9)
