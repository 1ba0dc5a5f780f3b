"""The per-step convergence curve of a training run: OUT/train_curve.csv (every logged training step) and
OUT/curve.png (training PSNR vs the target per step, its moving average, the validation points; optionally the
validation points of another run for comparison). The plot is drawn with PIL (a dependency already) so that no
plotting library is needed.

    python scripts/convergence_curve.py --metrics runs/recipes/taesd_taef2_seraena/logs/metrics.csv \
        --out results/taesd_taef2_seraena --compare results/taesd_taef2/val_curve.csv --compare-label "previous"
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TRAIN_KEYS = ["psnr_target", "psnr_real", "mse", "lpips", "adv_g", "adv_weight", "d_loss", "lr", "images_per_s"]


def read_curves(metrics_csv: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run's CSV log; steps 1-based (Lightning logs the 0-based index)."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    train, val = [], []
    for r in rows:
        step = int(r["step"]) + 1
        t = {k: float(r[f"train/{k}"]) for k in TRAIN_KEYS if r.get(f"train/{k}") not in (None, "")}
        if t:
            train.append({"step": step, **t})
        v = {k[4:]: float(x) for k, x in r.items() if k.startswith("val/") and x not in ("", None)}
        if v:
            val.append({"step": step, **v})
    return train, val


def moving_average(xs: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def plot(series: list[tuple[str, tuple[int, int, int], list[tuple[float, float]], bool]], path: Path,
         title: str, size: tuple[int, int] = (720, 420)) -> None:
    """Lines (or dots) of (x, y) points on shared axes, with tick labels and a legend."""
    w, h = size
    left, right, top, bottom = 56, 16, 28, 40
    xs = [x for _, _, pts, _ in series for x, _ in pts]
    ys = [y for _, _, pts, _ in series for _, y in pts]
    x0, x1 = 0.0, max(xs)
    y0, y1 = float(int(min(ys))), float(int(max(ys)) + 1)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        d.text((px(x, y0)[0] - 10, h - bottom + 4), f"{x:.0f}", fill="black")
    step = 1 if y1 - y0 <= 8 else 2
    y = y0
    while y <= y1:
        d.line([px(x0, y), px(x1, y)], fill=(225, 225, 225))
        d.text((8, px(x0, y)[1] - 6), f"{y:.0f} dB", fill="black")
        y += step
    d.text((w // 2 - 20, h - 16), "step", fill="black")
    d.text((left, 8), title, fill="black")
    # the legend sits in the bottom right corner, where a rising curve leaves room
    lx, ly0 = w - right - 266, h - bottom - 10 - 14 * len(series)
    for i, (label, colour, pts, dots) in enumerate(series):
        if dots:
            for x, yv in pts:
                cx, cy = px(x, yv)
                r = 3 if i == len(series) - 1 else 5  # the last set smaller, inside the earlier ones
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif len(pts) > 1:
            d.line([px(x, yv) for x, yv in pts], fill=colour, width=1 if "per step" in label else 2)
    d.rectangle([lx - 4, ly0 - 4, w - right - 4, h - bottom - 4], fill="white", outline=(160, 160, 160))
    for i, (label, colour, _, _) in enumerate(series):
        ly = ly0 + 14 * i
        d.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=colour, width=3)
        d.text((lx + 26, ly), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="another run's val_curve.csv (step, psnr_teacher, ...)")
    ap.add_argument("--compare-label", default="other run, validation")
    ap.add_argument("--title", default="PSNR vs the teacher (dB)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train, val = read_curves(Path(args.metrics))
    keys = [k for k in TRAIN_KEYS if any(k in r for r in train)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_curve.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["step", *keys])
        wr.writeheader()
        for r in train:
            wr.writerow({k: (f"{r[k]:.6g}" if k in r and k != "step" else r.get(k, "")) for k in ["step", *keys]})
    pts = [(r["step"], r["psnr_target"]) for r in train if "psnr_target" in r]
    series = [("training batch, per step", (170, 190, 230), pts, False),
              ("training, 25-step mean", (30, 80, 200), list(zip([p[0] for p in pts],
                                                                 moving_average([p[1] for p in pts], 25))), False)]
    if args.compare:  # drawn first: this run's own points stay visible where they coincide
        with open(args.compare) as f:
            other = [(int(r["step"]), float(r["psnr_teacher"])) for r in csv.DictReader(f)]
        series.append((args.compare_label, (40, 160, 60), other, True))
    vpts = [(r["step"], r["psnr_teacher"]) for r in val if "psnr_teacher" in r]
    if vpts:
        series.append(("this run, validation (Kodak24, 128 px)", (220, 60, 40), vpts, True))
    plot(series, out / "curve.png", args.title)
    print(f"{out / 'train_curve.csv'}: {len(train)} steps; {out / 'curve.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
