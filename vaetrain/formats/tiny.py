"""On-disk layouts of the tiny autoencoders: TAESD (original halves and diffusers AutoencoderTiny),
Birch-san per-pixel MLPs (and ours, same keys) and A1111 VAEApprox.

Everything is detected from keys and shapes (plus a diffusers ``config.json``'s ``_class_name``), never from
file names; the only use of names is picking the ``*encoder*`` / ``*decoder*`` pair out of a plain folder.
Files we write carry their flags in safetensors metadata (``vaetrain_model``, ``vaetrain_config``), but
loading works from the keys alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vaetrain.formats.compat import (TAESD_FIX, TAESD_PREFIXES, latent_space, problems_line, taesd_loader_problems,
                                     taesd_prefix)
from vaetrain.formats.diffusers_config import diffusers_config
from vaetrain.formats.export import (EXPORT_KEY, ExportInfo, cast, conventions, export_dtype, export_metadata,
                                     fp16_safe, warn, write_json_file)
from vaetrain.formats.io import (CheckpointError, check_and_load, float_dtype, read_json_metadata, read_state_dict,
                                 write_safetensors)
from vaetrain.models.base import Autoencoder
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.presets import get_preset
from vaetrain.models.taesd import TAESD
from vaetrain.models.vae_approx import VAEApprox

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
_INDEXED = re.compile(r"^(\d+)\.(.+)$")
_MLP_KEYS = re.compile(r"^(in_proj|out_proj|hidden_layers\.\d+)\.(weight|bias)$|^upsample\.")
_APPROX_KEYS = {f"conv{i}.{p}" for i in range(1, 9) for p in ("weight", "bias")}
_COMFY_NAME = re.compile(r"^(taesd|taesdxl|taesd3|taef1|taef2)_(?:encoder|decoder)\.")  # ComfyUI vae_approx names
CONFIG_KEY = "vaetrain_config"  # safetensors metadata: the flags that rebuild the model
# diffusers AutoencoderTiny settings our TAESD reproduces (anything else is refused, not misread)
_TINY_FIXED = dict(in_channels=3, out_channels=3, act_fn="relu", upsample_fn="nearest", upsampling_scaling_factor=2)
# AutoencoderTiny's per-stage block counts for vaetrain's TAESD layouts, by downsampling factor
_TINY_BLOCKS = {8: dict(num_encoder_blocks=[1, 3, 3, 3], num_decoder_blocks=[3, 3, 3, 1]),
                4: dict(num_encoder_blocks=[1, 3, 3], num_decoder_blocks=[3, 3, 1])}


# ---------------------------------------------------------------------------------------------------------------
# detection
def classify(sd: dict[str, torch.Tensor]) -> str | None:
    """Which tiny half a state dict is: ``taesd_encoder``, ``taesd_decoder``, ``diffusers_tiny``,
    ``mlp_encoder``, ``mlp_decoder``, ``vae_approx``; ``None`` if none of them."""
    keys = set(sd)
    if keys == _APPROX_KEYS:
        return "vae_approx"
    if all(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return "diffusers_tiny"
    if all(_MLP_KEYS.match(k) for k in keys) and "in_proj.weight" in sd and "out_proj.weight" in sd:
        return "mlp_encoder" if sd["in_proj.weight"].shape[-1] == 3 else "mlp_decoder"
    if all(_INDEXED.match(k) for k in keys):
        w0 = sd.get("0.weight")
        if w0 is not None and w0.ndim == 4 and w0.shape[1] == 3:
            return "taesd_encoder"
        w1 = sd.get("1.weight")
        if w1 is not None and w1.ndim == 4 and not any(k.startswith("0.") for k in keys):
            return "taesd_decoder"
    return None


def _preset(preset):
    if preset is None or not isinstance(preset, str):
        return preset
    return get_preset(preset)


def _indices(sd: dict) -> list[int]:
    return sorted({int(_INDEXED.match(k).group(1)) for k in sd})


# ---------------------------------------------------------------------------------------------------------------
# TAESD
def taesd_encoder_flags(sd: dict, path: Path) -> dict:
    """Architecture of a TAESD encoder state dict, from keys and shapes."""
    try:
        last = _indices(sd)[-1]
        f32 = "1.conv.0.weight" not in sd and "2.weight" in sd  # taesana: conv, ReLU, conv, ReLU, Block
        width = sd["2.weight" if f32 else "0.weight"].shape[0]
        factor = 32 if f32 else {14: 8, 10: 4}.get(last)
        if factor is None:
            raise CheckpointError(f"{path}: looks like a TAESD encoder but its last layer is index {last} "
                                  f"(expected 14 for the 8x layout or 10 for 4x)")
        return dict(latent_channels=sd[f"{last}.weight"].shape[0], width=width,
                    flux_2=any(".pool." in k for k in sd), downsample_factor=factor)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: looks like a TAESD encoder (Sequential indices) but lacks key {e}") from None


def taesd_decoder_flags(sd: dict, path: Path) -> dict:
    """Architecture of a TAESD decoder state dict (index 0 is the parameterless Clamp)."""
    try:
        last = _indices(sd)[-1]
        factor = {19: 8, 14: 4, 29: 32}.get(last)
        if factor is None:
            raise CheckpointError(f"{path}: looks like a TAESD decoder but its last layer is index {last} "
                                  f"(expected 19 for the 8x layout, 14 for 4x or 29 for 32x)")
        return dict(latent_channels=sd["1.weight"].shape[1], width=sd[f"{last}.weight"].shape[1],
                    flux_2=any(".pool." in k for k in sd), downsample_factor=factor)
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: looks like a TAESD decoder (Sequential indices) but lacks key {e}") from None


def _load_into(module, sd, path, what: str) -> None:
    try:
        check_and_load(module, sd, path)
    except CheckpointError as e:  # name the TAESD/MLP half, not "Sequential"
        raise CheckpointError(str(e).replace(f"does not match {type(module).__name__}", f"does not match {what}")) from None


def build_taesd(enc: tuple[dict, Path] | None, dec: tuple[dict, Path] | None, meta: dict | None = None,
                preset=None) -> TAESD:
    """A TAESD from original-layout halves (either may be None), strictly loaded."""
    flags = {}
    if enc is not None:
        flags["encoder"] = taesd_encoder_flags(*enc)
    if dec is not None:
        flags["decoder"] = taesd_decoder_flags(*dec)
    if len(flags) == 2 and flags["encoder"] != flags["decoder"]:
        raise CheckpointError(f"{enc[1]} and {dec[1]}: encoder and decoder are different TAESD variants "
                              f"(encoder {flags['encoder']}, decoder {flags['decoder']}); pass a matching pair")
    arch = next(iter(flags.values()))
    preset = _preset(preset)
    if preset is not None and getattr(preset, "family", None) == "taesd":
        for k, v in preset.arch.items():
            if k in arch and arch[k] != v:
                path = (enc or dec)[1]
                raise CheckpointError(f"{path}: is a TAESD with {k}={arch[k]} but preset {preset.name!r} says {k}={v}; "
                                      f"drop the preset or pick the matching one")
    meta = meta or {}
    model = TAESD(**arch, encoder=enc is not None, decoder=dec is not None,
                  scaling_factor=float(meta.get("scaling_factor", 1.0)), shift_factor=float(meta.get("shift_factor", 0.0)))
    desc = f"{arch['latent_channels']} ch, width {arch['width']}, flux_2={arch['flux_2']}, {arch['downsample_factor']}x"
    if enc is not None:
        _load_into(model.encoder, enc[0], enc[1], f"a TAESD encoder ({desc})")
    if dec is not None:
        _load_into(model.decoder, dec[0], dec[1], f"a TAESD decoder ({desc})")
    return model


def split_diffusers_tiny(sd: dict) -> tuple[dict, dict]:
    """diffusers AutoencoderTiny keys -> original halves: encoder k -> k, decoder k -> k+1 (Clamp is index 0)."""
    enc, dec = {}, {}
    for k, v in sd.items():
        half, _, rest = k.split(".", 2)
        i, _, tail = rest.partition(".")
        if half == "encoder":
            enc[f"{i}.{tail}"] = v
        else:
            dec[f"{int(i) + 1}.{tail}"] = v
    return enc, dec


def _load_diffusers_folder(folder: Path, config: dict, preset) -> TAESD:
    cfg_path = folder / "config.json"
    for k, v in _TINY_FIXED.items():
        if k in config and (list(config[k]) if isinstance(v, list) else config[k]) != v:
            raise CheckpointError(f"{cfg_path}: AutoencoderTiny with {k}={config[k]} is not supported (vaetrain's TAESD "
                                  f"needs {k}={v})")
    blocks = {k: list(config.get(k, v)) for k, v in _TINY_BLOCKS[8].items()}
    if blocks not in _TINY_BLOCKS.values():
        raise CheckpointError(f"{cfg_path}: AutoencoderTiny with {blocks} is not supported (vaetrain's TAESD needs "
                              f"{_TINY_BLOCKS[8]} (8x) or {_TINY_BLOCKS[4]} (4x))")
    for k in ("encoder_block_out_channels", "decoder_block_out_channels"):
        if k in config and len(set(config[k])) != 1:
            raise CheckpointError(f"{cfg_path}: {k}={config[k]} is not supported (vaetrain's TAESD needs one width)")
    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin"]
    weights = next((folder / n for n in names if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: AutoencoderTiny config.json but no weights file ({', '.join(names)})")
    sd = read_state_dict(weights)
    if classify(sd) != "diffusers_tiny":
        raise CheckpointError(f"{weights}: keys are not AutoencoderTiny's (expected encoder.layers.* / decoder.layers.*, "
                              f"got e.g. {sorted(sd)[:3]})")
    enc, dec = split_diffusers_tiny(sd)
    meta = {k: config[k] for k in ("scaling_factor", "shift_factor") if k in config}
    model = build_taesd((enc, weights) if enc else None, (dec, weights) if dec else None, meta, preset)
    _tag(model, [sd], [weights], preset)
    if "latent_channels" in config and config["latent_channels"] != model.latent_channels:
        raise CheckpointError(f"{cfg_path}: latent_channels={config['latent_channels']} but the weights have "
                              f"{model.latent_channels}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# MLP and VAEApprox
def _mlp_flags(sd: dict, path: Path) -> dict:
    hidden = sorted(int(k.split(".")[1]) for k in sd if k.startswith("hidden_layers.") and k.endswith(".weight"))
    if hidden != list(range(len(hidden))):
        raise CheckpointError(f"{path}: MLP hidden_layers are not numbered 0..n-1 (got {hidden})")
    flags = dict(width=sd["in_proj.weight"].shape[0], depth=len(hidden))
    if "upsample.net.0.weight" in sd:
        flags["upsampler_width"] = sd["upsample.net.0.weight"].shape[0]
    return flags


def build_mlp(enc: tuple[dict, Path] | None, dec: tuple[dict, Path] | None, meta: dict | None = None) -> MLPAutoencoder:
    """An MLPAutoencoder from Birch-san-layout halves; scale/shift from our metadata, else SD1's (Birch-san's)."""
    e = _mlp_flags(*enc) if enc is not None else None
    d = _mlp_flags(*dec) if dec is not None else None
    lat_e = enc[0]["out_proj.weight"].shape[0] if enc is not None else None
    lat_d = dec[0]["in_proj.weight"].shape[1] if dec is not None else None
    if e and d and ((e["width"], e["depth"]) != (d["width"], d["depth"]) or lat_e != lat_d):
        raise CheckpointError(f"{enc[1]} and {dec[1]}: MLP encoder and decoder differ (encoder {lat_e} ch {e}, "
                              f"decoder {lat_d} ch {d}); pass a matching pair")
    meta = meta or {}
    model = MLPAutoencoder(latent_channels=lat_e or lat_d, width=(e or d)["width"], depth=(e or d)["depth"],
                           encoder=enc is not None, decoder=dec is not None,
                           upsampler_width=(d or {}).get("upsampler_width"),
                           scaling_factor=float(meta.get("scaling_factor", 0.18215)),
                           shift_factor=float(meta.get("shift_factor", 0.0)))
    for half, module in ((enc, model.encoder), (dec, model.decoder)):
        if half is not None:
            sd = {k if k.startswith("upsample.") else f"mlp.{k}": v for k, v in half[0].items()}
            _load_into(module, sd, half[1], f"an MLP {'encoder' if module is model.encoder else 'decoder'}")
    return model


def _approx_space(latent_channels: int, meta: dict, preset) -> str:
    if meta.get("latent_space"):
        return meta["latent_space"]
    if latent_channels == 16:
        return "sd3"
    preset = _preset(preset)
    name = getattr(preset, "name", "") or ""
    return "sdxl" if name.startswith("sdxl") else "sd1"  # 4-ch sd1/sdxl files are indistinguishable by keys


def build_vae_approx(sd: dict, path: Path, meta: dict | None = None, preset=None) -> VAEApprox:
    meta = meta or {}
    model = VAEApprox(_approx_space(sd["conv1.weight"].shape[1], meta, preset), bool(meta.get("upsample_to_full", False)))
    _load_into(model.decoder, sd, path, f"a VAEApprox ({model.latent_space})")
    return model


# ---------------------------------------------------------------------------------------------------------------
# entry points
def try_load(path, preset=None, allow_drop_attention: bool = False) -> Autoencoder | None:
    """Load a tiny autoencoder from a file, a folder or a list of half files; ``None`` if it is not one."""
    if isinstance(path, (list, tuple)):
        return _load_files([Path(p) for p in path], preset)
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, preset)
    if not path.is_file():
        return None
    return _load_files([path], preset)


def _load_folder(folder: Path, preset) -> Autoencoder | None:
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        if config.get("_class_name") == "AutoencoderTiny":
            return _load_diffusers_folder(folder, config, preset)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    by_stem: dict[str, Path] = {}
    for p in sorted(files, key=lambda p: p.suffix != ".safetensors"):  # same weights as .pth and .safetensors
        by_stem.setdefault(p.stem, p)
    files = sorted(by_stem.values())
    halves = [p for p in files if "encoder" in p.name.lower() or "decoder" in p.name.lower()]
    if len(files) == 1:
        halves = files
    if len(halves) > 2:
        ours = [p for p in halves if classify(read_state_dict(p))]
        if ours:
            raise CheckpointError(f"{folder}: holds {len(ours)} tiny-autoencoder halves ({', '.join(p.name for p in ours[:4])}"
                                  f"{'...' if len(ours) > 4 else ''}); pass the [encoder, decoder] files as a list")
        return None
    if not halves:
        return None
    return _load_files(halves, preset)


def _load_files(paths: list[Path], preset) -> Autoencoder | None:
    if not paths or not all(p.is_file() for p in paths):
        return None
    sds = [read_state_dict(p) for p in paths]
    model = _build_from_files(paths, sds, preset)
    if model is not None:
        _tag(model, sds, paths, preset)
    return model


def _tag(model: Autoencoder, sds: list[dict], paths: list[Path], preset) -> None:
    """What the weights cannot say but exports use: the stored dtype and, when named, the latent space."""
    model.source_dtype = float_dtype(*sds)
    if isinstance(model, VAEApprox):
        return
    preset = _preset(preset)
    spaces = {read_json_metadata(p, EXPORT_KEY).get("latent_space") for p in paths}
    # ComfyUI's file names (taesdxl_decoder.pth, ...) name the space; detection never depends on them
    spaces |= {TAESD_PREFIXES[m[1]] for p in paths if (m := _COMFY_NAME.match(p.name))}
    if preset is not None and preset.latent_space:
        spaces.add(preset.latent_space)
    spaces.discard(None)
    if len(spaces) == 1:
        model.latent_space = spaces.pop()


def _build_from_files(paths: list[Path], sds: list[dict], preset) -> Autoencoder | None:
    kinds = [classify(sd) for sd in sds]
    if all(k is None for k in kinds):
        return None
    if any(k is None for k in kinds):
        bad = paths[kinds.index(None)]
        raise CheckpointError(f"{bad}: not a tiny-autoencoder half like the other files given "
                              f"({', '.join(str(k) for k in kinds if k)}); pass files of one model")
    meta = {}
    for p in paths:
        meta.update(read_json_metadata(p, CONFIG_KEY))
    parts = dict(zip(kinds, zip(sds, paths)))
    if len(parts) != len(paths):
        raise CheckpointError(f"{paths[0]}: got {len(paths)} files but two of them are the same kind of half "
                              f"({', '.join(kinds)}); pass one encoder and/or one decoder")
    if "diffusers_tiny" in parts or "vae_approx" in parts:
        if len(paths) != 1:
            raise CheckpointError(f"{paths[0]}: a complete {kinds[0]} model file cannot be combined with other files")
        sd, path = parts[kinds[0]]
        if kinds[0] == "vae_approx":
            return build_vae_approx(sd, path, meta, preset)
        enc, dec = split_diffusers_tiny(sd)
        return build_taesd((enc, path) if enc else None, (dec, path) if dec else None, meta, preset)
    families = {k.split("_")[0] for k in kinds}
    if len(families) != 1:
        raise CheckpointError(f"{paths[0]}: mixes a TAESD half and an MLP half ({', '.join(kinds)}); pass one model")
    if families == {"taesd"}:
        return build_taesd(parts.get("taesd_encoder"), parts.get("taesd_decoder"), meta, preset)
    return build_mlp(parts.get("mlp_encoder"), parts.get("mlp_decoder"), meta)


def save(ae: Autoencoder, out, format: str = "taesd", info: ExportInfo | None = None) -> Path | None:
    """Write ``ae`` to the folder ``out``; ``None`` for models this module does not handle.

    TAESD: ``taesd`` / ``original`` -> ``<out>/<prefix>_{encoder,decoder}.safetensors`` (original Sequential keys, what
    taesd.py and ComfyUI's vae_approx folder read; ``prefix`` is the name ComfyUI gives the latent space, see
    ``compat.taesd_prefix``); ``diffusers`` -> an AutoencoderTiny folder.
    MLP: ``original`` / ``mlp`` -> Birch-san-layout halves. VAEApprox: ``original`` -> ``<name>_decoder.safetensors``.
    """
    out = Path(out)
    info = info or ExportInfo()
    if isinstance(ae, TAESD):
        if format in ("taesd", "original"):
            prefix, note = taesd_prefix(ae, info.latent_space, info.taesd_prefix)
            problems = taesd_loader_problems(ae, prefix)
            space = TAESD_PREFIXES.get(prefix) if not note else None
            written = _save_halves(ae, out, "taesd", prefix or out.name or "taesd", info, space, problems)
            if note and prefix is not None:  # without a prefix the problems line below says it all
                warn(f"{written}: {note}")
            if problems:
                warn(problems_line(written, problems, TAESD_FIX))
            return written
        if format == "diffusers":
            return _save_diffusers_tiny(ae, out, info)
        raise ValueError(f"cannot save a TAESD as {format!r}: use format=taesd, original or diffusers")
    if isinstance(ae, MLPAutoencoder):
        if format in ("original", "mlp"):
            return _save_halves(ae, out, "mlp", out.name or "mlp", info, info.latent_space or latent_space(ae), {})
        raise ValueError(f"cannot save an MLPAutoencoder as {format!r} (it has no {format} layout): use format=original")
    if isinstance(ae, VAEApprox):
        if format in ("original", "vae_approx"):
            return _save_halves(ae, out, "vae_approx", out.name or "vae_approx", info, ae.latent_space, {})
        raise ValueError(f"cannot save a VAEApprox as {format!r}: use format=original")
    return None


def _half_state(module: torch.nn.Module, kind: str) -> dict:
    sd = module.state_dict()
    if kind == "mlp":  # Birch-san's keys: drop our "mlp." wrapper
        sd = {k.removeprefix("mlp."): v for k, v in sd.items()}
    return sd


def _save_halves(ae, out: Path, kind: str, name: str, info: ExportInfo, space: str | None, problems: dict) -> Path:
    dtype = export_dtype(ae, info)
    scale, shift = conventions(ae, info)
    params = {**ae.config(), **({"scaling_factor": scale, "shift_factor": shift} if kind != "vae_approx" else {})}
    meta = {"vaetrain_model": kind, CONFIG_KEY: json.dumps(params),
            EXPORT_KEY: json.dumps(export_metadata("taesd" if kind == "taesd" else "original", info, space, problems,
                                                   dtype))}
    for half in ("encoder", "decoder"):
        module = getattr(ae, half, None)
        if module is not None:
            write_safetensors(cast(_half_state(module, kind), dtype), out / f"{name}_{half}.safetensors",
                              {**meta, "vaetrain_half": half})
    return out


def _save_diffusers_tiny(ae: TAESD, out: Path, info: ExportInfo) -> Path:
    if ae.flux_2:
        raise ValueError("this TAESD is the flux_2 variant: its pool branches have no diffusers AutoencoderTiny "
                         "equivalent; save it with format=taesd")
    if ae.downsample_factor not in _TINY_BLOCKS:
        raise ValueError(f"this TAESD downsamples {ae.downsample_factor}x; vaetrain writes AutoencoderTiny for 8x and "
                         f"4x only: save it with format=taesd")
    if not (ae.has_encoder and ae.has_decoder):
        raise ValueError("diffusers AutoencoderTiny needs both halves but this TAESD has only one: save it with format=taesd")
    dtype = export_dtype(ae, info)
    sd = {f"encoder.layers.{k}": v for k, v in ae.encoder.state_dict().items()}
    for k, v in ae.decoder.state_dict().items():
        i, _, tail = k.partition(".")
        sd[f"decoder.layers.{int(i) - 1}.{tail}"] = v
    blocks = _TINY_BLOCKS[ae.downsample_factor]
    scale, shift = conventions(ae, info)
    safe = fp16_safe(info.fp16_audit)
    config = diffusers_config("AutoencoderTiny", **_TINY_FIXED, **blocks,
                              encoder_block_out_channels=[ae.width] * len(blocks["num_encoder_blocks"]),
                              decoder_block_out_channels=[ae.width] * len(blocks["num_decoder_blocks"]),
                              latent_channels=ae.latent_channels,
                              # unaudited: diffusers' default for AutoencoderTiny (no upcast)
                              force_upcast=False if safe is None else not safe,
                              scaling_factor=scale, shift_factor=shift)
    meta = export_metadata("diffusers", info, info.latent_space or latent_space(ae), {}, dtype)
    write_safetensors(cast(sd, dtype), out / "diffusion_pytorch_model.safetensors",
                      {"format": "pt", EXPORT_KEY: json.dumps(meta)})
    write_json_file(out / "config.json", config)
    return out
