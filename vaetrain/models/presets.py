"""Named public autoencoders: where they live on the hub and which latent convention they use.

A preset is used two ways: ``load_autoencoder(None, preset="sd1")`` downloads ``repo``/``subfolder``
(through the huggingface_hub cache, honouring HF_HUB_OFFLINE), and ``load_autoencoder(path,
preset="sd1")`` applies the preset's scale/shift to a local file that does not carry them (original
LDM single files have no config). ``arch`` holds the architecture flags the preset implies (kwargs of
``AutoencoderKL`` or ``TAESD``); loaders still infer the architecture from the weights and use
``arch`` only for what weights cannot tell (norm groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# latent space -> (channels, scaling_factor, shift_factor) of its diffusion-space convention (REFERENCE.md section 1);
# FLUX.2's is the 32-ch H/8 space that vae.decode and TAEF2 use
LATENT_SPACES: dict[str, tuple[int, float, float]] = {
    "sd1": (4, 0.18215, 0.0), "sdxl": (4, 0.13025, 0.0), "sd3": (16, 1.5305, 0.0609), "flux1": (16, 0.3611, 0.1159),
    "flux2": (32, 1.0, 0.0)}
_KL = dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32)
_DIFFUSERS = ("config.json", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class Preset:
    name: str
    repo: str
    subfolder: str | None = None
    allow_patterns: tuple[str, ...] = _DIFFUSERS  # relative to ``subfolder``
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    family: str = "kl"  # "kl" (AutoencoderKL) or "taesd"
    latent_space: str | None = None  # a key of LATENT_SPACES: names exports (ComfyUI's TAESD file names)
    arch: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


def _kl(name, repo, space, subfolder=None, **arch) -> Preset:
    channels, scale, shift = LATENT_SPACES[space]
    return Preset(name, repo, subfolder, scaling_factor=scale, shift_factor=shift, latent_space=space,
                  arch=MappingProxyType({**_KL, "latent_channels": channels, **arch}))


def _tiny(name, repo, space, **arch) -> Preset:
    return Preset(name, repo, family="taesd", latent_space=space,
                  arch=MappingProxyType({"latent_channels": LATENT_SPACES[space][0], **arch}))


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _kl("sd1", "stabilityai/sd-vae-ft-mse", "sd1", use_quant_conv=True),
    _kl("sd1-ema", "stabilityai/sd-vae-ft-ema", "sd1", use_quant_conv=True),
    _kl("sdxl", "stabilityai/sdxl-vae", "sdxl", use_quant_conv=True),
    _kl("sdxl-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", "sdxl", use_quant_conv=True),
    _kl("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", subfolder="vae", use_quant_conv=False),
    _kl("flux1", "black-forest-labs/FLUX.1-dev", "flux1", subfolder="vae", use_quant_conv=False),
    # FLUX.2: latents handed between models are the 32-ch H/8 space of vae.decode and TAEF2 (scale 1,
    # shift 0); the transformer's patchified/BN space is AutoencoderKL.normalize_latents
    _kl("flux2", "black-forest-labs/FLUX.2-dev", "flux2", subfolder="vae", use_quant_conv=False, flux2=True),
    _tiny("taesd", "madebyollin/taesd", "sd1"),
    _tiny("taesdxl", "madebyollin/taesdxl", "sdxl"),
    _tiny("taesd3", "madebyollin/taesd3", "sd3"),
    _tiny("taef1", "madebyollin/taef1", "flux1"),
    # TAEF2's pool branches have no diffusers AutoencoderTiny equivalent: original encoder/decoder halves
    Preset("taef2", "madebyollin/taef2", allow_patterns=("*.json", "*encoder*", "*decoder*"), family="taesd",
           latent_space="flux2", arch=MappingProxyType({"latent_channels": 32, "flux_2": True})),
]}


def get_preset(name: str | Preset | None) -> Preset | None:
    """The preset called ``name`` (``None`` passes through); unknown names list the known ones."""
    if name is None or isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
