"""Resume equality: N steps straight == N/2 steps, stop, resume, N/2 steps (CPU, bit-exact), with the
discriminator, posterior sampling, EMA, warmup/cosine schedules and data order all in play."""

import functools

import torch

from vaetrain.engine.checkpoints import Checkpoint
from vaetrain.data import ImageDataModule
from vaetrain.losses import KL, MSE, Adversarial
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.commands.train import train


def parts():
    torch.manual_seed(0)
    student = AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            encoder_attention=False, decoder_attention=False, norm_groups=4)
    adv = Adversarial(NLayerDiscriminator(ndf=8, n_layers=2, norm="none"), loss="hinge", start_step=1)
    dm = ImageDataModule(source="synthetic", image_size=32, batch_size=2, num_workers=0, epoch_length=4,
                         val_count=2, synthetic_count=64, seed=3)
    return student, adv, dm


def run(run_dir, max_steps, resume=None):
    student, adv, dm = parts()
    r = train(student, dm, loss={"mse": MSE(target="real"), "kl": KL(weight=1e-4)}, discriminator=adv,
              optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
              module={"ema_decay": 0.9, "warmup_steps": 2, "total_steps": 4},
              trainer=dict(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0,
                           num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False),
              callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=100)}, run_dir=str(run_dir),
              resume=resume, export=None, seed=7)
    return r


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path / "straight", 4)
    half = run(tmp_path / "split", 2)
    assert half["steps"] == 2
    resumed = run(tmp_path / "split", 4, resume="auto")
    assert straight["steps"] == resumed["steps"] == 4
    a = torch.load(straight["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for prefix in ("student.", "ema.", "adversarial."):
        keys = [k for k in a["state_dict"] if k.startswith(prefix)]
        assert keys, prefix
        diff = [k for k in keys if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
        assert not diff, f"{prefix} differs after resume: {diff[:3]}"
    # optimizer moments too (both optimizers), and the schedules
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for sa, sb in zip(oa["state"].values(), ob["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [s["last_epoch"] for s in a["lr_schedulers"]] == [s["last_epoch"] for s in b["lr_schedulers"]]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    r = run(tmp_path / "fresh", 1, resume="auto")
    assert r["steps"] == 1
