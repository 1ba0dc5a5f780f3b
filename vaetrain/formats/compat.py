"""Which real tools can read an export, and the names they look for.

The checks mirror what the loaders do, read from their public code (paraphrased here, not copied):

- ComfyUI ``comfy/sd.py``, class ``VAE``: a state dict with ``decoder.conv_in.weight`` (original LDM layout; diffusers
  keys are converted first) is built as the SD kl-f8 architecture with FIXED widths (``ch=128``, ``ch_mult`` (1,2,4,4),
  or (1,2,4) when there is no third downsampler, ``num_res_blocks=2``, GroupNorm(32), midblock attention always
  built); only the latent channels (from ``decoder.conv_in``), the quant convs (present or not) and FLUX.2's
  ``bn.running_*`` come from the file. 64-channel files are taken for HunyuanImage's VAE. The weights are loaded
  with ``strict=False``: a narrower model fails with a size mismatch, a model without midblock attention loads with
  a "Missing VAE keys" warning and a random attention block (NaN or garbage images).
- A1111 ``modules/sd_vae.py`` ``_load_vae_dict``: ``first_stage_model.load_state_dict(vae_dict)`` (strict) into the
  loaded checkpoint's own VAE, i.e. SD1/SD2/SDXL (4 channels with quant convs) or SD3 (16 channels without); the
  same fixed widths; no FLUX.
- ComfyUI ``nodes.py`` ``VAELoader.vae_list`` / ``load_taesd``: a TAESD is offered when the ``vae_approx`` folder has
  ``<name>_encoder.*`` AND ``<name>_decoder.*`` for ``name`` in taesd, taesdxl, taesd3, taef1 (and taef2 in newer
  versions); ``load_taesd`` sets the latent scale/shift from the name. ``comfy/taesd/taesd.py`` builds madebyollin's
  64-wide 8x ``Encoder``/``Decoder`` with the latent channels read from ``taesd_decoder.1.weight``.
"""

from __future__ import annotations

from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.mlp import MLPAutoencoder
from vaetrain.models.presets import LATENT_SPACES
from vaetrain.models.taesd import TAESD
from vaetrain.safe import UserError

# ComfyUI vae_approx name prefix -> latent space (ComfyUI nodes.py VAELoader.load_taesd sets the scale/shift by name)
TAESD_PREFIXES = {"taesd": "sd1", "taesdxl": "sdxl", "taesd3": "sd3", "taef1": "flux1", "taef2": "flux2"}
_PREFIX_OF = {space: prefix for prefix, space in TAESD_PREFIXES.items()}
_CHANNELS = {prefix: LATENT_SPACES[space][0] for prefix, space in TAESD_PREFIXES.items()}
# the only widths ComfyUI's and A1111's KL builders make (comfy/sd.py ddconfig; A1111 uses the checkpoint's VAE)
_KL_STANDARD = dict(in_channels=3, out_channels=3, base_channels=128, num_res_blocks=2, norm_groups=32)
KL_FIX = "load the diffusers export (format=diffusers) with diffusers' from_pretrained instead"
TAESD_FIX = "load it with madebyollin's taesd.py or vaetrain (or, 8x/4x without flux_2, export format=diffusers)"


def latent_space(model) -> str | None:
    """The latent space (``sd1``, ``sdxl``, ``sd3``, ``flux1``, ``flux2``) ``model`` speaks, when it can be told.

    From the model's own ``latent_space`` (set by presets, TAESD file names, ``VAEApprox``), else from the latent
    convention: FLUX.2's architecture, or scale/shift/channels matching one public space (REFERENCE.md section 1).
    """
    own = getattr(model, "latent_space", None)
    if own in LATENT_SPACES:
        return own
    if isinstance(model, AutoencoderKL) and model.params.flux2:
        return "flux2"
    if isinstance(model, TAESD) and model.flux_2 and model.latent_channels == 32:
        return "flux2"
    if isinstance(model, (AutoencoderKL, MLPAutoencoder)):
        for name, (channels, scale, shift) in LATENT_SPACES.items():
            if (channels == model.latent_channels and abs(scale - model.scaling_factor) < 1e-6
                    and abs(shift - model.shift_factor) < 1e-6 and name != "flux2"):
                return name
    return None


def kl_loader_problems(ae: AutoencoderKL) -> dict[str, str]:
    """Tool -> why it cannot build this AutoencoderKL from an ``original`` export (empty: ComfyUI and A1111 can)."""
    p = ae.params
    off = {k: getattr(p, k) for k, want in _KL_STANDARD.items() if getattr(p, k) != want}
    widths = (f"{', '.join(f'{k}={v}' for k, v in off.items())} (it builds "
              f"{', '.join(str(_KL_STANDARD[k]) for k in off)})") if off else None
    half = None if ae.has_encoder and ae.has_decoder else "only the " + ("decoder" if ae.has_decoder else "encoder")
    attn = not (p.encoder_attention and p.decoder_attention)
    comfy = [half, widths,
             "no midblock attention (always built, left random: NaN/garbage images)" if attn else None,
             None if p.channel_mult in ((1, 2, 4, 4), (1, 2, 4)) else f"channel_mult={list(p.channel_mult)} "
                                                                      f"(it builds [1, 2, 4, 4] or [1, 2, 4])",
             "64 latent channels (read as HunyuanImage's VAE)" if p.latent_channels == 64 else None]
    a1111 = [half, widths, "no midblock attention (its strict load fails)" if attn else None,
             None if p.channel_mult == (1, 2, 4, 4) else f"channel_mult={list(p.channel_mult)} (it builds [1, 2, 4, 4])"]
    if p.flux2:
        a1111.append("no FLUX.2 support")
    elif (p.latent_channels, p.use_quant_conv) not in ((4, True), (16, False)):
        a1111.append(f"{p.latent_channels} latent channels with{'' if p.use_quant_conv else 'out'} quant convs "
                     f"(its VAEs: 4 with quant convs (SD1/SD2/SDXL), 16 without (SD3))")
    problems = {tool: "; ".join(r for r in reasons if r) for tool, reasons in (("ComfyUI", comfy), ("A1111", a1111))}
    return {tool: why for tool, why in problems.items() if why}


def taesd_prefix(ae: TAESD, latent_space_name: str | None = None,
                 override: str | None = None) -> tuple[str | None, str | None]:
    """(ComfyUI ``vae_approx`` name prefix or None when ComfyUI has no name for it, a note for the user or None).

    ``override`` wins (a known name must match the latent channels); then the latent space (given, or the model's);
    a 4- or 16-channel TAESD of unknown space is named after SD1 / SD3 with a note saying how to override.
    """
    if override is not None:
        if override not in _CHANNELS:
            return override, (f"taesd_prefix={override} is not a name ComfyUI's vae_approx folder recognises "
                              f"({', '.join(_CHANNELS)}): ComfyUI will not offer it")
        if _CHANNELS[override] != ae.latent_channels:
            raise UserError(f"taesd_prefix={override} names a {_CHANNELS[override]}-channel latent space but this "
                            f"TAESD has {ae.latent_channels} channels; pick a matching prefix")
        return override, None
    space = latent_space_name or latent_space(ae)
    if space is not None:
        if space not in _PREFIX_OF:
            raise UserError(f"latent_space={space!r} is not one of {', '.join(_PREFIX_OF)}")
        prefix = _PREFIX_OF[space]
        if _CHANNELS[prefix] != ae.latent_channels:
            raise UserError(f"latent_space={space} has {_CHANNELS[prefix]} channels but this TAESD has "
                            f"{ae.latent_channels}; pass the latent space the model was trained for")
        return prefix, None
    guess = {4: ("taesd", "SD1 (taesdxl for SDXL)"), 16: ("taesd3", "SD3 (taef1 for FLUX.1)")}.get(ae.latent_channels)
    if guess is None:
        return None, (f"no ComfyUI TAESD name fits {ae.latent_channels}-channel latents"
                      f"{'' if ae.flux_2 or ae.latent_channels != 32 else ' without the flux_2 pool branches'}; "
                      f"named after the output folder")
    return guess[0], (f"the latent space is not known (4/16 channels fit two); named {guess[0]}_* for {guess[1]}: "
                      f"pass taesd_prefix=... or latent_space=... to name it")


def taesd_loader_problems(ae: TAESD, prefix: str | None) -> dict[str, str]:
    """Tool -> why ComfyUI's vae_approx TAESD cannot build this model (empty when it can)."""
    if prefix not in TAESD_PREFIXES:
        return {"ComfyUI": f"no name its vae_approx folder offers ({', '.join(TAESD_PREFIXES)}) fits this "
                           f"{ae.latent_channels}-channel{' flux_2' if ae.flux_2 else ''} TAESD"}
    problems = []
    if ae.width != 64 or ae.downsample_factor != 8:
        problems.append(f"width {ae.width}, {ae.downsample_factor}x (ComfyUI's TAESD is 64 wide, 8x)")
    if ae.flux_2 != (prefix == "taef2"):
        problems.append("the flux_2 pool variant is only the taef2 layout" if ae.flux_2
                        else "taef2 files have the flux_2 pool branches, this model does not")
    if not (ae.has_encoder and ae.has_decoder):
        problems.append("ComfyUI's VAELoader offers a TAESD only when both halves are in vae_approx "
                        "(its latent previews use the decoder alone)")
    return {"ComfyUI": "; ".join(problems)} if problems else {}


def problems_line(path, problems: dict[str, str], fix: str = KL_FIX) -> str:
    """One line for the user: who cannot load ``path`` and what to use instead."""
    tools = "; ".join(f"{tool}: {why}" for tool, why in problems.items())
    return f"{path}: written, but not loadable by every tool ({tools}); {fix}"
