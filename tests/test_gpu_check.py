"""scripts/gpu_check.sh, the one-GPU proof of the TAESD recipe, run as is on the CPU at tiny sizes: 6 photos,
32 px crops, 3 steps in bf16-mixed, 2 images per eval set. It must leave the JSON and the grid with numbers in
them; the numbers themselves mean nothing at this size."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_at_cpu_size(assets, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((assets / "images" / "train" / "bsds500").iterdir())[:6]:
        shutil.copy(f, photos / f.name)
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "VAETRAIN_ASSETS": str(assets),
           "OMP_NUM_THREADS": "1", "GPU_CHECK_OUT": str(out), "GPU_CHECK_RUN": str(run),
           "GPU_CHECK_TRAIN_FOLDER": str(photos), "GPU_CHECK_ACCELERATOR": "cpu", "GPU_CHECK_DEVICE": "cpu",
           "GPU_CHECK_SIZE": "32", "GPU_CHECK_BATCH": "2", "GPU_CHECK_STEPS": "3", "GPU_CHECK_PASSES": "1",
           "GPU_CHECK_WORKERS": "0", "GPU_CHECK_EVAL_SIZE": "32", "GPU_CHECK_EVAL_LIMIT": "2",
           "GPU_CHECK_VAL_COUNT": "2", "GPU_CHECK_LOG_EVERY": "1"}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())

    def number(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    assert report["train"]["steps"] == 3 and report["train"]["precision"] == "bf16-mixed"
    assert report["cache"]["samples"] == 6 and report["cache"]["options"]["preprocess"]["flip"] is True
    assert number(report["train"]["throughput"]["images_per_s"]["median"])
    for name in ("kodak24", "bsds500_val"):
        ev = report["eval"][name]
        assert ev["images"] == 2 and ev["size"] == 32
        for pair in ("student_vs_teacher", "student_vs_real", "teacher_vs_real"):
            assert all(number(ev[pair][k]) for k in ("psnr", "ssim", "lpips")), ev[pair]
        assert number(report["goal"][name]["gap_db"]) and isinstance(report["goal"][name]["met"], bool)
    assert all(number(v) for v in (report["seconds"]["total"], report["seconds"]["cache_build"]))
    with Image.open(out / "grid.png") as grid:  # input | teacher | student, one row per image
        assert grid.size[0] > 3 * 128 and grid.size[1] > 2 * 128
