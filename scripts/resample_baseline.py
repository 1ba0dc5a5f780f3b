"""The floor a learned autoencoder must clear: area-downsample f x, then upsample bicubic.

A KL or TAESD autoencoder at f=4 keeps C x H/4 x W/4 numbers; plain resampling keeps 3 x H/4 x W/4 and needs no
training. This scores that baseline with ``vaetrain.commands.eval.evaluate`` (the same image reading, PSNR / SSIM and
LPIPS-like as ``vaetrain eval`` and training validation), so a trained model's numbers can be put next to it. With no
arguments: the default job's validation photos (shipped in the package) at its validation size:

    python scripts/resample_baseline.py
    python scripts/resample_baseline.py --folder ../shared/assets/images/eval/kodak24 --size 32 \
        --lpips-backbone ../shared/assets/weights/squeezenet1_1_caffe_features.pth
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from vaetrain.commands.eval import evaluate
from vaetrain.data.embedded import photos_dir
from vaetrain.losses import LPIPS
from vaetrain.models.base import Autoencoder


class Resample(Autoencoder):
    """'Latents' are the area-downsampled image (B, 3, H/f, W/f); decoding is bicubic upsampling."""

    scaling_factor, shift_factor = 1.0, 0.0

    def __init__(self, factor: int):
        super().__init__()
        self.latent_channels, self.downsample_factor = 3, factor
        self.encoder, self.decoder = torch.nn.Identity(), torch.nn.Identity()  # present, so both halves "exist"

    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return F.interpolate(x, scale_factor=1 / self.downsample_factor, mode="area")

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z_raw, scale_factor=self.downsample_factor, mode="bicubic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", default=photos_dir("val"))
    p.add_argument("--size", type=int, default=64, help="short side resized to this, centre crop (as validation)")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--lpips-backbone", default="",
                   help="Caffe SqueezeNet features for the offline LPIPS-like (the shared assets'; '' skips LPIPS)")
    args = p.parse_args()
    lpips = (LPIPS(mode="caffe_squeeze", net="squeeze", pretrained=False, backbone_weights=args.lpips_backbone)
             if args.lpips_backbone else None)
    summary = evaluate(Resample(args.factor), args.folder, size=args.size, lpips=lpips, grid=0, quiet=True)
    print(json.dumps({"baseline": f"area down {args.factor}x + bicubic up", **summary}, indent=2))


if __name__ == "__main__":
    main()
