"""DDP with 2 CPU processes (gloo), launched the way users launch it: `vaetrain train trainer=ddp_cpu`.
Lightning re-runs the command for rank 1; both ranks must share one run folder, take part in every step
(the GAN's G and D backward with unused parameters), and end with identical student weights."""

import json
import os
import subprocess
import sys

import torch


def test_ddp_two_cpu_processes_agree(tmp_path):
    # run_dir left at its clock-based default: rank 1 starts later, yet must write into rank 0's folder
    # strategy=auto with 2 devices: any multi-process strategy must take the GAN (unused parameters per backward)
    cmd = [sys.executable, "-m", "vaetrain.cli", "train", "trainer=ddp_cpu", "discriminator=patchgan_small", "trainer.strategy=auto",
           "loss@loss.lpips=lpips_random", "student.width=8", "data=synthetic", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
           "data.epoch_length=6", "data.val_count=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
           "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=2",
           "discriminator.start_step=1", "trainer.enable_progress_bar=false", "logger=csv", "export=[original]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("VAETRAIN_RUN_DIR", None)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, f"ranks wrote into different run folders: {runs}"
    out = runs[0]
    r = json.loads((out / "result.json").read_text())
    assert r["world_size"] == 2 and r["steps"] == 3
    sums = r["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and len(ckpt["optimizer_states"]) == 2
    assert any(k.startswith("adversarial.") for k in ckpt["state_dict"])
