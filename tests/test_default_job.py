"""The no-argument job (`vaetrain train`) needs nothing beside the package: its photos ship inside it (with their
licences), it composes and trains with the shared assets absent, and its train and val photos are disjoint."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vaetrain.cli import compose, main, run
from vaetrain.data import list_images
from vaetrain.data.embedded import photos_dir
from vaetrain.formats import load_autoencoder

TINY = ["student.width=8", "data.batch_size=2", "data.num_workers=0", "data.epoch_length=4", "data.val_count=2",
        "data.val_image_size=64", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=csv"]


@pytest.fixture
def no_shared_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("VAETRAIN_ASSETS", str(tmp_path / "no-assets"))
    monkeypatch.chdir(tmp_path)


def test_packaged_photos_are_there_with_their_licences():
    root = Path(photos_dir())
    train, val = list_images(photos_dir("train")), list_images(photos_dir("val"))
    assert len(train) >= 8 and len(val) >= 3
    assert not {Path(f).name for f in train} & {Path(f).name for f in val}, "train and val share a photo"
    sources = (root / "SOURCES.md").read_text()
    for f in train + val:
        row = next((line for line in sources.splitlines() if f"{Path(f).parent.name}/{Path(f).name}" in line), None)
        assert row is not None, f"{f} has no entry in SOURCES.md"
        assert any(s in row for s in ("public domain", "CC0", "CC BY", "no known copyright")), row
    assert sum(Path(f).stat().st_size for f in train + val) < 3_000_000  # a few MB at most in the wheel
    with pytest.raises(ValueError, match="no packaged split"):
        photos_dir("test")


def test_default_config_reads_only_the_package(no_shared_assets):
    cfg = OmegaConf.to_container(compose("train", []), resolve=True)
    assert cfg["data"]["folder"] == photos_dir("train") and cfg["data"]["val_folder"] == photos_dir("val")

    def paths(node):
        if isinstance(node, dict):
            return [p for v in node.values() for p in paths(v)]
        if isinstance(node, list):
            return [p for v in node for p in paths(v)]
        return [node] if isinstance(node, str) and ("no-assets" in node or "shared" in node) else []

    assert paths(cfg) == [], "the default job still names the shared assets"
    assert "lpips" not in cfg["loss"] and not cfg.get("discriminator")  # nothing to download


def test_default_job_trains_two_steps_without_the_shared_assets(no_shared_assets, tmp_path):
    out = tmp_path / "job"
    r = run("train", [f"run_dir={out}", *TINY])
    assert r["steps"] == 2 and (out / "checkpoints" / "last.ckpt").exists()
    assert json.loads((out / "result.json").read_text())["steps"] == 2
    rows = list(csv.DictReader(open(r["logs"]["csv"])))
    assert any(row.get("val/psnr_gt") for row in rows)
    exported = load_autoencoder(r["exports"]["diffusers"])
    assert exported.downsample_factor == 4 and exported.latent_channels == 4


def test_a_recipe_that_needs_the_shared_assets_says_what_to_do(no_shared_assets, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", f"run_dir={tmp_path / 'r'}", "trainer.max_steps=1", "data.folder=${assets:images/train}"])
    msg = str(e.value)
    assert "\n" not in msg and "no-assets" in msg and "VAETRAIN_ASSETS" in msg and "experiment=tiny" in msg
