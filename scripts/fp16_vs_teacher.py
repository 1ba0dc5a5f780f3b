"""fp16 student vs fp32 teacher: the number the fp16-fix recipe promises.

``vaetrain audit-fp16`` compares a model's fp16 pass with its OWN fp32 pass; what a user of an fp16-fixed VAE cares
about is how far its fp16 output is from the ORIGINAL fp32 model's. This runs the teacher in fp32 and each model
given in fp16 on the same photos, at each size, and prints, per model and size, whether the fp16 output is finite
and its mean PSNR against the fp32 teacher (uint8, per image).

``--mode native`` runs ``model.half()`` (torch's CPU kernels run fp16 convolutions, ~100x slower than fp32);
``--mode emulate`` runs fp32 arithmetic on fp16-rounded weights and input with every module's output rounded
through fp16 (overflow past 65504 becomes inf, as in fp16 storage between layers; GPUs accumulate fp16 convolutions
in fp32 too), which makes 1024-2048 px checks affordable on a CPU. Photos are upscaled to the larger sizes.

    python scripts/fp16_vs_teacher.py --teacher TEACHER --models A B ... --images FOLDER [--sizes 256 512] \\
        [--limit 8] [--mode native|emulate] [--no-teacher] [--fp32] [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from vaetrain.commands.audit_fp16 import _Recorder
from vaetrain.commands.images import read_images
from vaetrain.convention import uint8_to_model
from vaetrain.formats import load_autoencoder
from vaetrain.metrics import psnr


def _fp16_round_trip(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "native":
        half = copy.deepcopy(model).half()
        return half.decode(half.encode(x.half())).float()
    rounded = copy.deepcopy(model)
    for p in rounded.parameters():
        p.data = p.data.half().float()
    rec = _Recorder(rounded, emulate_fp16=True)
    try:
        return rounded.decode(rounded.encode(x.half().float())).float()
    finally:
        rec.close()


@torch.inference_mode()
def compare(teacher_path: str, model_paths: list[str], images: str, sizes=(256,), limit: int = 8,
            mode: str = "native", with_teacher: bool = True, fp32: bool = False) -> dict:
    teacher = load_autoencoder(teacher_path).float().eval()
    out = {"teacher": teacher_path, "images": f"{limit} from {images}", "mode": mode, "sizes": list(sizes),
           "models": {}}
    for size in sizes:
        x = torch.stack([img for _, img in read_images(images, size, "center", teacher.downsample_factor, limit)])
        x = uint8_to_model(x)  # (N, 3, S, S) in [-1, 1]
        ref = teacher.decode(teacher.encode(x)).clamp(-1, 1)
        for path in [teacher_path, *model_paths] if with_teacher else model_paths:
            model = load_autoencoder(path).float().eval()
            y = _fp16_round_trip(model, x, mode)
            finite = bool(torch.isfinite(y).all())
            # a non-finite image has no PSNR: report it as such instead of a misleading number
            p = float(psnr(y.clamp(-1, 1), ref).mean()) if finite else math.nan
            row = {"fp16_finite": finite, "fp16_psnr_vs_fp32_teacher": p}
            if fp32:
                row["fp32_psnr_vs_fp32_teacher"] = float(psnr(model.decode(model.encode(x)).clamp(-1, 1), ref).mean())
            out["models"].setdefault(path, {})[str(size)] = row
            print(f"{size:5d} px  {path}: fp16 output {'finite' if finite else 'inf/NaN'}"
                  + (f", PSNR vs the fp32 teacher {p:.2f} dB" if finite else "")
                  + (f" (its fp32: {row['fp32_psnr_vs_fp32_teacher']:.2f} dB)" if fp32 else ""), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--size", type=int, default=None, help="one size (same as --sizes N)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--mode", choices=["native", "emulate"], default="native")
    ap.add_argument("--no-teacher", action="store_true", help="skip the teacher's own fp16 pass")
    ap.add_argument("--fp32", action="store_true", help="also each model's fp32 output vs the teacher")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    sizes = [args.size] if args.size else args.sizes
    res = compare(args.teacher, args.models, args.images, sizes, args.limit, args.mode, not args.no_teacher, args.fp32)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
