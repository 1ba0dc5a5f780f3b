"""The photos shipped inside the package (``vaetrain/assets/photos``): public-domain / CC0 images, a train and a
disjoint val folder, so that the no-argument job runs with nothing beside the install. Their sources and licences
are in ``SOURCES.md`` next to them. Configs name them as ``${photos:train}`` / ``${photos:val}``."""

from __future__ import annotations

from importlib.resources import files

SPLITS = ("train", "val")


def photos_dir(split: str = "") -> str:
    """The packaged photo folder of ``split`` (train | val), or the folder holding both ('')."""
    if split and split not in SPLITS:
        raise ValueError(f"photos: no packaged split {split!r} (one of {', '.join(SPLITS)})")
    root = files("vaetrain") / "assets" / "photos"
    return str(root / split) if split else str(root)
