"""AutoencoderKL checkpoints: detection, diffusers <-> original key maps, architecture inference, savers.

Accepted: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``, or the
same under ``vae/``), a diffusers-layout single file, and original LDM/SGM/BFL single files
(``.safetensors/.ckpt/.pt``), bare or prefixed (``first_stage_model.``, ``vae.``, any prefix), Lightning
``state_dict`` nesting with ``loss.*`` dropped. The architecture is read from key names and tensor
SHAPES; a diffusers config, the safetensors metadata we write, or a preset only supply what shapes
cannot tell (norm groups, scale, shift). Internally everything is converted to the original layout,
which is ``AutoencoderKL``'s own parameter naming.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch

from vaetrain.formats.compat import kl_loader_problems, latent_space, problems_line
from vaetrain.formats.diffusers_config import diffusers_config
from vaetrain.formats.export import (EXPORT_KEY, ExportInfo, cast, check_latent_stats, conventions, default_sample_size,
                                     export_dtype, export_metadata, fp16_safe, warn, write_json_file)
from vaetrain.formats.io import (CheckpointError, _first, check_and_load, float_dtype, read_json_metadata,
                                 read_state_dict, write_safetensors)
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.presets import Preset, get_preset

log = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
ATTN = ".mid.attn_1."
METADATA_KEY = "vaetrain_autoencoder_kl"

# diffusers attention names (current and pre-0.14) -> original
_ATTN_FROM_DIFFUSERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# --- layout detection ----------------------------------------------------------------------------
def _find_prefix(sd: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(prefix, "original" | "diffusers") of the autoencoder inside ``sd``, or None if there is none."""
    prefixes = sorted({m.group(1) for k in sd if (m := re.match(r"^(.*?)(?:en|de)coder\.conv_in\.weight$", k))
                       and (m.group(1) == "" or m.group(1).endswith("."))}, key=len)
    for p in prefixes:
        if any(k.startswith((p + "encoder.down.", p + "decoder.up.", p + "encoder.mid.", p + "decoder.mid."))
               for k in sd):
            return p, "original"
        if any(k.startswith((p + "encoder.down_blocks.", p + "decoder.up_blocks.", p + "encoder.mid_block.",
                             p + "decoder.mid_block.")) for k in sd):
            return p, "diffusers"
    return None


def extract(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The autoencoder's tensors in the ORIGINAL layout (prefix stripped, ``loss.*`` dropped), or None."""
    found = _find_prefix(sd)
    if found is None:
        return None
    prefix, layout = found
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # Lightning LDM training state: discriminator/LPIPS (loss.*) and the EMA bookkeeping (model_ema.*)
    sub = {k: v for k, v in sub.items() if not k.startswith(("loss.", "model_ema."))}
    sub = diffusers_to_original(sub) if layout == "diffusers" else sub
    # some converted files store attention as Linear (C, C); the original layout is a 1x1 conv
    return {k: (v[:, :, None, None] if ATTN in k and k.endswith(".weight") and v.ndim == 2 else v)
            for k, v in sub.items()}


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    flux2 = "bn.running_mean" in sd
    out = {}
    for k, v in sd.items():
        out[_from_diffusers_key(k, n_up, flux2)] = v
    return out


def _from_diffusers_key(k: str, n_up: int, flux2: bool) -> str:
    if flux2 and k.startswith("quant_conv."):  # FLUX.2: diffusers hoists the inner quant convs
        return "encoder." + k
    if flux2 and k.startswith("post_quant_conv."):
        return "decoder." + k
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|"
                     r"value|proj_attn)\.(.*)$", k):
        return f"{m[1]}.mid.attn_1.{_ATTN_FROM_DIFFUSERS[m[2]]}.{m[3]}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", k):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # diffusers runs up_blocks deepest-first; the original ``up.{i}`` is indexed by resolution
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(.*)$", k):
        return f"{m[1]}.norm_out.{m[2]}"
    return k


def original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original layout -> diffusers AutoencoderKL / AutoencoderKLFlux2 (attention as Linear weights)."""
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for k, v in sd.items():
        nk = k
        if k.startswith("encoder.quant_conv."):
            nk = k[len("encoder."):]
        elif k.startswith("decoder.post_quant_conv."):
            nk = k[len("decoder."):]
        elif m := re.match(r"^(encoder|decoder)\.mid\.block_(\d)\.(.*)$", k):
            nk = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}".replace("nin_shortcut", "conv_shortcut")
        elif m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$", k):
            nk = f"{m[1]}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[m[2]]}.{m[3]}"
            if m[2] != "norm" and v.ndim == 4:
                v = v[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) Linear
        elif m := re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$", k):
            nk = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}".replace("nin_shortcut", "conv_shortcut")
        elif m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$", k):
            nk = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$", k):
            nk = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}".replace("nin_shortcut",
                                                                                          "conv_shortcut")
        elif m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.*)$", k):
            nk = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.*)$", k):
            nk = f"{m[1]}.conv_norm_out.{m[2]}"
        out[nk] = v
    return out


# --- architecture inference ------------------------------------------------------------------------
def _shape(sd: dict[str, torch.Tensor], key: str, path) -> torch.Size:
    if key not in sd:
        raise CheckpointError(f"{path}: looks like an AutoencoderKL checkpoint but lacks {key}; the file is incomplete")
    return sd[key].shape


def _count(sd, pattern: str) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _mult(widths: list[int], base: int, path) -> tuple[int, ...]:
    if any(w % base for w in widths):
        raise CheckpointError(f"{path}: level widths {widths} are not multiples of the base width {base}")
    return tuple(w // base for w in widths)


def infer_arch(sd: dict[str, torch.Tensor], path) -> dict:
    """AutoencoderKL flags from ORIGINAL-layout keys and shapes."""
    arch: dict = {"encoder": any(k.startswith("encoder.") for k in sd),
                  "decoder": any(k.startswith("decoder.") for k in sd)}
    if arch["encoder"]:
        levels = _count(sd, r"^encoder\.down\.(\d+)\.")
        base, in_ch = _shape(sd, "encoder.conv_in.weight", path)[:2]
        widths = [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", path)[0] for i in range(levels)]
        arch.update(in_channels=in_ch, base_channels=base, channel_mult=_mult(widths, base, path),
                    num_res_blocks=_count(sd, r"^encoder\.down\.0\.block\.(\d+)\."),
                    latent_channels=_shape(sd, "encoder.conv_out.weight", path)[0] // 2,
                    encoder_attention=any(k.startswith("encoder" + ATTN) for k in sd))
    if arch["decoder"]:
        levels = _count(sd, r"^decoder\.up\.(\d+)\.")
        out_ch, base = _shape(sd, "decoder.conv_out.weight", path)[:2]
        widths = [_shape(sd, f"decoder.up.{i}.block.0.conv2.weight", path)[0] for i in range(levels)]
        dec = dict(out_channels=out_ch, base_channels=base, channel_mult=_mult(widths, base, path),
                   num_res_blocks=_count(sd, r"^decoder\.up\.0\.block\.(\d+)\.") - 1,
                   latent_channels=_shape(sd, "decoder.conv_in.weight", path)[1],
                   decoder_attention=any(k.startswith("decoder" + ATTN) for k in sd))
        for key in ("base_channels", "channel_mult", "num_res_blocks", "latent_channels"):
            if key in arch and arch[key] != dec[key]:
                raise CheckpointError(f"{path}: encoder and decoder disagree on {key} ({arch[key]} vs {dec[key]}); "
                                      f"asymmetric AutoencoderKLs are not supported")
        arch.update(dec)
    if not (arch["encoder"] or arch["decoder"]):
        raise CheckpointError(f"{path}: holds neither encoder.* nor decoder.* AutoencoderKL keys")
    arch["flux2"] = any(k.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.", "bn.")) for k in sd)
    arch["use_quant_conv"] = any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in sd)
    return arch


# --- loading -----------------------------------------------------------------------------------------
def _diffusers_folder(path: Path) -> Path | None:
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def try_load(path, preset: Preset | str | None = None, allow_drop_attention: bool = False) -> AutoencoderKL | None:
    """An AutoencoderKL from ``path`` (file, folder, or list of files), None if it is not a KL checkpoint."""
    preset = get_preset(preset)
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return _try_load_files([Path(p) for p in path], preset, allow_drop_attention)
        path = path[0]
    path = Path(path)
    if not path.is_dir():
        return _try_load_files([path], preset, allow_drop_attention)
    folder = _diffusers_folder(path)
    if folder is not None:
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
        if cfg.get("_class_name") not in DIFFUSERS_CLASSES:
            return None
        weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder}: diffusers {cfg['_class_name']} folder without "
                                  f"diffusion_pytorch_model.safetensors or .bin")
        sd = extract(read_state_dict(weights))
        if sd is None:
            raise CheckpointError(f"{weights}: config.json says {cfg['_class_name']} but the weights hold no "
                                  f"AutoencoderKL keys")
        conv = dict(norm_groups=cfg.get("norm_num_groups", 32),
                    scaling_factor=cfg.get("scaling_factor", 0.18215 if cfg["_class_name"] == "AutoencoderKL" else 1.0),
                    shift_factor=cfg.get("shift_factor") or 0.0)
        return build(sd, weights, conv, preset, allow_drop_attention)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    found = [(f, sd) for f in files if (sd := extract(read_state_dict(f))) is not None]
    if not found:
        return None
    if len(found) > 1:
        names = _first([f.name for f, _ in found])
        raise CheckpointError(f"{path}: holds several AutoencoderKL checkpoints ({names}); pass one file")
    f, sd = found[0]
    return build(sd, f, read_json_metadata(f, METADATA_KEY), preset, allow_drop_attention)


def _try_load_files(paths: list[Path], preset, allow_drop_attention) -> AutoencoderKL | None:
    merged: dict[str, torch.Tensor] = {}
    for p in paths:
        sd = extract(read_state_dict(p))
        if sd is None:
            return None
        merged.update(sd)
    meta = {}
    for p in paths:
        meta.update(read_json_metadata(p, METADATA_KEY))
    name = paths[0] if len(paths) == 1 else "+".join(str(p) for p in paths)
    return build(merged, name, meta, preset, allow_drop_attention)


def build(sd: dict[str, torch.Tensor], path, conventions: dict, preset: Preset | None,
          allow_drop_attention: bool = False) -> AutoencoderKL:
    """Construct the inferred architecture and load ``sd`` (original layout) strictly."""
    arch = infer_arch(sd, path)
    groups = conventions.get("norm_groups") or (preset.arch.get("norm_groups") if preset else None) or 32
    if preset is not None and preset.family == "kl":
        scale, shift = preset.scaling_factor, preset.shift_factor
    elif "scaling_factor" in conventions:
        scale, shift = conventions["scaling_factor"], conventions.get("shift_factor") or 0.0
    else:
        scale, shift = 1.0, 0.0
        warnings.warn(f"{path}: the file does not say its latent scale/shift; using scale 1, shift 0. "
                      f"Pass preset=... (e.g. sd1, sdxl, sd3, flux1) to use a model's convention", stacklevel=3)
    dropped = []
    if allow_drop_attention:
        dropped = sorted(k for k in sd if ATTN in k)
        arch.update(encoder_attention=False, decoder_attention=False)
        sd = {k: v for k, v in sd.items() if ATTN not in k}
    try:
        ae = AutoencoderKL(**arch, norm_groups=groups, scaling_factor=scale, shift_factor=shift)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_and_load(ae, sd, path, allow_missing=("bn.num_batches_tracked",))
    ae.source_dtype = float_dtype(sd)
    if preset is not None and preset.family == "kl":
        ae.latent_space = preset.latent_space
    if dropped:
        report_dropped(path, dropped)
    return ae.eval()


def report_dropped(path, keys: list[str]) -> None:
    msg = f"{path}: dropped {len(keys)} midblock attention tensors ({_first(keys, 4)}) as allow_drop_attention asks"
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)


# --- saving ------------------------------------------------------------------------------------------
def save(ae, out, format: str = "diffusers", info: ExportInfo | None = None) -> Path | None:
    """Write ``ae`` as a diffusers folder or an original single .safetensors; None if not an AutoencoderKL."""
    if not isinstance(ae, AutoencoderKL):
        return None
    info = info or ExportInfo()
    check_latent_stats(info, ae.latent_channels)
    out = Path(out)
    dtype = export_dtype(ae, info)
    sd = cast(ae.state_dict(), dtype)
    scale, shift = conventions(ae, info)
    space = info.latent_space or latent_space(ae)
    if format == "original":
        if out.suffix != ".safetensors":
            out = out / "vae.safetensors" if out.is_dir() else out.with_name(out.name + ".safetensors")
        problems = kl_loader_problems(ae)
        params = {**ae.config(), "scaling_factor": scale, "shift_factor": shift}
        meta = export_metadata(format, info, space, problems, dtype)
        written = write_safetensors(sd, out, {METADATA_KEY: json.dumps(params), EXPORT_KEY: json.dumps(meta),
                                              "format": "pt"})
        if problems:
            warn(problems_line(written, problems))
        return written
    if format != "diffusers":
        raise ValueError(f"AutoencoderKL can be saved as format=diffusers or format=original, not {format!r}")
    p = ae.params
    if not (ae.has_encoder and ae.has_decoder):
        raise ValueError("diffusers AutoencoderKL needs both encoder and decoder; save this half with format=original")
    if p.encoder_attention != p.decoder_attention:
        raise ValueError("diffusers AutoencoderKL has midblock attention on both sides or neither "
                         "(mid_block_add_attention); save this model with format=original")
    n = len(p.channel_mult)
    values = dict(in_channels=p.in_channels, out_channels=p.out_channels,
                  down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                  block_out_channels=[p.base_channels * m for m in p.channel_mult], layers_per_block=p.num_res_blocks,
                  act_fn="silu", latent_channels=p.latent_channels, norm_num_groups=p.norm_groups,
                  sample_size=info.sample_size or default_sample_size(space),
                  use_quant_conv=p.use_quant_conv or p.flux2, use_post_quant_conv=p.use_quant_conv or p.flux2,
                  mid_block_add_attention=p.encoder_attention)
    if p.flux2:  # AutoencoderKLFlux2 has no scale/shift/force_upcast: its latents are normalised by ``bn``
        cfg = diffusers_config("AutoencoderKLFlux2", **values, batch_norm_eps=ae.bn.eps,
                               batch_norm_momentum=ae.bn.momentum, patch_size=[2, 2])
    else:
        safe = fp16_safe(info.fp16_audit)
        cfg = diffusers_config("AutoencoderKL", **values, scaling_factor=scale, shift_factor=shift or None,
                               latents_mean=list(info.latents_mean) if info.latents_mean else None,
                               latents_std=list(info.latents_std) if info.latents_std else None,
                               # unaudited: diffusers' own default (upcast); audited: upcast only when not fp16-safe
                               force_upcast=True if safe is None else not safe)
    meta = export_metadata(format, info, space, {}, dtype)
    write_safetensors(original_to_diffusers(sd), out / "diffusion_pytorch_model.safetensors",
                      {"format": "pt", EXPORT_KEY: json.dumps(meta)})
    write_json_file(out / "config.json", cfg)
    return out
