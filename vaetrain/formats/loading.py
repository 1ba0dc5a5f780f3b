"""The loading and saving entry points: resolve a source, dispatch to the format modules.

Resolution: a local path (file or folder) or a list of paths (halves of one model) is used as is;
an ``org/name`` hub id, or ``source=None`` with a preset, goes through
``huggingface_hub.snapshot_download`` (its cache; ``HF_HUB_OFFLINE=1`` works from the cache alone).
Dispatch: ``checkpoint.try_load`` (vaetrain run checkpoints and native files), ``kl.try_load``, ``tiny.try_load``;
each returns None for "not my format". Saving goes to the module that handles the model type, with an
``ExportInfo`` (or its fields as keywords) for what real tools need beyond the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import re
import warnings
from pathlib import Path

import huggingface_hub

from torch import nn

from vaetrain.formats import card, checkpoint, kl, tiny
from vaetrain.formats.export import ExportInfo
from vaetrain.formats.io import CheckpointError, _first, check_and_load
from vaetrain.models.base import Autoencoder
from vaetrain.models.presets import Preset, get_preset

ACCEPTED = ("diffusers AutoencoderKL/AutoencoderKLFlux2/AutoencoderTiny folders, original LDM/SGM/BFL KL single "
            "files (.safetensors/.ckpt/.pt), TAESD encoder/decoder .pth/.safetensors, Birch-san MLP and "
            "VAEApprox .pt files, vaetrain run checkpoints (.ckpt) and format=safetensors files")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# tried in this order; each returns None for "not my format" (and, saving, for "not my model type")
FORMAT_MODULES = (checkpoint, kl, tiny)


def hub_download(repo_id: str, subfolder: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """Local folder of ``repo_id`` (its ``subfolder`` when given) from the huggingface_hub cache or the hub."""
    try:
        root = huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns)
    except Exception as e:  # offline with no cache, unknown repo, network: one line, not a traceback
        hint = " (HF_HUB_OFFLINE is set: download it once online or point source= at a local copy)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise CheckpointError(f"{repo_id}: could not get it from the Hugging Face hub: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}{hint}") from None
    path = Path(root) / subfolder if subfolder else Path(root)
    if not path.exists():
        raise CheckpointError(f"{repo_id}: the download has no {subfolder!r} subfolder")
    return path


def resolve(source, preset: Preset | None = None, subfolder: str | None = None) -> Path | list[Path]:
    """Local path(s) for ``source``: as is when local, else downloaded (hub id or the preset's repo)."""
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):  # list, tuple, ListConfig
        paths = [Path(os.path.expanduser(str(s))) for s in source]
        for p in paths:
            if not p.exists():
                raise CheckpointError(f"{p}: file not found")
        return paths
    if source is None:
        if preset is None:
            raise ValueError("load_autoencoder needs a source (path, list of paths or hub id) or a preset")
        return hub_download(preset.repo, *_preset_files(preset, subfolder))
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        return path / subfolder if subfolder else path
    # "models/vae.safetensors" is a missing local file, not a hub repo called "vae.safetensors"
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")) \
            and not str(source).lower().endswith(kl.WEIGHT_SUFFIXES):
        if preset is not None and preset.repo == str(source):
            return hub_download(str(source), *_preset_files(preset, subfolder))
        return hub_download(str(source), subfolder, [f"{subfolder}/*"] if subfolder else None)
    raise CheckpointError(f"{path}: file not found")


def _preset_files(preset: Preset, subfolder: str | None) -> tuple[str | None, list[str]]:
    """(subfolder, allow_patterns) of a preset's hub files; an explicit ``subfolder`` overrides the preset's."""
    sub = subfolder if subfolder is not None else preset.subfolder
    return sub, [f"{sub}/{p}" if sub else p for p in preset.allow_patterns]


def _name(path) -> str:
    return " + ".join(str(p) for p in path) if isinstance(path, list) else str(path)


def load_autoencoder(source=None, preset: str | Preset | None = None, subfolder: str | None = None,
                     allow_drop_attention: bool = False, weights: str | None = None) -> Autoencoder | nn.Module:
    """Any supported autoencoder from a path, list of paths, hub id, or preset; in eval mode.

    ``allow_drop_attention=True`` builds the detected architecture WITHOUT midblock attention and
    drops (and reports) those weights. A vaetrain run checkpoint (``RUN/checkpoints/last.ckpt``) gives its
    EMA student, or the raw student with ``weights="student"``; that (like a ``format=safetensors`` file) can
    also be a vaetrain model that is not an autoencoder (a ``LatentInterposer``).
    """
    preset = get_preset(preset)
    path = resolve(source, preset, subfolder)
    ae = checkpoint.try_load(path, preset, allow_drop_attention, weights)
    if ae is None and weights is not None:
        raise CheckpointError(f"{_name(path)}: weights={weights} only applies to vaetrain run checkpoints (.ckpt)")
    for mod in FORMAT_MODULES[1:]:
        if ae is None:
            ae = mod.try_load(path, preset, allow_drop_attention)
    if ae is None:
        raise CheckpointError(f"{_name(path)}: not a recognised autoencoder checkpoint; accepted: {ACCEPTED}")
    if preset is not None and preset.latent_space and getattr(ae, "latent_space", None) is None:
        ae.latent_space = preset.latent_space
    return ae.eval()


def load_weights(ae: Autoencoder, source, allow_drop_attention: bool = False,
                 subfolder: str | None = None) -> Autoencoder:
    """Load any supported checkpoint of ``ae``'s model type into the EXISTING ``ae`` (strict).

    Midblock attention in the file that ``ae`` lacks is an error naming the keys, unless
    ``allow_drop_attention`` (then dropped and reported). ``ae`` keeps its scale/shift; a half-model
    (encoder- or decoder-only) takes its half of a full checkpoint.
    """
    path = resolve(source, None, subfolder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not say its latent scale/shift.*")
        src = load_autoencoder(path)
    if type(src) is not type(ae):
        raise CheckpointError(f"{_name(path)}: holds a {type(src).__name__}, cannot load it into a {type(ae).__name__}")
    # a half-model (encoder- or decoder-only) takes its half: the other half's keys are not "unexpected"
    absent = tuple(f"{half}." for half in ("encoder", "decoder") if not getattr(ae, f"has_{half}"))
    absent += ("quant_conv.",) if not ae.has_encoder else ()
    absent += ("post_quant_conv.",) if not ae.has_decoder else ()
    own = ae.state_dict()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(absent)}
    extra_attn = sorted(k for k in sd if kl.ATTN in k and k not in own)
    if extra_attn and not allow_drop_attention:
        raise CheckpointError(f"{_name(path)}: has midblock attention ({_first(extra_attn, 3)}) that the model lacks; "
                              f"pass allow_drop_attention=True to drop it")
    sd = {k: v for k, v in sd.items() if k not in extra_attn}
    check_and_load(ae, sd, _name(path))
    if extra_attn:
        kl.report_dropped(_name(path), extra_attn)
    return ae


def save_autoencoder(ae: Autoencoder | nn.Module, out_path, format: str = "diffusers", info: ExportInfo | None = None,
                     **options) -> Path:
    """Write ``ae`` in ``format`` (diffusers | original | taesd as the model type allows, or safetensors: vaetrain's
    own layout for any vaetrain model); returns the path.

    ``info`` / ``options`` (the fields of ``ExportInfo``; options override info): weight dtype, ComfyUI's TAESD name
    prefix, latent space, scale/shift, latents_mean/std, sample_size, the fp16 audit (diffusers ``force_upcast``),
    the model card's command/config/metrics. An ``original``/``taesd`` export that ComfyUI or A1111 cannot build is
    still written; an ``ExportWarning`` says so in one line and the file's ``vaetrain_export`` metadata records it.
    """
    try:
        info = (info or ExportInfo()).updated(**options)
    except TypeError as e:  # an unknown option name
        raise ValueError(f"save_autoencoder: {e}; options are the fields of ExportInfo") from None
    for mod in FORMAT_MODULES:
        written = mod.save(ae, Path(out_path), format, info)
        if written is not None:
            written = Path(written)
            if (info.command or info.config or info.metrics) and written.is_dir():  # folder exports carry a card
                text = card.render(card.export_summary(written), written.name, info.command, info.config,
                                   {"": info.metrics} if info.metrics else None)
                card.write_card(written, text)
            return written
    raise ValueError(f"no saver handles {type(ae).__name__} (format={format!r})")
