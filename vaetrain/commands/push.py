"""``vaetrain push SRC org/name``: upload an export to the Hugging Face hub with a model card.

SRC is an export folder (``RUN/export/diffusers``, ``RUN/export/original`` with TAESD halves, ...) or a single-file
export (``RUN/export/original.safetensors``). The card (README.md, written into the export first) has the format and
how each tool loads it, what the ComfyUI/A1111 checks and the fp16 audit recorded, the training command, the run's
resolved config and its measured metrics (the run's validation numbers and any ``vaetrain eval`` summaries given).
The upload is ``huggingface_hub``'s ``create_repo`` + ``upload_folder``; the login is huggingface_hub's own
(``HF_TOKEN`` or ``huggingface-cli login``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from huggingface_hub import HfApi

from vaetrain.formats.card import CARD_NAME, export_summary, find_run, render, write_card
from vaetrain.formats.export import read_json
from vaetrain.safe import UserError, one_line


def prepare(source, repo_id: str, command: str | None = None, metrics: Sequence[str] | str | None = None,
            license: str | None = None) -> dict:
    """Write the model card into the export; return what ``push`` would upload (folder, files, card text)."""
    src = Path(os.path.expanduser(str(source)))
    if not src.exists():
        raise UserError(f"{src}: not found; pass an export folder or file (e.g. RUN/export/diffusers)")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise UserError(f"repo_id={repo_id!r}: expected org/name (or user/name)")
    summary = export_summary(src)
    run = find_run(src)
    result = read_json(run / "result.json", "result.json") if run is not None else {}
    config = read_json(run / "config.json", "config.json") if run is not None and (run / "config.json").is_file() \
        else None
    measured = {}
    if result.get("val"):
        measured["validation"] = result["val"]
    for path in [metrics] if isinstance(metrics, str) else list(metrics or []):
        measured[Path(path).parent.name or Path(path).stem] = _metric_values(read_json(path, "metrics"))
    if summary.get("metrics"):
        measured.setdefault("export", summary["metrics"])
    command = command or result.get("command") or summary.get("command")
    text = render(summary, repo_id, command=command, config=config, metrics=measured, license=license)
    card = write_card(src, text)
    folder = src if src.is_dir() else src.parent
    files = sorted({*summary["files"], *(["config.json"] if summary.get("format") == "diffusers" else []), CARD_NAME})
    return {"folder": str(folder), "files": files, "card": str(card), "text": text, "run": str(run) if run else None}


def _metric_values(summary: dict) -> dict:
    """An eval summary's numbers (student_vs_real, ...), without its bookkeeping (folder, seconds, ...)."""
    return {k: v for k, v in summary.items() if isinstance(v, dict)} or summary


def push(source, repo_id: str, private: bool = False, revision: str | None = None, command: str | None = None,
         metrics: Sequence[str] | str | None = None, license: str | None = None, commit_message: str | None = None,
         dry_run: bool = False) -> dict:
    """Write the card, create the repo (kept if it exists) and upload the export's files; returns what was sent."""
    plan = prepare(source, repo_id, command=command, metrics=metrics, license=license)
    plan["repo_id"] = repo_id
    if dry_run:
        print(f"vaetrain push: dry run: would upload {', '.join(plan['files'])} from {plan['folder']} to {repo_id}")
        return plan
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=plan["folder"], allow_patterns=plan["files"],
                                 repo_type="model", revision=revision,
                                 commit_message=commit_message or f"vaetrain export ({len(plan['files'])} files)")
    except Exception as e:  # auth, network, permissions: one line, not a traceback
        hint = " (log in with `huggingface-cli login` or set HF_TOKEN)" if "401" in str(e) or "token" in str(e).lower() \
            else ""
        raise UserError(f"push to {repo_id} failed: {type(e).__name__}: {one_line(e, 300)}{hint}") from None
    plan["url"] = str(getattr(info, "commit_url", info))
    print(f"vaetrain push: uploaded {', '.join(plan['files'])} to {repo_id} ({plan['url']})")
    return plan
