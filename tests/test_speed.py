"""The step's speed options, tested on CPU for what they must not change: no value read back from the device
per step on one device (on a GPU each read is a sync), the non-finite skip decided on the device, and
channels-last / torch.compile / fused optimizers leaving the loss curve where it was."""

import collections
import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from vaetrain.data import ImageDataModule
from vaetrain.engine.callbacks import Throughput
from vaetrain.engine.module import VAETrainModule
from vaetrain.losses import KL, MSE, Adversarial, LossTerm
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD


def parts(fused=True, losses=None, **module):
    torch.manual_seed(0)
    student = AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            encoder_attention=False, decoder_attention=False, norm_groups=4)
    adv = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), start_step=0)
    opt = functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused)
    m = VAETrainModule(student, losses=losses or {"mse": MSE(target="real"), "kl": KL()}, adversarial=adv,
                       ema_decay=0.9, optimizer=opt, d_optimizer=opt, **module)
    return m, student


def fit(m, steps, tmp_path=None, callbacks=(), **kw):
    dm = ImageDataModule(source="synthetic", image_size=32, batch_size=2, num_workers=0, epoch_length=2 * steps,
                         val_count=2, synthetic_count=64)
    args = dict(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=100)
    args.update(kw)
    L.Trainer(callbacks=list(callbacks), **args).fit(m, datamodule=dm)


class CountReads(L.Callback):
    """Counts every read of a tensor's value into Python during the training batches from ``start`` on.

    Non-fused torch optimizers keep their step counters on the CPU even for GPU parameters and read them
    (``.item()``) per parameter: not a device sync, so those tensors are not counted."""

    NAMES = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy")

    def __init__(self, monkeypatch, start=2):
        self.start, self.on, self.reads, self.host_counters = start, False, collections.Counter(), set()
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, orig):
        def f(t, *a, **k):
            if self.on and id(t) not in self.host_counters:
                self.reads[name] += 1
            return orig(t, *a, **k)
        return f

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.host_counters = {id(st["step"]) for opt in trainer.optimizers for st in opt.state.values()
                              if "step" in st and not (opt.defaults.get("fused") or opt.defaults.get("capturable"))}
        self.on = batch_idx >= self.start

    def on_train_batch_end(self, *args):
        self.on = False


@pytest.mark.parametrize("fused, reads_per_step", [(True, 0), (False, 1)])
def test_host_reads_per_step(fused, reads_per_step, monkeypatch):
    m, _ = parts(fused=fused)
    count = CountReads(monkeypatch)
    fit(m, 6, callbacks=[count])
    # steps 2..5 (the first steps read lazily initialised state once): fused optimizers take the non-finite
    # decision on the device; others read it once per step
    assert sum(count.reads.values()) == 4 * reads_per_step, dict(count.reads)


class NaNAt(LossTerm):
    def __init__(self, call):
        super().__init__(1.0)
        self.call, self.n = call, 0

    def forward(self, inp):
        v = (inp.recon - inp.real).pow(2).mean()
        self.n += 1
        return v * float("nan") if self.n - 1 == self.call else v


def test_nonfinite_step_is_dropped_on_the_device():
    m, student = parts(losses={"bad": NaNAt(call=2)})
    seen = []
    cb = L.Callback()
    cb.on_train_batch_end = lambda trainer, pl, *a: seen.append(
        ({k: v.clone() for k, v in student.state_dict().items()}, {k: v.clone() for k, v in m.ema.state_dict().items()}))
    fit(m, 4, callbacks=[cb])
    (s1, e1), (s2, e2), (s3, e3) = seen[1], seen[2], seen[3]
    assert all(torch.equal(s1[k], s2[k]) for k in s1), "the NaN step changed the student"
    assert all(torch.equal(e1[k], e2[k]) for k in e1 if k != "num_updates"), "the NaN step moved the EMA"
    assert any(not torch.equal(s2[k], s3[k]) for k in s2), "training did not continue"
    assert any(not torch.equal(e2[k], e3[k]) for k in e2 if k != "num_updates"), "the EMA stopped following"
    assert all(torch.isfinite(v).all() for v in s3.values() if v.is_floating_point())
    assert m.guard.total == 1


def _curve(tmp_path, name, fused=True, **module):
    m, _ = parts(fused=fused, **module)
    fit(m, 3, logger=CSVLogger(str(tmp_path), name=name, version=""), log_every_n_steps=1)
    rows = [r for r in csv.DictReader(open(tmp_path / name / "metrics.csv")) if r.get("train/total")]
    return [float(r["train/total"]) for r in rows]


@pytest.mark.parametrize("option", [{"channels_last": True}, {"compile": "aot_eager"}, {"fused": False},
                                    {"grad_checkpointing": True}])
def test_speed_options_leave_the_loss_curve_unchanged(option, tmp_path):
    base = _curve(tmp_path, "base")
    other = _curve(tmp_path, "other", **option)
    assert len(base) == len(other) == 3
    assert other == pytest.approx(base, rel=1e-3, abs=1e-5), (option, base, other)


def test_throughput_counts_the_step_flops_and_reports_mfu(tmp_path):
    m, _ = parts()
    tp = Throughput(window=5, count_flops_at=1, peak_flops=1e12)
    fit(m, 5, callbacks=[tp], logger=CSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1)
    # one step's FLOPs: at least the student's forward convolutions, several times over with backward and D
    assert tp.flops.flops and tp.flops.flops > 1e6
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/mfu")]
    assert rows and all(float(r["train/mfu"]) == pytest.approx(float(r["train/tflops_per_s"]), rel=1e-6) for r in rows)


@pytest.mark.parametrize("student", ["taesd", "kl"])
def test_autoencode_step_runs_each_half_once(student):
    """One training step in autoencode mode runs the student's encoder once and its decoder once (a deterministic
    encoder used to run twice: once for its latents, once more for the posterior-mean path)."""
    torch.manual_seed(0)
    model = (TAESD(latent_channels=4, width=8, downsample_factor=4) if student == "taesd" else
             AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           encoder_attention=False, decoder_attention=False, norm_groups=4))
    calls = collections.Counter()
    model.encoder.register_forward_hook(lambda *a: calls.update(["encoder"]))
    model.decoder.register_forward_hook(lambda *a: calls.update(["decoder"]))
    m = VAETrainModule(model, losses={"mse": MSE(target="real")}, ema_decay=None,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    fit(m, steps=1)
    assert calls == {"encoder": 1, "decoder": 1}


def test_bench_train_runs_every_shape_and_reports_both_ratios(tmp_path):
    """scripts/bench_train.py as run for the README, shrunk: each shape's framework step and hand-written loop run,
    and the JSON holds wall-clock and CPU ratios (the numbers themselves belong to the benchmark, not here)."""
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    p = subprocess.run([sys.executable, str(script), "--steps", "4", "--warmup", "1", "--reps", "1", "--size", "32",
                        "--batch", "2", "--threads", "1", "--json", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["shape"] for r in rows] == ["default", "taesd_decoder", "kl_decoder"]
    for r in rows:
        assert r["framework_ms"] > 0 and r["loop_ms"] > 0 and r["gflop_per_step"] > 0
        assert r["ratio"] == pytest.approx(r["framework_ms"] / r["loop_ms"], rel=0.01)
        assert r["cpu_ratio"] == pytest.approx(r["framework_cpu_ms"] / r["loop_cpu_ms"], rel=0.01)


def test_bench_ddp_compares_both_layouts_on_two_processes(tmp_path):
    """scripts/bench_ddp.py shrunk: both DDP layouts train the GAN shape on 2 gloo processes and the JSON holds
    their ms/step and ratios."""
    out = tmp_path / "bench_ddp.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ddp.py"
    p = subprocess.run([sys.executable, str(script), "--shapes", "taesd_decoder", "--steps", "4", "--warmup", "1",
                        "--reps", "1", "--size", "32", "--batch", "1", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["shape"] == "taesd_decoder" and r["gan"] and r["one_wrapper_ms"] > 0 and r["two_wrappers_ms"] > 0
    assert r["ratio"] == pytest.approx(r["two_wrappers_ms"] / r["one_wrapper_ms"], rel=0.01)
