"""``vaetrain eval``: PSNR / SSIM / LPIPS of a model's reconstruction against the photo and against the
teacher's reconstruction; a per-image CSV, a summary JSON and a sample grid (input | teacher | student)."""

from __future__ import annotations

import csv
import json
import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vaetrain.commands.images import as_model, batches, device_of, read_images
from vaetrain.convention import model_to_uint8, uint8_to_model
from vaetrain.metrics import psnr, ssim
from vaetrain.models.base import Autoencoder
from vaetrain.safe import atomic_write


def _reconstruct(model: Autoencoder, teacher: Autoencoder | None, x: Tensor) -> Tensor:
    """The student's image for photo ``x``: its round trip, or for half models the teacher's other half."""
    if model.has_encoder and model.has_decoder:
        return model.decode(model.encode(x))
    if teacher is None:
        half = "decoder" if model.has_decoder else "encoder"
        raise ValueError(f"the model is {half}-only: give a teacher (teacher=NAME or teacher.source=PATH) "
                         f"to supply the {'latents' if half == 'decoder' else 'decoder'}")
    if model.has_decoder:
        return model.decode(teacher.encode(x))
    return teacher.decode(model.encode(x))


def _tile(img: Tensor, tile: int) -> Tensor:
    """(3, H, W) in [-1, 1] -> (3, tile, tile') keeping the aspect ratio of the short side."""
    h, w = img.shape[-2:]
    s = tile / min(h, w)
    out = F.interpolate(img[None].float(), size=(round(h * s), round(w * s)), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    top, left = (out.shape[1] - tile) // 2, (out.shape[2] - tile) // 2
    return out[:, top:top + tile, left:left + tile]  # (3, tile, tile)


def _grid_png(rows: list[list[Tensor]], tile: int = 256) -> bytes:
    """Rows of [-1, 1] images -> one PNG, each row input | teacher | student."""
    pad = 4
    cols = max(len(r) for r in rows)
    canvas = torch.ones(3, len(rows) * (tile + pad) + pad, cols * (tile + pad) + pad)  # white
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (tile + pad), pad + j * (tile + pad)
            canvas[:, y:y + tile, x:x + tile] = _tile(img, tile).clamp(-1, 1)
    arr = model_to_uint8(canvas).permute(1, 2, 0).numpy()  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@torch.inference_mode()
def evaluate(model, folder, teacher=None, size: int | None = 256, crop: str = "center", lpips=None,
             batch_size: int = 4, limit: int | None = None, out: str | None = None, device: str = "cpu",
             grid: int = 8, grid_tile: int = 256, quiet: bool = False) -> dict:
    """PSNR / SSIM (uint8, per image) and LPIPS of ``model`` on the images of ``folder``.

    The student image is the model's round trip; a decoder-only model decodes the teacher's
    latents and an encoder-only one is decoded by the teacher. Compared with the photo
    (``student_vs_real``) and, given a ``teacher``, with the teacher's round trip
    (``student_vs_teacher``) and the teacher with the photo (``teacher_vs_real``, the ceiling).
    ``lpips``: a :class:`vaetrain.losses.LPIPS` (its ``mode_name`` is recorded) or ``None``.
    ``out``: a folder for ``per_image.csv``, ``summary.json`` and ``grid.png`` (input | teacher | student).
    Returns the summary dict.
    """
    t0 = time.time()
    dev = device_of(device)
    model = as_model(model).float().eval().to(dev)
    teacher = as_model(teacher, "teacher").float().eval().to(dev) if teacher is not None else None
    if lpips is not None:
        lpips = lpips.to(dev).eval()
    multiple = max(int(getattr(m, "downsample_factor", 1)) for m in (model, teacher) if m is not None)
    pairs = [("student_vs_real", "student", "real")]
    if teacher is not None:
        pairs += [("student_vs_teacher", "student", "teacher"), ("teacher_vs_real", "teacher", "real")]

    rows: list[dict] = []
    grid_rows: list[list[Tensor]] = []
    for names, batch in batches(read_images(folder, size, crop, multiple, limit), batch_size):
        real = uint8_to_model(batch.to(dev))  # (B, 3, H, W) in [-1, 1]
        imgs = {"real": real, "student": _reconstruct(model, teacher, real).float().clamp(-1, 1)}
        if teacher is not None:
            imgs["teacher"] = teacher(real).float().clamp(-1, 1)
        per = {n: {"image": n, "height": real.shape[-2], "width": real.shape[-1]} for n in names}
        for key, a, b in pairs:
            cols = {"psnr": psnr(imgs[a], imgs[b]), "ssim": ssim(imgs[a], imgs[b])}
            if lpips is not None:
                cols["lpips"] = lpips.distance(imgs[a], imgs[b])
            for metric, values in cols.items():
                for n, v in zip(names, values.tolist()):
                    per[n][f"{key}_{metric}"] = v
        rows += per.values()
        for i in range(len(names)):
            if len(grid_rows) < grid:
                grid_rows.append([imgs[k][i].cpu() for k in ("real", "teacher", "student") if k in imgs])

    if not rows:
        raise ValueError(f"no images evaluated from {folder}")
    metric_keys = [k for k in rows[0] if k not in ("image", "height", "width")]
    summary = {
        "folder": str(folder),
        "images": len(rows),
        "size": size,
        "crop": "native" if size is None else crop,
        "lpips": getattr(lpips, "mode_name", None),
        "model": type(model).__name__,
        "teacher": type(teacher).__name__ if teacher is not None else None,
        "seconds": round(time.time() - t0, 2),
    }
    for key, _, _ in pairs:
        summary[key] = {k[len(key) + 1:]: float(np.mean([r[k] for r in rows])) for k in metric_keys
                        if k.startswith(key + "_")}
    if out is not None:
        out_dir = Path(out)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out_dir / "per_image.csv", buf.getvalue().encode())
        atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if grid:
            atomic_write(out_dir / "grid.png", _grid_png(grid_rows, grid_tile))
        summary["out"] = str(out_dir)
    if not quiet:
        print(_summary_table(summary, [k for k, _, _ in pairs]))
    return summary


def _summary_table(summary: dict, keys: list[str]) -> str:
    lines = [f"{summary['images']} images from {summary['folder']} (size={summary['size']}, crop={summary['crop']}, "
             f"LPIPS={summary['lpips'] or 'off'}, {summary['seconds']} s)",
             f"  {'':<20} {'PSNR dB':>8} {'SSIM':>7} {'LPIPS':>7}"]
    for key in keys:
        m = summary[key]
        lp = f"{m['lpips']:7.4f}" if "lpips" in m else f"{'-':>7}"
        lines.append(f"  {key:<20} {m['psnr']:8.2f} {m['ssim']:7.4f} {lp}")
    if "out" in summary:
        lines.append(f"  wrote {summary['out']}/per_image.csv, summary.json, grid.png")
    return "\n".join(lines)
