"""KL-regularised autoencoder of SD1/SD2, SDXL, SD3, FLUX.1 and FLUX.2 (LDM "kl-f8" family).

Compact in the style of FLUX's autoencoder.py. Parameter names follow the ORIGINAL LDM/SGM/BFL
layout (``encoder.down.{i}.block.{j}``, ``mid.attn_1.q`` as 1x1 convs, ``quant_conv``), so an
original checkpoint loads (nearly) as is; ``vaetrain.formats.kl`` maps the diffusers layout.

FLUX.2 (``flux2=True``) keeps its quant convs inside the encoder/decoder and holds a
``BatchNorm2d(affine=False)`` whose running stats normalise the 2x2-patchified mean for the
transformer. ``encode``/``decode`` stay in the 32-channel H/8 space that ``vae.decode`` and TAEF2 use
(scale 1, shift 0); ``normalize_latents`` / ``denormalize_latents`` map to and from the
transformer's 128-channel H/16 space exactly as BFL's ``AutoEncoder.encode``/``decode`` do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from vaetrain.models.base import Autoencoder

LOGVAR_RANGE = (-30.0, 20.0)


def conv(n_in: int, n_out: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, k, stride=stride, padding=k // 2 if padding is None else padding)


def norm(n: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, n, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = norm(n_in, groups), conv(n_in, n_out)
        self.norm2, self.conv2 = norm(n_out, groups), conv(n_out, n_out)
        self.nin_shortcut = conv(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


SCORE_BLOCK = 2 ** 28  # query chunks keep each (queries x keys) score block under this many elements


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` over query chunks: the same result, but where a kernel materialises the
    score matrix (CPU) a 2048 px image's 65536 tokens would need 16 GiB for it at once."""
    n = q.shape[2]
    chunk = max(1, SCORE_BLOCK // max(k.shape[2], 1))
    if n <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v) for i in range(0, n, chunk)], dim=2)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (the midblock's only global mixing)."""

    def __init__(self, n: int, groups: int):
        super().__init__()
        self.norm = norm(n, groups)
        self.q, self.k, self.v, self.proj_out = (conv(n, n, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, tokens are pixels
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        y = _attention(q, k, v)
        y = y.transpose(2, 3).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = conv(n, n, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric pad (right/bottom only): the original LDM convention every checkpoint was trained with
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = conv(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, n: int, groups: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(n, n, groups)
        self.attn_1 = AttnBlock(n, groups) if attention else None
        self.block_2 = ResnetBlock(n, n, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Level(nn.Module):
    """One resolution: ``block`` resnets plus an optional resampler (``downsample`` or ``upsample``)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None, upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample


def _run(block: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    # gradient checkpointing recomputes the block in backward instead of keeping its activations: the memory of a
    # full-size student at 512-1024 px, for ~30% more compute
    return checkpoint(block, h, use_reentrant=False) if checkpointing and torch.is_grad_enabled() else block(h)


class Encoder(nn.Module):
    checkpointing = False

    def __init__(self, in_channels: int, latent_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attention: bool, groups: int, inner_quant_conv: bool = False):
        super().__init__()
        self.conv_in = conv(in_channels, ch)
        self.down = nn.ModuleList()
        n_in = ch
        for i, m in enumerate(ch_mult):
            n_out = ch * m
            blocks = [ResnetBlock(n_in if j == 0 else n_out, n_out, groups) for j in range(num_res_blocks)]
            self.down.append(Level(blocks, downsample=Downsample(n_out) if i < len(ch_mult) - 1 else None))
            n_in = n_out
        self.mid = Mid(n_in, groups, attention)
        self.norm_out = norm(n_in, groups)
        self.conv_out = conv(n_in, 2 * latent_channels)  # (mean, logvar)
        # FLUX.2 keeps its quant conv inside the encoder
        self.quant_conv = conv(2 * latent_channels, 2 * latent_channels, 1) if inner_quant_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = _run(block, h, self.checkpointing)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(_run(self.mid, h, self.checkpointing))))  # (B, 2C, H/f, W/f)
        return h if self.quant_conv is None else self.quant_conv(h)


class Decoder(nn.Module):
    checkpointing = False

    def __init__(self, out_channels: int, latent_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attention: bool, groups: int, inner_quant_conv: bool = False):
        super().__init__()
        self.post_quant_conv = conv(latent_channels, latent_channels, 1) if inner_quant_conv else None
        n = ch * ch_mult[-1]
        self.conv_in = conv(latent_channels, n)
        self.mid = Mid(n, groups, attention)
        # built deepest-first but stored shallow-first: ``up.{i}`` runs at the resolution of ``down.{i}``
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            n_out = ch * ch_mult[i]
            blocks = [ResnetBlock(n if j == 0 else n_out, n_out, groups) for j in range(num_res_blocks + 1)]
            levels.insert(0, Level(blocks, upsample=Upsample(n_out) if i > 0 else None))
            n = n_out
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(n, groups)
        self.conv_out = conv(n, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = _run(self.mid, self.conv_in(z), self.checkpointing)
        for level in reversed(self.up):
            for block in level.block:
                h = _run(block, h, self.checkpointing)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H, W)


@dataclass(frozen=True)
class AutoencoderKLParams:
    """Everything that defines an ``AutoencoderKL`` (see ``vaetrain.models.presets`` for the public models' values)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    encoder_attention: bool = True
    decoder_attention: bool = True
    use_quant_conv: bool = True
    flux2: bool = False
    norm_groups: int = 32
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    encoder: bool = True
    decoder: bool = True

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise what configs hand over (lists, ints for floats)
        set_(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        set_(self, "scaling_factor", float(self.scaling_factor))
        set_(self, "shift_factor", float(self.shift_factor))
        if self.flux2 and self.use_quant_conv:
            set_(self, "use_quant_conv", False)  # FLUX.2's quant convs live inside encoder/decoder instead
        for n in sorted({self.base_channels * m for m in self.channel_mult}):
            if n % self.norm_groups:
                raise ValueError(f"AutoencoderKL: width {n} is not divisible by norm_groups={self.norm_groups}; "
                                 f"pick base_channels/channel_mult/norm_groups that divide")


class AutoencoderKL(Autoencoder):
    """Gaussian-posterior conv autoencoder; variants are explicit flags (see ``vaetrain.models.presets``)."""

    Params = AutoencoderKLParams

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        encoder_attention: bool = True,
        decoder_attention: bool = True,
        use_quant_conv: bool = True,
        flux2: bool = False,
        norm_groups: int = 32,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        encoder: bool = True,
        decoder: bool = True,
    ):
        super().__init__()
        self.params = p = AutoencoderKLParams(in_channels, out_channels, latent_channels, base_channels, channel_mult,
                                              num_res_blocks, encoder_attention, decoder_attention, use_quant_conv,
                                              flux2, norm_groups, scaling_factor, shift_factor, encoder, decoder)
        self.latent_channels = p.latent_channels
        self.downsample_factor = 2 ** (len(p.channel_mult) - 1)
        self.scaling_factor = p.scaling_factor
        self.shift_factor = p.shift_factor
        arch = (p.latent_channels, p.base_channels, p.channel_mult, p.num_res_blocks)
        self.encoder = Encoder(p.in_channels, *arch, p.encoder_attention, p.norm_groups, p.flux2) if encoder else None
        self.decoder = Decoder(p.out_channels, *arch, p.decoder_attention, p.norm_groups, p.flux2) if decoder else None
        n = 2 * p.latent_channels
        self.quant_conv = conv(n, n, 1) if p.use_quant_conv and encoder else None
        self.post_quant_conv = conv(p.latent_channels, p.latent_channels, 1) if p.use_quant_conv and decoder else None
        # FLUX.2: running stats of the patchified mean; eval-mode only, never trained
        self.bn = nn.BatchNorm2d(4 * p.latent_channels, eps=1e-4, momentum=0.1, affine=False) if p.flux2 else None

    # --- posterior -------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)  # (B, C, H/f, W/f) each
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_raw(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        mean, logvar = self.posterior(x)
        if not sample:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def decode_raw(self, z_raw: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z_raw = self.post_quant_conv(z_raw)
        return self.decoder(z_raw)

    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute every resnet block and midblock in backward (training memory, not architecture)."""
        for half in (self.encoder, self.decoder):
            if half is not None:
                half.checkpointing = on

    # --- FLUX.2 transformer space ----------------------------------------------------------
    def normalize_latents(self, z_raw: torch.Tensor) -> torch.Tensor:
        """FLUX.2: raw (B, C, H, W) -> 2x2-patchified, BN-normalised (B, 4C, H/2, W/2), as BFL's encode."""
        if self.bn is None:
            raise ValueError("normalize_latents is only defined for FLUX.2 models (flux2=True)")
        b, c, h, w = z_raw.shape
        z = z_raw.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        z = z.reshape(b, c * 4, h // 2, w // 2)  # (B, 4C, H/2, W/2), channel order (c, pi, pj)
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """FLUX.2: inverse of ``normalize_latents``: (B, 4C, H/2, W/2) -> raw (B, C, H, W)."""
        if self.bn is None:
            raise ValueError("denormalize_latents is only defined for FLUX.2 models (flux2=True)")
        mean, std = self._bn_stats(z)
        z = z * std + mean
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return z.reshape(b, c4 // 4, h * 2, w * 2)  # (B, C, H, W)

    def _bn_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps).to(z)
        return mean, std
