"""Measure a trained autoencoder: reconstruction quality, fp16 safety and latent statistics.

- :func:`evaluate` (``vaetrain eval``): PSNR / SSIM / LPIPS of the model's reconstruction against
  the photo and against the teacher's reconstruction; a per-image CSV, a summary JSON and a sample
  grid (input | teacher | student).
- :func:`audit_fp16` (``vaetrain audit-fp16 SOURCE``): the largest activation of every layer in
  fp32, and whether a real fp16 pass overflows (inf/NaN) or how far it drifts from fp32.
- :func:`latent_stats` (``vaetrain latent-stats``): mean/std of the raw latents per channel and
  the scale/shift factors they imply.

Images are read with the training pipeline's own decoder (``vaetrain.data``: EXIF, modes, resize)
so numbers here and in validation agree.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.convention import model_to_uint8, uint8_to_model
from vaetrain.metrics import psnr, ssim
from vaetrain.models.base import Autoencoder

FP16_MAX = 65504.0


# --- inputs --------------------------------------------------------------------------------------

def _as_model(model, what: str = "model") -> Autoencoder:
    if isinstance(model, (str, os.PathLike, list, tuple)):
        from vaetrain.models import load_autoencoder

        model = load_autoencoder(model)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what}: expected an Autoencoder or a checkpoint path, got {type(model).__name__}")
    return model


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_images(folder, size: int | None = 256, crop: str = "center", multiple: int = 8,
                limit: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """(relative name, (3, H, W) uint8) for every image under ``folder``, sorted.

    ``size``: resize the short side to ``size`` and take a ``crop="center"`` square. ``size=None``
    (or ``crop="native"``): keep the native resolution, centre-cropped down to a multiple of
    ``multiple`` (the model's downsampling factor), e.g. Kodak 500x500 -> 496x496.
    """
    from vaetrain.data import crop_resize, list_images, open_image

    if crop not in ("center", "native"):
        raise ValueError(f"crop={crop!r} must be 'center' or 'native' (evaluation is deterministic: no random crops)")
    files = list_images(str(folder))
    if not files:
        raise ValueError(f"no images found under {folder}")
    for path in files[:limit] if limit else files:
        with open(path, "rb") as f:
            img = open_image(f.read())
        if size is None or crop == "native":
            w, h = img.size
            cw, ch = w - w % multiple, h - h % multiple
            if cw == 0 or ch == 0:
                raise ValueError(f"{path}: {w}x{h} is smaller than the model's downsampling factor {multiple}")
            left, top = (w - cw) // 2, (h - ch) // 2
            arr = np.asarray(img.crop((left, top, left + cw, top + ch)))  # (H, W, 3)
        else:
            arr = crop_resize(img, size, "center", False, random.Random(0))  # (S, S, 3)
        yield os.path.relpath(path, folder), torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, H, W)


def _batches(items: Iterator[tuple[str, Tensor]], batch_size: int) -> Iterator[tuple[list[str], Tensor]]:
    """Stack consecutive same-sized images (native-resolution folders mix sizes)."""
    names: list[str] = []
    group: list[Tensor] = []
    for name, img in items:
        if group and (len(group) == batch_size or img.shape != group[0].shape):
            yield names, torch.stack(group)
            names, group = [], []
        names.append(name)
        group.append(img)
    if group:
        yield names, torch.stack(group)  # (B, 3, H, W) uint8


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- evaluate ------------------------------------------------------------------------------------

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
    from PIL import Image

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
    dev = _device(device)
    model = _as_model(model).float().eval().to(dev)
    teacher = _as_model(teacher, "teacher").float().eval().to(dev) if teacher is not None else None
    if lpips is not None:
        lpips = lpips.to(dev).eval()
    multiple = max(int(getattr(m, "downsample_factor", 1)) for m in (model, teacher) if m is not None)
    pairs = [("student_vs_real", "student", "real")]
    if teacher is not None:
        pairs += [("student_vs_teacher", "student", "teacher"), ("teacher_vs_real", "teacher", "real")]

    rows: list[dict] = []
    grid_rows: list[list[Tensor]] = []
    for names, batch in _batches(read_images(folder, size, crop, multiple, limit), batch_size):
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
        _write_atomic(out_dir / "per_image.csv", buf.getvalue().encode())
        _write_atomic(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if grid:
            _write_atomic(out_dir / "grid.png", _grid_png(grid_rows, grid_tile))
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


# --- audit-fp16 ----------------------------------------------------------------------------------

def fp16_conv_supported(device: torch.device) -> bool:
    """Whether fp16 convolutions run on ``device`` (recent CPU builds do; older ones raise)."""
    try:
        conv = nn.Conv2d(3, 4, 3).to(device, torch.float16)
        y = conv(torch.randn(1, 3, 8, 8, device=device, dtype=torch.float16))
        return y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    except (RuntimeError, NotImplementedError):
        return False


class _Recorder:
    """Forward hooks on every submodule recording max |output| and non-finite outputs, in call order.
    With ``emulate_fp16`` each output is also rounded through fp16 (values past 65504 become inf),
    which reproduces fp16 storage of activations between layers on hardware without fp16 kernels."""

    def __init__(self, model: nn.Module, emulate_fp16: bool = False):
        self.max_abs: dict[str, float] = {}
        self.nonfinite: dict[str, bool] = {}
        self.order: list[str] = []
        self.emulate = emulate_fp16
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n]

    def _hook(self, name: str):
        def hook(_module, _args, output):
            single = isinstance(output, Tensor)
            outs = (output,) if single else tuple(output) if isinstance(output, (tuple, list)) else ()
            if self.emulate:
                outs = tuple(o.to(torch.float16).to(o.dtype) if isinstance(o, Tensor) and o.is_floating_point() else o
                             for o in outs)
            tensors = [o for o in outs if isinstance(o, Tensor) and o.is_floating_point()]
            if not tensors:
                return None
            finite = all(bool(torch.isfinite(o).all()) for o in tensors)
            peak = max(float(o.detach().abs().max()) for o in tensors)  # inf stays inf, NaN propagates
            if name not in self.max_abs:
                self.order.append(name)
            self.max_abs[name] = max(self.max_abs.get(name, 0.0), peak)
            self.nonfinite[name] = self.nonfinite.get(name, False) or not finite
            if self.emulate:
                return outs[0] if single else type(output)(outs)
            return None
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model: Autoencoder, x: Tensor | None, z: Tensor | None) -> Tensor:
    if model.has_encoder and model.has_decoder:
        return model.decode(model.encode(x))
    if model.has_decoder:
        return model.decode(z)
    return model.encode(x)


def _audit_inputs(model: Autoencoder, images, size: int, limit: int, device) -> tuple[Tensor, Tensor | None]:
    f = int(getattr(model, "downsample_factor", 8))
    if images is not None:
        batch = torch.stack([img for _, img in read_images(images, size, "center", f, limit)])
    else:
        from vaetrain.data import synthetic_image

        batch = torch.stack([torch.from_numpy(np.asarray(synthetic_image(i, 0, size, size)).copy()).permute(2, 0, 1)
                             for i in range(limit)])  # (N, 3, S, S) uint8
    x = uint8_to_model(batch.to(device))
    z = None
    if not model.has_encoder:
        # no encoder to make latents: unit-variance diffusion-space latents, as a diffusion model hands a decoder
        g = torch.Generator().manual_seed(0)
        z = torch.randn(x.shape[0], model.latent_channels, size // f, size // f, generator=g).to(device)
    return x, z


@torch.inference_mode()
def audit_fp16(model, images=None, size: int = 256, limit: int = 2, mode: str = "auto", device: str = "cpu",
               top: int = 15, source=None, out: str | None = None, quiet: bool = False) -> dict:
    """Is ``model`` safe in fp16? Per-layer activation maxima (fp32) and an fp16 pass.

    ``images``: a folder of photos (``limit`` of them at ``size`` px), else procedural images.
    ``mode``: ``"native"`` runs ``model.half()``; ``"emulate"`` runs fp32 with every module's
    output rounded through fp16 (activation overflow only, not fp16 arithmetic inside a layer);
    ``"auto"`` picks native where fp16 convolutions run on ``device`` (torch >= 2.x CPUs do, slowly).
    Prints a table (the ``top`` largest layers and every overflowing one) and returns a dict.
    """
    if mode not in ("auto", "native", "emulate"):
        raise ValueError(f"audit_fp16: mode={mode!r} must be 'auto', 'native' or 'emulate'")
    dev = _device(device)
    model = _as_model(model).float().eval().to(dev)
    x, z = _audit_inputs(model, images, size, limit, dev)

    rec32 = _Recorder(model)
    try:
        y32 = _forward(model, x, z).float()
    finally:
        rec32.close()
    if mode == "auto":
        mode = "native" if fp16_conv_supported(dev) else "emulate"
    if mode == "native":
        half = copy.deepcopy(model).half()
        rec16 = _Recorder(half)
        try:
            y16 = _forward(half, x.half() if x is not None else None, z.half() if z is not None else None).float()
        finally:
            rec16.close()
        del half
    else:
        rec16 = _Recorder(model, emulate_fp16=True)
        try:
            y16 = _forward(model, x, z).float()
        finally:
            rec16.close()

    layers = [{"name": n, "max_abs": rec32.max_abs[n], "overflow": rec32.max_abs[n] > FP16_MAX,
               "fp16_max_abs": rec16.max_abs.get(n), "fp16_nonfinite": rec16.nonfinite.get(n, False)}
              for n in rec32.order]
    overflowing = [l["name"] for l in layers if l["overflow"]]
    first_bad = next((n for n in rec16.order if rec16.nonfinite[n]), None)
    finite16 = bool(torch.isfinite(y16).all())
    is_image = model.has_decoder
    if finite16 and is_image:
        fidelity = float(psnr(y16.clamp(-1, 1), y32.clamp(-1, 1)).mean())
    elif finite16:
        fidelity = float((y16 - y32).norm() / y32.norm().clamp_min(1e-12))
    else:
        fidelity = None
    result = {
        "model": str(source) if source is not None else type(model).__name__,
        "inputs": f"{x.shape[0]} x {tuple(x.shape[1:])} from {images if images is not None else 'procedural images'}",
        "fp16_mode": mode,
        "max_activation": max(l["max_abs"] for l in layers),
        "max_activation_layer": max(layers, key=lambda l: l["max_abs"])["name"],
        "overflowing_layers": overflowing,
        "fp16_output_finite": finite16,
        "fp16_first_nonfinite_layer": first_bad,
        "fp16_psnr_vs_fp32" if is_image else "fp16_rel_error_vs_fp32": fidelity,
        "safe": finite16 and not overflowing,
        "layers": layers,
    }
    if out is not None:
        _write_atomic(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    if not quiet:
        print(_audit_table(result, top))
    return result


def _audit_table(r: dict, top: int) -> str:
    layers = r["layers"]
    shown = sorted(layers, key=lambda l: -l["max_abs"])[:top]
    shown += [l for l in layers if l["overflow"] and l not in shown]
    lines = [f"fp16 audit of {r['model']} on {r['inputs']} (fp16 pass: {r['fp16_mode']}"
             f"{', outputs rounded through fp16 at every module' if r['fp16_mode'] == 'emulate' else ''})",
             f"  {'layer':<48} {'max |a| fp32':>13} {'max |a| fp16':>13}  flag"]
    for l in shown:
        f16 = "inf/nan" if l["fp16_nonfinite"] else (f"{l['fp16_max_abs']:13.4g}" if l["fp16_max_abs"] is not None else "-")
        flag = "OVERFLOW" if l["overflow"] else ("near" if l["max_abs"] > FP16_MAX / 4 else "")
        lines.append(f"  {l['name'][-48:]:<48} {l['max_abs']:13.4g} {f16:>13}  {flag}")
    key = "fp16_psnr_vs_fp32" if "fp16_psnr_vs_fp32" in r else "fp16_rel_error_vs_fp32"
    fid = r[key]
    lines.append(f"  largest activation {r['max_activation']:.4g} at {r['max_activation_layer']}; "
                 f"{len(r['overflowing_layers'])} layer(s) exceed fp16's 65504")
    lines.append(f"  fp16 output: {'finite' if r['fp16_output_finite'] else 'inf/NaN (first at ' + str(r['fp16_first_nonfinite_layer']) + ')'}"
                 + (f", {key} = {fid:.4g}" if fid is not None else ""))
    lines.append(f"  verdict: {'SAFE in fp16' if r['safe'] else 'NOT safe in fp16'}")
    return "\n".join(lines)


# --- latent-stats --------------------------------------------------------------------------------

def _stat_batches(data, size, crop, multiple, limit, batch_size) -> Iterator[Tensor]:
    """Image batches from a folder, or from any iterable of batches (a DataLoader of the training data
    module: dicts with "image", uint8 or [-1, 1] float); ``limit`` counts images."""
    if isinstance(data, (str, os.PathLike)):
        for _, batch in _batches(read_images(data, size, crop, multiple, limit), batch_size):
            yield batch
        return
    seen = 0
    for batch in data:
        img = batch["image"] if isinstance(batch, dict) else batch
        if limit is not None:
            img = img[: limit - seen]
        seen += img.shape[0]
        yield img
        if limit is not None and seen >= limit:
            return


@torch.inference_mode()
def latent_stats(model, folder, size: int | None = 256, crop: str = "center", batch_size: int = 4,
                 limit: int | None = None, sample: bool = False, device: str = "cpu", out: str | None = None,
                 quiet: bool = False) -> dict:
    """Per-channel and global mean/std of ``model``'s RAW latents over the images of ``folder``
    (an image folder, or an iterable of batches such as the training data module's loader).

    Suggests, for this data: ``shift_factor = mean`` and ``scaling_factor = 1/std`` (SD3/FLUX
    convention: diffusion latents zero-mean, unit-variance) and the scale-only SD convention
    ``scaling_factor = 1/std`` with shift 0 (latent-diffusion measured the std of one batch), plus
    ``1/rms`` (unit second moment without a shift). Accumulated in float64 over all pixels.
    """
    dev = _device(device)
    model = _as_model(model).float().eval().to(dev)
    if not model.has_encoder:
        raise ValueError("latent_stats needs a model with an encoder (this one is decoder-only)")
    f = int(getattr(model, "downsample_factor", 8))
    n = s1 = s2 = None
    images = 0
    for batch in _stat_batches(folder, size, crop, f, limit, batch_size):
        x = uint8_to_model(batch.to(dev)) if batch.dtype == torch.uint8 else batch.to(dev).float()
        z = model.encode_raw(x, sample=sample).double()  # (B, C, h, w) raw
        zc = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, B*h*w)
        if s1 is None:
            n, s1, s2 = 0, torch.zeros(z.shape[1], dtype=torch.float64, device=dev), torch.zeros(
                z.shape[1], dtype=torch.float64, device=dev)
        n += zc.shape[1]
        s1 += zc.sum(1)
        s2 += zc.pow(2).sum(1)
        images += z.shape[0]
    if s1 is None:
        raise ValueError(f"no images found in {folder}")
    mean_c = s1 / n
    std_c = (s2 / n - mean_c**2).clamp_min(0).sqrt()
    mean = float(s1.sum() / (n * len(s1)))
    second = float(s2.sum() / (n * len(s2)))
    std = math.sqrt(max(second - mean**2, 0.0))
    cur_scale, cur_shift = float(model.scaling_factor), float(model.shift_factor)
    result = {
        "folder": str(folder) if isinstance(folder, (str, os.PathLike)) else type(folder).__name__,
        "images": images,
        "latent_channels": len(s1),
        "sample": sample,
        "mean": mean,
        "std": std,
        "rms": math.sqrt(second),
        "per_channel_mean": mean_c.tolist(),
        "per_channel_std": std_c.tolist(),
        "suggested": {
            "shift_and_scale": {"shift_factor": mean, "scaling_factor": 1.0 / std},
            "scale_only": {"shift_factor": 0.0, "scaling_factor": 1.0 / std},
            "scale_only_rms": {"shift_factor": 0.0, "scaling_factor": 1.0 / math.sqrt(second)},
        },
        "current": {"shift_factor": cur_shift, "scaling_factor": cur_scale,
                    # what the model's current factors make of these latents: ideally mean 0, std 1
                    "diffusion_mean": (mean - cur_shift) * cur_scale, "diffusion_std": std * cur_scale},
    }
    if out is not None:
        _write_atomic(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    if not quiet:
        print(_stats_table(result))
    return result


def _stats_table(r: dict) -> str:
    lines = [f"raw latent statistics over {r['images']} images of {r['folder']} "
             f"({'posterior samples' if r['sample'] else 'posterior means'})",
             f"  {'channel':>7} {'mean':>10} {'std':>10}"]
    for c, (m, s) in enumerate(zip(r["per_channel_mean"], r["per_channel_std"])):
        lines.append(f"  {c:>7} {m:10.4f} {s:10.4f}")
    lines.append(f"  {'all':>7} {r['mean']:10.4f} {r['std']:10.4f}   (rms {r['rms']:.4f})")
    sug, cur = r["suggested"], r["current"]
    lines.append(f"  SD3/FLUX convention: shift_factor={sug['shift_and_scale']['shift_factor']:.4f} "
                 f"scaling_factor={sug['shift_and_scale']['scaling_factor']:.4f}")
    lines.append(f"  SD convention (no shift): scaling_factor={sug['scale_only']['scaling_factor']:.4f} "
                 f"(1/rms: {sug['scale_only_rms']['scaling_factor']:.4f})")
    lines.append(f"  current factors (shift {cur['shift_factor']:g}, scale {cur['scaling_factor']:g}) give diffusion "
                 f"latents of mean {cur['diffusion_mean']:.4f}, std {cur['diffusion_std']:.4f}")
    return "\n".join(lines)
