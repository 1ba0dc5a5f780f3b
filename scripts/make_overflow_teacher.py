"""Build an AutoencoderKL that REALLY overflows in fp16 while its fp32 output stays the same.

Why: the SDXL VAE produces inf/NaN in fp16 because some internal activations exceed 65504, and the
fp16-fix recipe finetunes a copy until they shrink while the output stays put. To test that recipe
(and ``vaetrain audit-fp16``) without the real SDXL weights we need a teacher with the same defect.

How: in a ResnetBlock, ``conv1``'s output goes straight into ``norm2`` (GroupNorm), which divides out
any common scale: ``GN(k*h) = GN(h)`` up to its eps (1e-6 on a variance, i.e. a relative change
~eps / (2 k^2 var)). Multiplying conv1's weight and bias by ``k`` therefore leaves the fp32 output
unchanged while the activation between conv1 and norm2 grows k-fold past fp16's range. ``k`` is
chosen per block so that its largest conv1 activation on calibration images reaches ``--target``.

That alone overflows only right before a norm. ``--streams`` also inflates whole residual segments of the
encoder/decoder (every write into the segment, conv2 outputs, shortcuts, attention ``proj_out``, up/downsample convs,
and the block outputs that every later reader sees) and attention's ``v``: the reparametrisation of
``vaetrain.formats.fp16_rescale`` run backwards, by powers of two, so the fp32 output again only moves through the
norms' eps (and shrinks with it: larger activations make eps matter less).

    python scripts/make_overflow_teacher.py --out runs/overflow_teacher [--source CKPT] [--target 2e5] \
        [--streams 'decoder.stream.*' 'decoder.mid.attn_1.v'] [--stream-target 2e5]

Without ``--source`` a randomly initialised (``--arch tiny`` or the real SD ``sd`` architecture)
AutoencoderKL is used. Prints the fp32 output change and the fp16 audit before/after.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import sys
from pathlib import Path

import torch

from vaetrain.convention import uint8_to_model
from vaetrain.commands.audit_fp16 import _Recorder, audit_fp16
from vaetrain.formats.fp16_rescale import apply, sites
from vaetrain.metrics import psnr
from vaetrain.models.autoencoder_kl import AutoencoderKL, ResnetBlock

DEFAULT_BLOCKS = ("decoder.mid.block_*", "decoder.up.3.block.*")


def calibration_images(n: int = 2, size: int = 64) -> torch.Tensor:
    import numpy as np

    from vaetrain.data import synthetic_image

    arr = np.stack([np.asarray(synthetic_image(i, 0, size, size)) for i in range(n)])  # (N, S, S, 3)
    return uint8_to_model(torch.from_numpy(arr).permute(0, 3, 1, 2))  # (N, 3, S, S) in [-1, 1]


def _round_trip(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return ae.decode(ae.encode(x)) if ae.has_encoder else ae.decode(torch.randn(
        x.shape[0], ae.latent_channels, x.shape[2] // ae.downsample_factor, x.shape[3] // ae.downsample_factor,
        generator=torch.Generator().manual_seed(0)))


@torch.no_grad()
def inflate_resnets(ae: AutoencoderKL, x: torch.Tensor, patterns=DEFAULT_BLOCKS, target: float = 2e5) -> dict[str, float]:
    """Scale conv1 of every ResnetBlock matching ``patterns`` so its max |output| on ``x`` is ``target``.
    Returns {block name: k}. The model is changed in place."""
    blocks = {n: m for n, m in ae.named_modules()
              if isinstance(m, ResnetBlock) and any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not blocks:
        raise ValueError(f"no ResnetBlock matches {list(patterns)}; names look like "
                         f"{[n for n, m in ae.named_modules() if isinstance(m, ResnetBlock)][:4]}")
    peaks: dict[str, float] = {}
    hooks = [b.conv1.register_forward_hook(
        lambda _m, _a, out, n=n: peaks.__setitem__(n, max(peaks.get(n, 0.0), float(out.abs().max()))))
        for n, b in blocks.items()]
    try:
        _round_trip(ae, x)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for n, b in blocks.items():
        k = target / max(peaks[n], 1e-12)
        b.conv1.weight.mul_(k)
        b.conv1.bias.mul_(k)
        scales[n] = k
    return scales


@torch.no_grad()
def inflate_streams(ae: AutoencoderKL, x: torch.Tensor, patterns, target: float = 2e5) -> dict[str, int]:
    """Multiply every ``fp16_rescale`` site matching ``patterns`` (``decoder.stream.0``, ``encoder.mid.attn_1.v``...)
    by the power of two that takes its largest activation on ``x`` to at least ``target``. Returns {site: exponent};
    the model is changed in place."""
    plan = sites(ae)
    chosen = [s for n, s in plan.sites.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no site matches {list(patterns)}; sites are {list(plan.sites)}")
    rec = _Recorder(ae)
    try:
        _round_trip(ae, x)
    finally:
        rec.close()
    for s in chosen:
        peak = max(rec.max_abs.get(a, 0.0) for a in s.activations)
        s.exp = max(0, math.ceil(math.log2(target / peak))) if peak > 0 else 0
    apply(ae, plan)
    return {s.name: s.exp for s in chosen}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where to save the teacher (save_autoencoder path)")
    ap.add_argument("--format", default="original", choices=["original", "diffusers"])
    ap.add_argument("--source", default=None, help="an AutoencoderKL checkpoint to start from (default: random init)")
    ap.add_argument("--arch", default="tiny", choices=["tiny", "sd"], help="architecture when no --source")
    ap.add_argument("--blocks", nargs="*", default=list(DEFAULT_BLOCKS), help="fnmatch patterns of ResnetBlocks")
    ap.add_argument("--target", type=float, default=2e5, help="largest conv1 activation after scaling (> 65504)")
    ap.add_argument("--streams", nargs="*", default=[], help="fnmatch patterns of fp16_rescale sites to inflate")
    ap.add_argument("--stream-target", type=float, default=2e5, help="largest activation of an inflated site")
    ap.add_argument("--size", type=int, default=64, help="calibration/check image size")
    ap.add_argument("--audit-sizes", type=int, nargs="+", default=None,
                    help="also audit at these sizes (emulated fp16) and write the teacher's audit JSON beside it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.source:
        from vaetrain.formats import load_autoencoder

        ae = load_autoencoder(args.source)
        if not isinstance(ae, AutoencoderKL):
            raise SystemExit(f"make_overflow_teacher: {args.source} is a {type(ae).__name__}, need an AutoencoderKL")
    elif args.arch == "tiny":
        ae = AutoencoderKL(latent_channels=4, base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                           norm_groups=8, scaling_factor=0.18215)
    else:
        ae = AutoencoderKL(latent_channels=4, scaling_factor=0.18215)  # SD kl-f8 widths
    ae = ae.float().eval()
    x = calibration_images(2, args.size)
    before = copy.deepcopy(ae)
    scales = inflate_resnets(ae, x, args.blocks, args.target) if args.blocks else {}
    streams = inflate_streams(ae, x, args.streams, args.stream_target) if args.streams else {}
    with torch.no_grad():
        check = calibration_images(4, args.size)[2:]  # images not used for calibration
        y0, y1 = _round_trip(before, check), _round_trip(ae, check)
    change = {"max_abs_diff": float((y1 - y0).abs().max()), "psnr_db": float(psnr(y1, y0).mean())}
    if scales:
        print(f"scaled conv1 of {len(scales)} ResnetBlocks (k from {min(scales.values()):.3g} to {max(scales.values()):.3g})")
    if streams:
        print(f"scaled {len(streams)} residual segments / attention parts by 2^{min(streams.values())} to "
              f"2^{max(streams.values())}: {', '.join(streams)}")
    print(f"fp32 output change on held-out images: max |diff| {change['max_abs_diff']:.3g} "
          f"(of a [-1, 1] range), uint8 PSNR vs original {change['psnr_db']:.1f} dB")
    print("\nbefore:")
    audit_before = audit_fp16(before, size=args.size, limit=1, mode="auto", top=5)
    print("\nafter:")
    audit_after = audit_fp16(ae, size=args.size, limit=1, mode="auto", top=5)
    from vaetrain.formats import save_autoencoder

    path = save_autoencoder(ae, args.out, args.format)
    print(f"\nsaved {path}")
    result = {"scales": scales, "streams": streams, "fp32_change": change, "before_safe": audit_before["safe"],
              "after_safe": audit_after["safe"], "path": str(path)}
    if args.audit_sizes:
        print("\nteacher at every audited size:")
        report = Path(str(path).removesuffix(".safetensors") + "_audit.json")
        audit = audit_fp16(ae, size=args.audit_sizes, limit=1, mode="emulate", top=5, out=str(report))
        result["audit"] = {"safe": audit["safe"], "resolutions": audit["resolutions"], "path": str(report)}
        Path(str(report).removesuffix("_audit.json") + "_teacher.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
