"""DDP with 2 CPU processes (gloo), launched the way users launch it: `vaetrain train trainer=ddp_cpu`.
Lightning re-runs the command for rank 1; both ranks must share one run folder, take part in every step
(the GAN's G and D backward), and end with identical student weights. The two DDP layouts (one wrapper of the
whole module, the student and discriminator in wrappers of their own) must train the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaetrain.commands.train import resolve_strategy
from vaetrain.engine.parallel import TwoWrapperDDPStrategy
from vaetrain.safe import UserError

TINY_GAN = ["trainer=ddp_cpu", "discriminator=patchgan_small", "loss@loss.lpips=lpips_random", "student.width=8",
            "data=synthetic", "data.image_size=32", "data.batch_size=2", "data.num_workers=0", "data.val_count=2",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "discriminator.start_step=1",
            "trainer.enable_progress_bar=false", "logger=csv"]


def _train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).parent))
    env.pop("VAETRAIN_RUN_DIR", None)
    p = subprocess.run([sys.executable, "-m", "vaetrain.cli", "train", *overrides], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def test_ddp_two_cpu_processes_agree(tmp_path):
    # run_dir left at its clock-based default: rank 1 starts later, yet must write into rank 0's folder
    # strategy=auto with 2 devices: any multi-process strategy must take the GAN; with accumulation, the
    # micro-batches must not all-reduce (no_sync) and the optimizer steps must see all-reduced gradients
    probe = tmp_path / "probe.json"
    _train(tmp_path, *TINY_GAN, "trainer.strategy=auto", "module.accumulate=2", "data.epoch_length=12",
           "trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.checkpoint.every_n_steps=2",
           "export=[original]", "allow_targets=[ddp_probe.]", "+callbacks.probe._target_=ddp_probe.GradSyncProbe",
           f"+callbacks.probe.out={probe}")
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
    rows = json.loads(probe.read_text())
    micro = [row for row in rows if row["at"] == "micro"]
    steps = [row for row in rows if row["at"] == "step"]
    # 3 steps of 2 micro-batches: G steps 3, D steps 2 (D starts at step 1)
    assert len(micro) == 3 and len(steps) == 5, rows
    assert not any(row["student"] for row in micro), f"a micro-batch all-reduced the student's gradients: {rows}"
    # micro[0] is in step 0, before D starts: no D gradients on either rank, which "agree"
    assert not any(row.get("adversarial", False) for row in micro[1:]), f"a micro-batch all-reduced D's: {rows}"
    assert all(row["agree"] for row in steps), f"an optimizer step saw gradients that differ across ranks: {rows}"


def test_one_and_two_ddp_wrappers_train_the_same_weights(tmp_path):
    """Lightning's one wrapper (with its unused-parameter search for the GAN) and ddp_two_wrappers (none), with
    channels-last weights, converted before DDP builds its gradient buckets (else DDP warns at every step)."""
    state = {}
    for layout in ("ddp_one_wrapper", "ddp_two_wrappers"):
        p = _train(tmp_path, *TINY_GAN, f"trainer.strategy={layout}", "data.epoch_length=8", "trainer.max_steps=4",
                   "trainer.val_check_interval=4", "export=[]", f"run_dir={layout}", "module.channels_last=true")
        assert "Grad strides do not match bucket view strides" not in p.stderr
        state[layout] = torch.load(tmp_path / layout / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    one, two = state.values()
    assert one.keys() == two.keys() and any(k.startswith("adversarial.") for k in one)
    different = [k for k in one if not torch.equal(one[k], two[k])]
    assert not different, f"the layouts trained different weights: {different[:5]}"


@pytest.mark.parametrize("name, two", [("ddp", True), ("auto", True), ("ddp_spawn", True), ("ddp_one_wrapper", False),
                                       ("ddp_find_unused_parameters_false", False)])
def test_multi_process_strategies_resolve_to_a_layout(name, two):
    s = resolve_strategy({"strategy": name, "devices": 2, "accelerator": "cpu"}, gan=True)
    assert isinstance(s, TwoWrapperDDPStrategy) == two
    # two wrappers never search for unused parameters; the one wrapper must, for the GAN
    assert s._ddp_kwargs["find_unused_parameters"] == (not two) and s._ddp_kwargs["gradient_as_bucket_view"]
    assert resolve_strategy({"strategy": name, "devices": 1, "accelerator": "cpu"}, gan=True) == name


def test_one_wrapper_refuses_a_gan_with_accumulation_in_one_line():
    with pytest.raises(UserError) as e:
        resolve_strategy({"strategy": "ddp_one_wrapper", "devices": 2, "accelerator": "cpu"}, gan=True, accumulate=2)
    msg = str(e.value)
    assert "\n" not in msg and "ddp_two_wrappers" in msg and "accumulate" in msg
