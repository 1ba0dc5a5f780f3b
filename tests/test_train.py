"""``vaetrain.commands.train.train`` and ``vaetrain train``: a few steps per mode, export, bf16 on CPU, atomic
checkpoints, pre-emption, and the no-argument job (shrunk) with wandb offline. Tiny models, 32 px."""

import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from vaetrain.engine.callbacks import Preemption
from vaetrain.engine.checkpoints import AtomicCheckpointIO, Checkpoint
from vaetrain.data import ImageDataModule
from vaetrain.losses import KL, MSE, Adversarial, LatentMSE
from vaetrain.formats import load_autoencoder
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.interposer import LatentInterposer
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD
from vaetrain.commands.train import train
from vaetrain.safe import UserError


def kl(f=2, seed=0, **kw):
    torch.manual_seed(seed)
    mult = {2: (1, 2), 8: (1, 1, 1, 1)}[f]
    return AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=mult, num_res_blocks=1,
                         encoder_attention=False, decoder_attention=False, norm_groups=4, **kw)


def data(n_batches=2, batch_size=2, seed=0):
    return ImageDataModule(source="synthetic", image_size=32, batch_size=batch_size, num_workers=0,
                           epoch_length=n_batches * batch_size, val_count=2, seed=seed, synthetic_count=64)


def csv_logger():
    from lightning.pytorch.loggers import CSVLogger

    return functools.partial(CSVLogger, name="logs", version="")


TRAINER = dict(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, check_val_every_n_epoch=None,
               limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
               enable_model_summary=False)


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before, m, prefix=""):
    return {k for k, v in m.state_dict().items() if k.startswith(prefix) and not torch.equal(before[k], v)}


@pytest.mark.parametrize("mode", ["autoencode", "decoder", "encoder", "latent"])
def test_each_mode_trains_checkpoints_and_exports(mode, tmp_path):
    teacher = teacher_b = None
    adversarial = None
    if mode == "autoencode":
        student = kl(f=2)
        losses = {"mse": MSE(target="real"), "kl": KL(weight=1e-4)}
        adversarial = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), start_step=0)
        export = ["original", "diffusers"]
    elif mode == "decoder":
        teacher, student = kl(f=8, seed=1), TAESD(latent_channels=4, width=8, encoder=False, decoder=True)
        losses, export = {"mse": MSE(target="teacher")}, ["taesd"]
        # TAESD-style: the discriminator also sees the latent the student decoded
        adversarial = Adversarial(NLayerDiscriminator(cond_channels=4, ndf=8, n_layers=2, norm="none"),
                                  conditional=True, start_step=0)
    elif mode == "encoder":
        teacher, student = kl(f=8, seed=1), TAESD(latent_channels=4, width=8, encoder=True, decoder=False)
        losses, export = {"latent": LatentMSE()}, ["taesd"]
    else:
        teacher, teacher_b = kl(f=8, seed=1), kl(f=8, seed=2)
        student = LatentInterposer(4, 4, width=8, blocks=1)
        losses, export = {"latent": LatentMSE()}, ["original"]
    teachers = [t for t in (teacher, teacher_b) if t is not None]
    t_before = [snapshot(t) for t in teachers]
    before = snapshot(student)
    r = train(student, data(), teacher=teacher, teacher_b=teacher_b, loss=losses, discriminator=adversarial, mode=mode,
              module={"ema_decay": 0.9}, trainer=TRAINER, logger={"csv": csv_logger()},
              callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=1, keep=1)},
              run_dir=str(tmp_path / "run"), export=export)
    assert r["steps"] == 2 and not r["preempted"]
    assert changed(before, student), "the student did not train"
    assert all(not changed(b, t) for b, t in zip(t_before, teachers)), "a teacher changed"
    # checkpoint: student, EMA, D and both optimizers; never the teachers or the LPIPS-style loss nets
    ckpt = torch.load(r["checkpoint"], weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("ema.module.") for k in keys)
    assert not any(k.startswith(("losses.", "_frozen", "teacher")) for k in keys)
    assert len(ckpt["optimizer_states"]) == (2 if adversarial else 1)
    if adversarial:
        assert any(k.startswith("adversarial.discriminator.") for k in keys)
    assert ckpt["vaetrain"]["mode"] == mode and "rng" in ckpt["vaetrain"]
    assert len(list((tmp_path / "run" / "checkpoints").glob("step=*.ckpt"))) == 1  # keep=1
    # decoder mode: the encoder is absent; autoencode: everything trains
    if mode == "decoder":
        assert all(n.startswith("decoder.") for n in changed(before, student))
    rows = list(csv.DictReader(open(r["logs"]["csv"])))
    assert any(row.get("train/total") for row in rows)
    # the export is the EMA student and reloads to the same outputs
    ema = torch.load(r["checkpoint"], weights_only=True)["state_dict"]
    if mode == "latent":
        from safetensors.torch import load_file

        sd = load_file(r["exports"]["safetensors"])
        assert all(torch.equal(sd[k], ema["ema.module." + k]) for k in sd)
        return
    for fmt in export:
        path = r["exports"][fmt]
        assert not path.startswith("skipped"), path
        files = sorted(Path(path).glob("*encoder*")) + sorted(Path(path).glob("*decoder*")) if fmt == "taesd" else None
        back = load_autoencoder((str(files[0]) if len(files) == 1 else [str(f) for f in files]) if files else path)
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            own = {k[len("ema.module."):]: v for k, v in ema.items() if k.startswith("ema.module.")}
            student.load_state_dict(own)
            if student.has_encoder:
                assert torch.allclose(back.encode(x), student.encode(x), atol=1e-4)
            if student.has_decoder:
                z = torch.randn(1, 4, 32 // student.downsample_factor, 32 // student.downsample_factor)
                assert torch.allclose(back.decode(z), student.decode(z), atol=1e-4)


def test_bf16_mixed_on_cpu(tmp_path):
    student = kl(f=2)
    seen = []
    student.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    r = train(student, data(), loss={"mse": MSE(target="real"), "kl": KL(weight=1e-4)},
              discriminator=Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), start_step=0),
              trainer={**TRAINER, "precision": "bf16-mixed"}, logger={"csv": csv_logger()},
              run_dir=str(tmp_path / "run"), export=None)
    assert torch.bfloat16 in seen, "autocast did not run the student in bf16"
    rows = [row for row in csv.DictReader(open(r["logs"]["csv"])) if row.get("train/total")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(float(row["train/total"]))) for row in rows)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay fp32


class _Boom:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_checkpoint_write_is_atomic(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "c" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    with pytest.raises(UserError, match="disk full") as e:
        io.save_checkpoint({"step": torch.tensor(2), "x": [torch.zeros(1000), _Boom()]}, path)
    assert str(path) in str(e.value) and "previous checkpoint there is unchanged" in str(e.value)
    assert int(torch.load(path, weights_only=True)["step"]) == 1  # the last good file survives
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_full_disk_names_the_path_and_the_cause(tmp_path, monkeypatch):
    import errno

    def full(obj, f, *a, **k):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as e:
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "no space left on device" in msg
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["step"]) == 1 and len(list(tmp_path.iterdir())) == 1


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


class _SigtermAt(L.Callback):
    """Signals the whole job the way a scheduler does: this process and its loader workers.

    Only children started after this callback was built are the job's: pytest's process may already hold helpers
    of earlier tests (wandb's service, which an in-process CLI test starts), and killing those breaks later tests."""

    def __init__(self, step):
        self.step, self.workers, self.survived = step, [], None
        self.before = set(_children(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.workers = [c for c in _children(os.getpid()) if c not in self.before]
            for pid in [os.getpid(), *self.workers]:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
            self.survived = all(os.path.exists(f"/proc/{w}/stat") and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1]
                                .split()[0] not in "ZX" for w in self.workers)


def test_sigterm_writes_a_checkpoint_then_resume_finishes(tmp_path):
    run = tmp_path / "run"
    kw = dict(loss={"mse": MSE(target="real")}, trainer={**TRAINER, "max_steps": 4, "val_check_interval": 100},
              logger={"csv": csv_logger()}, run_dir=str(run), export=["original"])
    kill = _SigtermAt(1)
    cbs = {"ckpt": functools.partial(Checkpoint, every_n_steps=100), "preempt": functools.partial(Preemption),
           "kill": kill}
    # a loader worker must survive the signal too
    dm = ImageDataModule(data(n_batches=4).spec.replace(num_workers=1, persistent_workers=True))
    r = train(kl(f=2), dm, callbacks=cbs, **kw)
    assert kill.workers, "no loader worker was signalled"
    assert kill.survived, "a loader worker died of the pre-emption signal"
    assert r["preempted"] and r["steps"] == 2 and not r["exports"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    r2 = train(kl(f=2), data(n_batches=4), callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=100)},
               resume="auto", **kw)
    assert r2["steps"] == 4 and not r2["preempted"] and Path(r2["exports"]["original"]).exists()


_OUTLIVING_ITERATOR = """
import torch
from vaetrain.engine.callbacks import shield_loader_workers
class DataModule:
    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True)
dm = DataModule()
shield_loader_workers(dm)
it = iter(dm.train_dataloader())
next(it)
keep = [it]
keep.append(keep)  # a cycle, as Lightning's trainer/loop references make: the iterator lives until exit
print("trained", flush=True)
"""


def test_a_process_whose_shielded_loader_workers_outlive_training_still_exits():
    """The workers ignore SIGTERM (pre-emption); multiprocessing's exit hook ends daemonic children with SIGTERM and
    joins them, so an iterator that outlived training hung the interpreter's exit (a CI run that never ended)."""
    p = subprocess.run([sys.executable, "-c", _OUTLIVING_ITERATOR], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 and "trained" in p.stdout, p.stderr[-2000:]


def test_configuration_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="mode=decoder distils a teacher"):
        train(kl(f=2), data(), loss={"mse": MSE()}, mode="decoder", trainer=TRAINER, run_dir=str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="unexpected keyword"):
        train(kl(f=2), data(), loss={"mse": MSE()}, module={"emma_decay": 0.9}, trainer=TRAINER,
              run_dir=str(tmp_path / "m"))


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no checkpoint there"):
        train(kl(f=2), data(), loss={"mse": MSE()}, trainer=TRAINER, run_dir=str(tmp_path / "r"),
              resume=str(tmp_path / "missing.ckpt"), export=None)
    kw = dict(loss={"mse": MSE()}, trainer={**TRAINER, "max_steps": 1, "limit_val_batches": 0},
              callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=100)}, run_dir=str(tmp_path / "r"),
              export=None)
    train(kl(f=2), data(), **kw)
    with pytest.raises(SystemExit, match="does not match the configured student"):
        train(kl(f=8), data(), resume="auto", **kw)


def test_cli_default_job_shrunk_with_wandb_offline(tmp_path, monkeypatch):
    """`vaetrain train` as users run it (the default config, only made tiny): trains, validates, writes
    checkpoints, exports, an image grid, CSV metrics and an offline wandb run; prints where they went."""
    from vaetrain.cli import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job"
    r = run("train", [f"run_dir={out}", "student.width=8", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
                      "data.epoch_length=8", "data.val_count=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=2",
                      "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"])
    assert r["steps"] == 3
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "config.json").exists()
    assert json.loads((out / "result.json").read_text())["steps"] == 3
    assert Path(r["exports"]["original"]).exists() and (Path(r["exports"]["diffusers"]) / "config.json").exists()
    from vaetrain.formats import load_autoencoder
    exported = load_autoencoder(r["exports"]["diffusers"])  # the default student: a 4x TAESD (AutoencoderTiny)
    assert exported.downsample_factor == 4 and exported.latent_channels == 4
    assert list((out / "images").glob("val_step*.png"))
    rows = list(csv.DictReader(open(r["logs"]["csv"])))
    assert any(row.get("val/psnr_gt") for row in rows)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].rglob("media/images/val/grid_*.png")), "the image grid did not reach wandb"
    assert any(row.get("train/images_per_s") for row in rows) and any(row.get("data/samples") for row in rows)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["vaetrain"]["config"]["trainer"]["max_steps"] == 3


def test_leftover_settings_of_a_removed_term_are_ignored(tmp_path, capsys):
    # what `vaetrain train ~loss@loss.lpips` leaves when an experiment had set loss.lpips.weight
    r = train(kl(f=2), data(), loss={"mse": MSE(), "lpips": {"weight": 0.1}}, discriminator={"start_step": 5},
              trainer={**TRAINER, "max_steps": 1, "limit_val_batches": 0}, run_dir=str(tmp_path / "r"), export=None)
    assert r["steps"] == 1
    out = capsys.readouterr().out
    assert "lpips was removed" in out and "discriminator was removed" in out
