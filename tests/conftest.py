import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VAETRAIN_ASSETS", ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real weights and photos of ../shared/assets; tests that need them skip without them."""
    if not (ASSETS / "weights").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (set VAETRAIN_ASSETS to the shared/assets folder)")
    return ASSETS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
