"""Gather the real recipe runs (scripts/run_recipes.sh) into results/results.json and results/results.csv.

Reads each run's ``result.json`` (steps, seconds) and ``logs/metrics.csv`` (validation over steps), the eval
summaries under ``results/<run>/<set>/summary.json``, the fp16 audits and the benchmarks, and writes one JSON with
everything plus a flat CSV (one row per model x eval set) and, per run, ``results/<run>/val_curve.csv`` (validation
metrics at every validation step).

    python scripts/collect_recipe_results.py [--runs runs/recipes] [--results results]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

RUNS = ["default", "taesd_taef2", "taesd_taef2_seraena", "mlp_taef2", "vae16", "no_attn", "fp16_fix/finetune"]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def val_curve(run: Path) -> list[dict]:
    """Validation rows of a run's CSV log: step and every val/ metric."""
    path = run / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        vals = {k[4:]: float(v) for k, v in r.items() if k.startswith("val/") and v not in ("", None)}
        if vals:
            out.append({"step": int(r["step"]) + 1, **vals})  # Lightning logs the 0-based index of the last step
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/recipes")
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)
    runs, res = Path(args.runs), Path(args.results)
    report: dict = {"runs": {}, "evals": {}, "fp16_fix": {}, "bench": {}}
    # runs made elsewhere (another checkout's runs/ folder) keep the entries an earlier collection wrote
    previous = (_json(res / "results.json") or {}).get("runs", {})
    for name in RUNS:
        r = _json(runs / name / "result.json")
        if r is None:
            if name in previous:
                report["runs"][name] = previous[name]
            continue
        curve = val_curve(runs / name)
        report["runs"][name] = {"steps": r["steps"], "train_seconds": r["seconds"], "final_val": r.get("val"),
                                "val_curve": curve}
        if curve:
            keys = sorted({k for row in curve for k in row})
            keys.remove("step")
            (res / name).mkdir(parents=True, exist_ok=True)
            with open(res / name / "val_curve.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", *keys])
                w.writeheader()
                w.writerows(curve)
    rows = []
    for folder in sorted(p for p in res.iterdir() if p.is_dir()):
        for summary in sorted(folder.glob("*/summary.json")):
            s = _json(summary)
            report["evals"][f"{folder.name}/{summary.parent.name}"] = s
            for pair in ("student_vs_teacher", "student_vs_real", "teacher_vs_real"):
                if pair in s:
                    rows.append({"model": folder.name, "eval_set": summary.parent.name, "images": s["images"],
                                 "size": s["size"], "pair": pair, **{k: round(v, 4) for k, v in s[pair].items()},
                                 "lpips_kind": s["lpips"]})
    for key in ("teacher_audit", "rescale_report", "finetune_audit", "fp16_vs_teacher_emulated",
                "fp16_vs_teacher_native"):
        a = _json(res / "fp16_fix" / f"{key}.json")
        if a is not None:
            for bulky in ("layers", "per_size"):  # the per-layer tables stay in the file itself
                a.pop(bulky, None)
            report["fp16_fix"][key] = a
    report["bench"]["no_attn"] = _json(res / "no_attn" / "bench.json")
    report["default_resample_baseline"] = _json(res / "default" / "resample_baseline.json")
    report["latent_stats"] = _json(res / "vae16" / "latent_stats.json")
    timings = res / "timings.tsv"
    if timings.is_file():
        report["timings_s"] = {line.split("\t")[0]: int(line.split("\t")[1]) for line in timings.read_text().splitlines()
                               if line.strip()}
    (res / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(res / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    print(f"wrote {res / 'results.json'} and {res / 'results.csv'} ({len(rows)} rows)")
    return report


if __name__ == "__main__":
    main()
