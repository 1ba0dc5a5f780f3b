"""The model card (``README.md`` with Hugging Face front matter) of an export: what it is, how each tool loads it,
what it can and cannot be loaded by, the training command and config, and the measured metrics.

Everything comes from the export itself (the ``vaetrain_export`` / config metadata in its weights, a diffusers
``config.json``), the run folder it was exported into (``config.json``, ``result.json``) and what the caller adds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from vaetrain.formats.checkpoint import NATIVE_KEY
from vaetrain.formats.export import EXPORT_KEY
from vaetrain.formats.io import read_metadata
from vaetrain.formats.kl import METADATA_KEY, WEIGHT_SUFFIXES
from vaetrain.formats.tiny import CONFIG_KEY
from vaetrain.models.presets import PRESETS
from vaetrain.safe import UserError, atomic_write

CARD_NAME = "README.md"


def weight_files(source: Path) -> list[Path]:
    """The weight files an export consists of: the file itself, or the folder's weights (not recursive)."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def export_summary(source: Path) -> dict[str, Any]:
    """Format, model class, params and the ``vaetrain_export`` record of an export folder or file."""
    files = weight_files(source)
    if not files:
        raise UserError(f"{source}: no weights here (.safetensors/.pth/...); pass an export folder or file")
    meta = read_metadata(files[0])
    summary: dict[str, Any] = {"files": [f.name for f in files], **_json(meta.get(EXPORT_KEY))}
    config_json = source / "config.json" if source.is_dir() else None
    if config_json is not None and config_json.is_file():  # a diffusers folder
        cfg = _json(config_json.read_text())
        summary.update(format="diffusers", diffusers_class=cfg.get("_class_name"), diffusers_config=cfg)
    elif METADATA_KEY in meta:
        summary.update(model="AutoencoderKL", params=_json(meta[METADATA_KEY]))
    elif CONFIG_KEY in meta:
        kind = meta.get("vaetrain_model", "")
        summary.update(model={"taesd": "TAESD", "mlp": "MLPAutoencoder", "vae_approx": "VAEApprox"}.get(kind, kind),
                       params=_json(meta[CONFIG_KEY]))
    elif NATIVE_KEY in meta:
        desc = _json(meta[NATIVE_KEY])
        summary.update(format="safetensors", model=str(desc.get("class", "")).rsplit(".", 1)[-1],
                       params=desc.get("params", {}))
    summary.setdefault("format", "weights")
    return summary


def _json(text) -> dict:
    try:
        value = json.loads(text) if text else {}
    except (TypeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def find_run(source: Path) -> Path | None:
    """The run folder an export lives in (``RUN/export/FORMAT``): the nearest ancestor with ``result.json``."""
    for folder in list(source.resolve().parents)[:3]:
        if (folder / "result.json").is_file():
            return folder
    return None


def base_model(config: Mapping | None) -> str | None:
    """The hub repo of the run's teacher, when it is a preset."""
    teacher = (config or {}).get("teacher")
    name = teacher.get("preset") if isinstance(teacher, Mapping) else None
    return PRESETS[name].repo if name in PRESETS and not teacher.get("source") else None


def _flat_metrics(metrics: Mapping, prefix: str = "") -> list[tuple[str, float]]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            rows.append((f"{prefix}{k}", v))
        elif isinstance(v, Mapping):
            rows += _flat_metrics(v, f"{prefix}{k}/")
    return rows


def _usage(summary: Mapping, repo: str) -> list[str]:
    fmt, files = summary.get("format"), summary.get("files", [])
    if fmt == "diffusers":
        cls = summary.get("diffusers_class") or "AutoencoderKL"
        return ["```python", f"from diffusers import {cls}", f'vae = {cls}.from_pretrained("{repo}")', "```"]
    if summary.get("model") == "TAESD":
        return ["Put " + " and ".join(f"`{f}`" for f in files) + " in ComfyUI's `models/vae_approx` (its VAELoader "
                "offers the pair by that name; latent previews use the decoder), or load them with madebyollin's "
                "`taesd.py` (`TAESD(encoder_path=..., decoder_path=...)`) or `vaetrain.formats.load_autoencoder`."]
    if summary.get("model") == "AutoencoderKL":
        return [f"Put `{files[0]}` in ComfyUI's `models/vae` or A1111's `models/VAE` (see Compatibility), or load it "
                f'with diffusers: `AutoencoderKL.from_single_file("{files[0]}", config=...)` with a diffusers '
                "config folder of the same architecture, or `vaetrain.formats.load_autoencoder`."]
    return [f'`vaetrain.formats.load_autoencoder("{files[0] if files else repo}")`']


def render(summary: Mapping[str, Any], repo: str, command: str | None = None, config: Mapping | None = None,
           metrics: Mapping[str, Mapping] | None = None, license: str | None = None) -> str:
    """The README.md text. ``metrics``: source name -> (nested) metric dict."""
    tags = ["vaetrain", "vae", "autoencoder"] + [t for t in (summary.get("latent_space"),) if t]
    front = ["---"]
    if summary.get("format") == "diffusers":
        front.append("library_name: diffusers")
    if license:
        front.append(f"license: {license}")
    if base := base_model(config):
        front.append(f"base_model: {base}")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    model = summary.get("diffusers_class") or summary.get("model") or "autoencoder"
    lines = front + [f"# {repo.rsplit('/', 1)[-1]}", "",
                     f"`{model}` trained with vaetrain, exported as `{summary.get('format')}`"
                     + (f" ({summary['dtype']} weights)" if summary.get("dtype") else "") + "."
                     + (f" Latent space: {summary['latent_space']}." if summary.get("latent_space") else ""),
                     "", "## How to load", ""] + _usage(summary, repo)
    lines += ["", "## Compatibility", ""]
    loaders = summary.get("loaders")
    if isinstance(loaders, Mapping):
        lines += [f"- **{tool}** cannot load this file: {why}." for tool, why in loaders.items()]
    elif loaders:
        lines.append(f"- {loaders}.")
    if "fp16_safe" in summary:
        audit = dict(summary.get("fp16_audit", {}))
        resolutions = audit.pop("resolutions", None)
        lines.append(f"- fp16: {'safe' if summary['fp16_safe'] else 'NOT safe'} by `vaetrain audit-fp16` "
                     f"({json.dumps(audit)})"
                     + ("; diffusers' `force_upcast` is off" if summary["fp16_safe"] else ""))
        if isinstance(resolutions, Mapping):
            lines += ["", "| size (px) | fp16 output | largest activation | headroom to 65504 |", "|---|---|---|---|"]
            lines += [f"| {s} | {'finite' if r.get('finite') else 'inf/NaN'} | {float(r.get('max_abs', 0)):.4g} "
                      f"| {float(r.get('headroom', 0)):.3g}x |" for s, r in resolutions.items()]
    params = summary.get("params") or summary.get("diffusers_config")
    if params:
        lines += ["", "<details><summary>Architecture</summary>", "", "```json", json.dumps(params, indent=2), "```",
                  "", "</details>"]
    lines += ["", "## Training", ""]
    lines += ["```bash", command, "```"] if command else ["The training command was not recorded."]
    if config:
        lines += ["", "<details><summary>Resolved config</summary>", "", "```json",
                  json.dumps(config, indent=2, default=str), "```", "", "</details>"]
    rows = [(f"{src}: {k}" if src else k, v) for src, m in (metrics or {}).items() for k, v in _flat_metrics(m)]
    if rows:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_card(source: Path, text: str) -> Path:
    """README.md into the export folder (beside the file for a single-file export)."""
    folder = source if source.is_dir() else source.parent
    return atomic_write(folder / CARD_NAME, text)
