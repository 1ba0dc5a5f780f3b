"""fp16 student vs fp32 teacher: the number the fp16-fix recipe promises.

``vaetrain audit-fp16`` compares a model's fp16 pass with its OWN fp32 pass; what a user of an fp16-fixed VAE cares
about is how far its fp16 output is from the ORIGINAL fp32 model's. This runs the teacher in fp32 and each model
given in real fp16 (``model.half()``; torch's CPU kernels run fp16 convolutions) on the same photos and prints, per
model, whether the fp16 output is finite and its mean PSNR against the fp32 teacher (uint8, per image).

    python scripts/fp16_vs_teacher.py --teacher TEACHER --models A B ... --images FOLDER [--size 256] [--limit 8]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from vaetrain.convention import uint8_to_model
from vaetrain.commands.images import read_images
from vaetrain.metrics import psnr
from vaetrain.formats import load_autoencoder


@torch.inference_mode()
def compare(teacher_path: str, model_paths: list[str], images: str, size: int = 256, limit: int = 8) -> dict:
    teacher = load_autoencoder(teacher_path).float().eval()
    x = torch.stack([img for _, img in read_images(images, size, "center", teacher.downsample_factor, limit)])
    x = uint8_to_model(x)  # (N, 3, S, S) in [-1, 1]
    ref = teacher.decode(teacher.encode(x)).clamp(-1, 1)
    out = {"teacher": teacher_path, "images": f"{x.shape[0]} x {size} px from {images}", "models": {}}
    for path in [teacher_path, *model_paths]:
        half = load_autoencoder(path).half().eval()
        y = half.decode(half.encode(x.half())).float()
        finite = bool(torch.isfinite(y).all())
        # a non-finite image has no PSNR: report it as such instead of a misleading number
        p = float(psnr(y.clamp(-1, 1), ref).mean()) if finite else math.nan
        out["models"][path] = {"fp16_finite": finite, "fp16_psnr_vs_fp32_teacher": p}
        print(f"{path}: fp16 output {'finite' if finite else 'inf/NaN'}"
              + (f", PSNR vs the fp32 teacher {p:.2f} dB" if finite else ""))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    res = compare(args.teacher, args.models, args.images, args.size, args.limit)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
