"""History that survives a resume, and one safe reader for resume=: from the CLI as a user runs it
(SIGTERM + resume=auto keeps every CSV step once and the same wandb run), and through train() for the
checkpoint choice (newest loadable wins; broken, empty, foreign and code-carrying files get one line)."""

import csv
import functools
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from vaetrain.commands.train import train
from vaetrain.data import ImageDataModule
from vaetrain.engine.checkpoints import find_resume
from vaetrain.engine.checkpoints import Checkpoint
from vaetrain.formats.io import CheckpointError
from vaetrain.losses import MSE
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.safe import UserError

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")


def test_sigterm_and_resume_keep_every_csv_step_once_and_one_wandb_run(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vaetrain.cli", "train", "experiment=tiny", "logger=default", f"run_dir={run}",
            "trainer.max_steps=30", "trainer.val_check_interval=10", "data.epoch_length=16", "export=null",
            "callbacks.checkpoint.every_n_steps=5"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list((run / "checkpoints").glob("step=*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < first < 30, f"the signal did not pre-empt the run (stopped at {first})"
    p = subprocess.run(args + ["resume=auto"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("train/total")]
    steps = [int(r["step"]) for r in rows]
    assert sorted(steps) == list(range(30)), f"steps logged: {steps}"
    ids = {(run / "wandb_run_id").read_text().strip()}
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith("-" + next(iter(ids))) for s in segments), segments


def _parts():
    torch.manual_seed(0)
    student = AutoencoderKL(latent_channels=4, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            encoder_attention=False, decoder_attention=False, norm_groups=4)
    dm = ImageDataModule(source="synthetic", image_size=32, batch_size=2, num_workers=0, epoch_length=8,
                         val_count=2, synthetic_count=64)
    return student, dm


def _train(run_dir, steps, resume=None):
    student, dm = _parts()
    return train(student, dm, loss={"mse": MSE(target="real")},
                 trainer=dict(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              enable_progress_bar=False, enable_model_summary=False),
                 callbacks={"ckpt": functools.partial(Checkpoint, every_n_steps=1, keep=2)}, run_dir=str(run_dir),
                 resume=resume, export=None)


def test_resume_auto_takes_the_newest_loadable_checkpoint_and_cleans_fragments(tmp_path, capsys):
    run = tmp_path / "r"
    _train(run, 3)
    ckpts = run / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"last.ckpt", "step=0000002.ckpt", "step=0000003.ckpt"}
    # killed during a save: last.ckpt cut short, a temporary fragment left behind
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / ".last.ckpt.abc123.tmp").write_bytes(data[:1000])
    assert find_resume("auto", run) == str(ckpts / "step=0000003.ckpt")
    assert "skipping an unusable checkpoint" in capsys.readouterr().out
    r = _train(run, 4, resume="auto")
    assert r["steps"] == 4 and not list(ckpts.glob(".*.tmp"))
    # the very first save killed: only a step checkpoint exists, and it is used
    (ckpts / "last.ckpt").unlink()
    assert find_resume("auto", run).endswith("step=0000004.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_of_bad_files_is_one_line(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        torch.save({"state_dict": {}, "global_step": 1, "x": _Evil()}, f)
    foreign = tmp_path / "weights.ckpt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, foreign)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(pickle.dumps([1, 2, 3])[:5] + b"\x00" * 100)
    text = tmp_path / "text.ckpt"
    text.write_bytes(b"not a checkpoint at all")
    zipped = tmp_path / "cut.ckpt"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    cases = {empty: "file is empty", evil: "refused to unpickle", foreign: "not a training checkpoint",
             junk: "not a", text: "not a checkpoint (", zipped: "truncated or corrupt",
             tmp_path / "missing.ckpt": "no checkpoint there"}
    for path, expect in cases.items():
        with pytest.raises(UserError) as e:
            find_resume(str(path), tmp_path)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg and str(path) in msg, msg
        assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
        assert "documentation" not in msg and "internal" not in msg, msg  # torch's advice is not the cause
    assert not (tmp_path / "pwned").exists()
    assert isinstance(CheckpointError("x"), UserError)
