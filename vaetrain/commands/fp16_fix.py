"""``vaetrain fp16-fix SRC OUT``: rescale a KL autoencoder's activations for fp16 without changing its output.

Measures every activation on a few images at the size the model must support, chooses one power-of-two factor per
residual segment / block interior / attention part (``vaetrain.formats.fp16_rescale``), applies them, checks that
the fp32 output did not move, audits fp16 at each of ``audit_sizes`` and writes the rescaled model (its export
records that audit: headroom per resolution in the metadata and model card, diffusers ``force_upcast: false`` when
it is fp16-safe) plus a per-layer before/after report (printed and ``OUT/fp16_fix.json``, or ``report=``).
What the rescaling cannot reach is listed; the finetune recipe (``experiment=fp16_fix``) starts from its output.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaetrain.commands.audit_fp16 import FP16_MAX, _audit_inputs, _forward, activation_stats, audit_fp16
from vaetrain.commands.images import as_model, device_of
from vaetrain.formats.export import ExportInfo
from vaetrain.formats.fp16_rescale import FP16_MIN_NORMAL, Stats, apply, choose, plan_rows, sites
from vaetrain.formats.loading import save_autoencoder
from vaetrain.metrics import psnr
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.safe import UserError, atomic_write


def _stats(raw: dict[str, dict]) -> dict[str, Stats]:
    return {n: Stats(v["max_abs"], v["rms"], v["min_group_var"]) for n, v in raw.items()}


def _measure(model, images, sizes: list[int], limit: int, dev) -> dict[str, Stats]:
    """The worst case over ``sizes``: largest maximum, smallest RMS and group variance."""
    merged: dict[str, dict] = {}
    for s in tqdm(sizes, desc="fp16-fix: measuring", unit="size"):
        for n, v in activation_stats(model, images, s, limit, dev).items():
            m = merged.setdefault(n, dict(v))
            m["max_abs"] = max(m["max_abs"], v["max_abs"])
            m["rms"] = min(m["rms"], v["rms"])
            if v["min_group_var"] is not None:
                m["min_group_var"] = min(m["min_group_var"], v["min_group_var"])
    return _stats(merged)


@torch.inference_mode()
def _output_change(before, after, images, size: int, limit: int, dev) -> dict:
    x, z = _audit_inputs(before, images, size, limit, dev)
    y0, y1 = _forward(before, x, z).float(), _forward(after, x, z).float()
    out = {"size": size, "max_abs_diff": float((y1 - y0).abs().max()),
           "max_rel_diff": float((y1 - y0).abs().max() / y0.abs().max().clamp_min(1e-12))}
    if before.has_decoder:
        out["psnr_db"] = float(psnr(y1.clamp(-1, 1), y0.clamp(-1, 1)).mean())
    return out


def fp16_fix(model, out, images=None, size: int | list[int] = 512, limit: int = 2, headroom: float = 2.0 ** 12,
             floor: float = FP16_MIN_NORMAL, eps_tol: float = 1e-5, audit_sizes: list[int] | None = (256, 512, 1024, 2048),
             audit_limit: int = 1, audit_images=None, mode: str = "emulate", format: str = "original", dtype: str = "fp32",
             device: str = "cpu", report: str | None = None, source=None, quiet: bool = False) -> dict:
    """Rescale ``model`` (an ``AutoencoderKL``) so every reachable activation stays under ``headroom``.

    ``size``: calibration size(s) (the largest the model must support, or a list), ``limit`` images each from
    ``images`` (a folder; photos are upscaled where needed) or procedural ones. ``floor``: the smallest RMS an
    activation may be scaled to (fp16's subnormals start at 2^-14). ``eps_tol``: how much a norm's eps may change
    its output, relative. ``audit_sizes`` (null: none): the fp16 audit recorded in the export, on ``audit_limit``
    images of ``audit_images`` (default: ``images``; held-out photos say more).
    Returns the report (also written as JSON).
    """
    dev = device_of(device)
    ae = as_model(model).float().eval().to(dev)
    if not isinstance(ae, AutoencoderKL):
        raise UserError(f"fp16-fix rescales KL autoencoders (AutoencoderKL); {source or 'the model'} is a "
                        f"{type(ae).__name__}")
    if not 0 < floor < headroom <= FP16_MAX:
        raise UserError(f"fp16-fix: need 0 < floor ({floor}) < headroom ({headroom}) <= {FP16_MAX}")
    sizes = [size] if isinstance(size, int) else sorted({int(s) for s in size})
    out = Path(out)
    before = _measure(ae, images, sizes, limit, dev)
    eps = min(m.eps for m in ae.modules() if isinstance(m, torch.nn.GroupNorm))
    plan = choose(sites(ae), before, headroom, floor, eps_tol, eps)
    fixed = apply(copy.deepcopy(ae), plan)
    after = _measure(fixed, images, sizes, limit, dev)
    change = _output_change(ae, fixed, images, sizes[-1], limit, dev)

    info = ExportInfo(dtype=dtype, latent_space=getattr(ae, "latent_space", None))
    written = save_autoencoder(fixed, out, format=format, info=info)  # before the (long) audit: nothing to lose
    audit = None
    if audit_sizes:
        audit = audit_fp16(fixed, audit_images or images, list(audit_sizes), audit_limit, mode, device, source=str(out), quiet=quiet)
        written = save_autoencoder(fixed, out, format=format, info=info.updated(fp16_audit=audit))

    rows = plan_rows(plan, before, after)
    result = {
        "source": str(source) if source is not None else type(ae).__name__, "out": str(written),
        "calibration": {"sizes": sizes, "images": str(images) if images else "procedural", "limit": limit},
        "headroom": headroom, "floor": floor, "eps_tol": eps_tol,
        "max_activation_before": max(s.max_abs for s in before.values()),
        "max_activation_after": max(s.max_abs for s in after.values()),
        "fp32_output_change": change,
        "factors": {s.name: {"kind": s.kind, "factor": s.factor, **({"limit": s.limit} if s.limit else {})}
                    for s in plan.sites.values()},
        "unreachable": plan.unreachable,
        "left_over_headroom": [r["name"] for r in rows if r.get("max_abs_after", 0) > headroom],
        "audit": None if audit is None else {k: audit[k] for k in ("safe", "resolutions")},
        "layers": rows,
    }
    report_path = Path(report) if report else (written if written.is_dir() else written.parent) / "fp16_fix.json"
    atomic_write(report_path, json.dumps(result, indent=2, default=_json_number) + "\n")
    result["report"] = str(report_path)
    if not quiet:
        print(_table(result))
    return result


def _json_number(v):
    return str(v)


def _table(r: dict) -> str:
    rows = [x for x in r["layers"] if x["factor"] != 1.0 or x["max_abs_before"] > r["headroom"]]
    lines = [f"fp16-fix of {r['source']}: headroom {r['headroom']:.4g}, calibrated at {r['calibration']['sizes']} px",
             f"  {'layer':<46} {'before':>10} {'factor':>9} {'after':>10}  note"]
    for x in rows:
        note = "not reachable" if not x["reachable"] else x.get("limit", "")
        if x.get("max_abs_after", 0) > r["headroom"]:
            note = (note + "; " if note else "") + "over headroom"
        lines.append(f"  {x['name'][-46:]:<46} {x['max_abs_before']:10.4g} {_pow2(x['factor']):>9} "
                     f"{x.get('max_abs_after', float('nan')):10.4g}  {note}")
    c = r["fp32_output_change"]
    lines.append(f"  largest activation {r['max_activation_before']:.4g} -> {r['max_activation_after']:.4g}; "
                 f"fp32 output change max |diff| {c['max_abs_diff']:.3g}"
                 + (f" ({c['psnr_db']:.1f} dB)" if "psnr_db" in c else ""))
    if r["left_over_headroom"]:
        lines.append(f"  left for the finetune (over the headroom after rescaling): {', '.join(r['left_over_headroom'])}")
    if r["audit"] is not None:
        res = r["audit"]["resolutions"]
        lines.append("  fp16 audit: " + ", ".join(
            f"{s} px {'finite' if v['finite'] else 'inf/NaN'} ({v['headroom']:.3g}x headroom)" for s, v in res.items())
                     + f" -> {'SAFE' if r['audit']['safe'] else 'NOT safe'}")
    lines.append(f"  wrote {r['out']} and {r['report']}")
    return "\n".join(lines)


def _pow2(f: float) -> str:
    return "1" if f == 1.0 else f"2^{int(round(math.log2(f)))}"
