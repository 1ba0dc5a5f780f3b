import os
import sys
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


def pytest_sessionfinish(session, exitstatus):
    """In-process CLI tests start wandb's service (the default logger writes an offline run); stop it here, while
    pytest still reports, rather than in wandb's exit hook, where a broken service shows only as a stuck exit."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        try:
            wandb.teardown()
        except Exception as e:  # a dead service must not turn a green run red; say so and go on
            print(f"\nwandb teardown: {type(e).__name__}: {e}", file=sys.stderr)
