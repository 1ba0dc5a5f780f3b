"""Gather what scripts/gpu_check.sh produced into OUT/gpu_check.json: the eval summaries per set, the training
run (steps, wall time, img/s and MFU logged by the Throughput callback), the cache build and the 2 dB goal.

    python scripts/gpu_check_report.py --run runs/gpu_check --out results/gpu_check --sets kodak24 bsds500_val \
        --train-seconds 300 --eval-seconds kodak24=20 bsds500_val=40 --total-seconds 400 --train-command "..."
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

# the student must come within this many dB of the teacher's own reconstruction vs the photos (issue 12)
GOAL_DB = 2.0


def _logged(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def throughput(metrics_csv: Path) -> dict:
    """img/s (and MFU where the device's peak is known) over the logged windows of the Throughput callback."""
    if not metrics_csv.is_file():
        return {}
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    out: dict = {}
    for key, name in (("train/images_per_s", "images_per_s"), ("train/tflops_per_s", "tflops_per_s"),
                      ("train/mfu", "mfu")):
        vals = _logged(rows, key)
        if vals:
            # the first windows include start-up (cudnn autotuning, loader warm-up): the median is the steady rate
            out[name] = {"median": statistics.median(vals), "last": vals[-1], "max": max(vals), "logged": len(vals)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sets", nargs="+", required=True)
    ap.add_argument("--train-seconds", type=float, required=True)
    ap.add_argument("--eval-seconds", nargs="*", default=[])
    ap.add_argument("--total-seconds", type=float, required=True)
    ap.add_argument("--train-command", default="")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    result = json.loads((run / "train" / "result.json").read_text())
    config = json.loads((run / "train" / "config.json").read_text())
    caches = [json.loads(p.read_text()) for p in sorted((run / "latent_cache").glob("*/complete.json"))]
    evals, goal = {}, {}
    for name in args.sets:
        s = json.loads((out / name / "summary.json").read_text())
        evals[name] = {k: s[k] for k in ("images", "size", "lpips", "student_vs_teacher", "student_vs_real",
                                          "teacher_vs_real", "seconds") if k in s}
        gap = s["teacher_vs_real"]["psnr"] - s["student_vs_real"]["psnr"]
        goal[name] = {"student_vs_real_psnr": s["student_vs_real"]["psnr"],
                      "teacher_vs_real_psnr": s["teacher_vs_real"]["psnr"], "gap_db": gap, "met": gap <= GOAL_DB}
    cuda = torch.cuda.is_available()
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no GPU: a test-sized run of the same script)",
        "torch": torch.__version__,
        "seconds": {"total": args.total_seconds, "train_command": args.train_seconds, "fit": result["seconds"],
                    "cache_build": sum(c["seconds"] for c in caches),
                    "eval": {k: float(v) for k, v in (e.split("=", 1) for e in args.eval_seconds)}},
        "cache": {"samples": sum(c["samples"] for c in caches), "options": caches[0]["options"] if caches else None},
        "train": {"steps": result["steps"], "precision": config["trainer"]["precision"],
                  "image_size": config["data"]["image_size"], "batch_size": config["data"]["batch_size"],
                  "throughput": throughput(run / "train" / "logs" / "metrics.csv"), "final_val": result.get("val"),
                  "command": args.train_command},
        "eval": evals,
        "goal": {"within_db_of_teacher_vs_photos": GOAL_DB, **goal},
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    tp = report["train"]["throughput"].get("images_per_s", {})
    print(f"gpu_check: {report['device']}: {result['steps']} steps in {result['seconds']} s"
          + (f", {tp['median']:.1f} img/s (median)" if tp else ""))
    for name, g in goal.items():
        print(f"  {name}: student {g['student_vs_real_psnr']:.2f} dB vs photos, teacher {g['teacher_vs_real_psnr']:.2f}"
              f" dB: gap {g['gap_db']:.2f} dB ({'met' if g['met'] else 'not met'}: goal <= {GOAL_DB} dB)")
    print(f"  wrote {out / 'gpu_check.json'}, {out / 'grid.png'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
