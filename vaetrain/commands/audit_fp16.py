"""``vaetrain audit-fp16 SOURCE``: the largest activation of every layer in fp32, and whether a real fp16
pass overflows (inf/NaN) or how far it drifts from fp32."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

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
    dev = device_of(device)
    model = as_model(model).float().eval().to(dev)
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
        atomic_write(Path(out), (json.dumps(result, indent=2) + "\n").encode())
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
