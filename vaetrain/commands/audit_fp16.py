"""``vaetrain audit-fp16 SOURCE``: the largest activation of every layer in fp32, and whether a real fp16
pass overflows (inf/NaN) or how far it drifts from fp32."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vaetrain.commands.images import as_model, device_of, read_images
from vaetrain.convention import uint8_to_model
from vaetrain.data import synthetic_image
from vaetrain.metrics import psnr
from vaetrain.models.base import Autoencoder
from vaetrain.safe import atomic_write

FP16_MAX = 65504.0


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
    which reproduces fp16 storage of activations between layers on hardware without fp16 kernels.
    ``rms`` (the smallest RMS of an output over calls) and, for GroupNorms, ``min_group_var`` (the smallest variance
    of one image's group of the INPUT) are what the fp16-fix rescaling needs to stay exact and above subnormals."""

    def __init__(self, model: nn.Module, emulate_fp16: bool = False, detail: bool = False):
        self.max_abs: dict[str, float] = {}
        self.rms: dict[str, float] = {}
        self.min_group_var: dict[str, float] = {}
        self.nonfinite: dict[str, bool] = {}
        self.order: list[str] = []
        self.emulate, self.detail = emulate_fp16, detail
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n]

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.detail and isinstance(module, nn.GroupNorm) and args and isinstance(args[0], Tensor):
                x = args[0].detach()
                var = float(x.reshape(x.shape[0], module.num_groups, -1).float().var(-1, unbiased=False).min())
                self.min_group_var[name] = min(self.min_group_var.get(name, math.inf), var)
            single = isinstance(output, Tensor)
            outs = (output,) if single else tuple(output) if isinstance(output, (tuple, list)) else ()
            if self.emulate:
                outs = tuple(o.to(torch.float16).to(o.dtype) if isinstance(o, Tensor) and o.is_floating_point() else o
                             for o in outs)
            tensors = [o.detach() for o in outs if isinstance(o, Tensor) and o.is_floating_point()]
            if not tensors:
                return None
            # one pass each, no temporaries the size of the activation (2048 px audits): the extremes carry inf and
            # NaN along, so they also say whether everything is finite
            peaks = [max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(o) for o in tensors)]
            peaks = [math.inf if math.isnan(p) else p for p in peaks]
            peak = max(peaks)
            finite = math.isfinite(peak)
            if self.detail:
                rms = min(float(torch.linalg.vector_norm(o, dtype=torch.float32)) / math.sqrt(max(o.numel(), 1))
                          for o in tensors)
                self.rms[name] = min(self.rms.get(name, math.inf), rms)
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
        batch = torch.stack([torch.from_numpy(np.asarray(synthetic_image(i, 0, size, size)).copy()).permute(2, 0, 1)
                             for i in range(limit)])  # (N, 3, S, S) uint8
    x = uint8_to_model(batch.to(device))
    z = None
    if not model.has_encoder:
        # no encoder to make latents: unit-variance diffusion-space latents, as a diffusion model hands a decoder
        g = torch.Generator().manual_seed(0)
        z = torch.randn(x.shape[0], model.latent_channels, size // f, size // f, generator=g).to(device)
    return x, z


def activation_stats(model: Autoencoder, images=None, size: int = 256, limit: int = 2,
                     device: str | torch.device = "cpu") -> dict[str, dict]:
    """fp32 pass: per module (call order) its max |output|, smallest output RMS and, for GroupNorms, the smallest
    (image, group) variance of its input."""
    dev = device if isinstance(device, torch.device) else device_of(device)
    model = as_model(model).float().eval().to(dev)
    x, z = _audit_inputs(model, images, size, limit, dev)
    rec = _Recorder(model, detail=True)
    try:
        with torch.inference_mode():
            _forward(model, x, z)
    finally:
        rec.close()
    return {n: {"max_abs": rec.max_abs[n], "rms": rec.rms[n], "min_group_var": rec.min_group_var.get(n)}
            for n in rec.order}


def audit_fp16(model, images=None, size: int | list[int] = (256, 512, 1024, 2048), limit: int = 2, mode: str = "auto",
               device: str = "cpu", top: int = 15, source=None, out: str | None = None, quiet: bool = False) -> dict:
    """Is ``model`` safe in fp16? Per-layer activation maxima (fp32) and an fp16 pass, at one ``size`` or each of
    a list of them (the default: 256, 512, 1024 and 2048 px; activations grow with the image, so a model safe at
    256 px can overflow at 1024).

    ``images``: a folder of photos (``limit`` of them, resized so the short side is ``size`` and centre-cropped:
    larger sizes upscale them), else procedural images.
    ``mode``: ``"native"`` runs ``model.half()``; ``"emulate"`` runs fp32 with every module's
    output rounded through fp16 (activation overflow only, not fp16 arithmetic inside a layer);
    ``"auto"``: native on GPUs; on a CPU native only up to 256 px where fp16 convolutions run at all (they run
    ~100x slower than fp32 there), emulated above.
    Prints a table (the ``top`` largest layers and every overflowing one) and returns a dict; with a list of sizes
    its ``resolutions`` holds, per size, the verdict and the headroom (65504 / largest activation) and
    ``per_size`` the full single-size results.
    """
    if mode not in ("auto", "native", "emulate"):
        raise ValueError(f"audit_fp16: mode={mode!r} must be 'auto', 'native' or 'emulate'")
    dev = device_of(device)
    model = as_model(model).float().eval().to(dev)
    if isinstance(size, int):
        result = _audit_one(model, images, size, limit, mode, dev, source)
        text = _audit_table(result, top)
    else:
        sizes = sorted({int(s) for s in size})
        if not sizes:
            raise ValueError("audit_fp16: size is an empty list")
        per_size = {}
        for s in tqdm(sizes, desc="audit-fp16", unit="size", disable=quiet):
            per_size[str(s)] = _audit_one(model, images, s, limit, mode, dev, source)
        result = _multi(per_size)
        text = "\n\n".join([_audit_table(per_size[str(sizes[-1])], top), _resolution_table(result)])
    if out is not None:
        atomic_write(Path(out), (json.dumps(result, indent=2) + "\n").encode())
    if not quiet:
        print(text)
    return result


def headroom(max_abs: float) -> float:
    """How many times the largest activation could grow before it passes fp16's max (0 when it already has)."""
    return FP16_MAX / max_abs if math.isfinite(max_abs) and max_abs > 0 else (math.inf if max_abs == 0 else 0.0)


def _multi(per_size: dict[str, dict]) -> dict:
    first = next(iter(per_size.values()))
    worst = max(per_size.values(), key=lambda r: r["max_activation"])
    resolutions = {}
    for s, r in per_size.items():
        key = "fp16_psnr_vs_fp32" if "fp16_psnr_vs_fp32" in r else "fp16_rel_error_vs_fp32"
        resolutions[s] = {"safe": r["safe"], "finite": r["fp16_output_finite"], "max_abs": r["max_activation"],
                          "max_activation_layer": r["max_activation_layer"], "headroom": headroom(r["max_activation"]),
                          "headroom_log2": math.log2(headroom(r["max_activation"])) if 0 < headroom(
                              r["max_activation"]) < math.inf else None,
                          "fp16_mode": r["fp16_mode"], key: r[key]}
    return {
        "model": first["model"], "inputs": first["inputs"], "sizes": [int(s) for s in per_size],
        "safe": all(r["safe"] for r in per_size.values()),
        "fp16_output_finite": all(r["fp16_output_finite"] for r in per_size.values()),
        "max_activation": worst["max_activation"], "max_activation_layer": worst["max_activation_layer"],
        "overflowing_layers": sorted({n for r in per_size.values() for n in r["overflowing_layers"]}),
        "resolutions": resolutions, "per_size": per_size,
    }


def _resolution_table(r: dict) -> str:
    lines = [f"  {'size':>6} {'largest |a|':>12} {'headroom':>10}  {'fp16 output':<12} {'vs fp32':>8}  verdict"]
    for s, v in r["resolutions"].items():
        fid = v.get("fp16_psnr_vs_fp32", v.get("fp16_rel_error_vs_fp32"))
        lines.append(f"  {s:>6} {v['max_abs']:12.4g} {v['headroom']:9.3g}x  {'finite' if v['finite'] else 'inf/NaN':<12} "
                     f"{'-' if fid is None else format(fid, '.4g'):>8}  {'safe' if v['safe'] else 'NOT safe'}")
    lines.append(f"  verdict over all sizes: {'SAFE in fp16' if r['safe'] else 'NOT safe in fp16'}")
    return "\n".join(lines)


@torch.inference_mode()
def _audit_one(model: Autoencoder, images, size: int, limit: int, mode: str, dev: torch.device, source) -> dict:
    x, z = _audit_inputs(model, images, size, limit, dev)
    rec32 = _Recorder(model)
    try:
        y32 = _forward(model, x, z).float()
    finally:
        rec32.close()
    if mode == "auto":
        mode = "native" if (dev.type != "cpu" or size <= 256) and fp16_conv_supported(dev) else "emulate"
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
