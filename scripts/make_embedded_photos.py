"""Rebuild vaetrain/assets/photos (the no-argument job's photos) from the wheels that ship them.

Every image is public domain, CC0 or CC BY 2.0 (with its attribution) as stated by the package that bundles it (see
the SOURCES.md this writes). Downscaled to at most 512 px (train) and a 256 px short side (val), stored as JPEG q90, so
the whole set stays well under a few MB:

    pip download --no-deps scikit-image==0.26.0 scipy==1.9.3 scikit-learn -d /tmp/whl
    python scripts/make_embedded_photos.py /tmp/whl/scikit_image-*.whl /tmp/whl/scipy-1.9.3-*.whl /tmp/whl/scikit_learn-*.whl
"""

from __future__ import annotations

import argparse
import bz2
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "vaetrain" / "assets" / "photos"

# (split, name, wheel, member, what, licence as the package states it)
PHOTOS = [
    ("train", "astronaut", "skimage", "skimage/data/astronaut.png", "astronaut Eileen Collins (NASA Great Images)",
     "public domain (NASA; 'no known copyright restrictions, released into the public domain')"),
    ("train", "raccoon", "scipy", "scipy/misc/face.dat", "raccoon face (scipy.misc.face, raccoon-procyon-lotor.jpg)",
     "public domain (from public-domain-image.com, as scipy.misc.face states)"),
    ("train", "china", "sklearn", "sklearn/datasets/images/china.jpg", "Chinese temple (Flickr 6061409035)",
     "CC BY 2.0, attribution: danielbuechele (as scikit-learn's images/README.txt states)"),
    ("train", "flower", "sklearn", "sklearn/datasets/images/flower.jpg", "flower (Flickr 6056698931)",
     "CC BY 2.0, attribution: vultilion (flickr.com/photos/vultilion; scikit-learn's README.txt names danielbuechele)"),
    ("train", "hubble_deep_field", "skimage", "skimage/data/hubble_deep_field.jpg", "Hubble eXtreme Deep Field",
     "public domain (NASA: 'may be freely used in the public domain')"),
    ("train", "retina", "skimage", "skimage/data/retina.jpg", "fundus photograph of a normal left eye (Wikimedia)",
     "CC0 1.0 (Mikael Häggström)"),
    ("train", "ihc", "skimage", "skimage/data/ihc.png", "immunohistochemistry stain of colonic glands (CMMI)",
     "no known copyright restrictions (as scikit-image states)"),
    ("train", "camera", "skimage", "skimage/data/camera.png", "man with a camera (greyscale)",
     "CC0 (photographer Lav Varshney)"),
    ("train", "clock", "skimage", "skimage/data/clock_motion.png", "motion-blurred wall clock (greyscale)",
     "public domain (photographer Stefan van der Walt)"),
    ("train", "grass", "skimage", "skimage/data/grass.png", "grass texture (greyscale, DeviantArt Grass-01)",
     "CC0 (as scikit-image states)"),
    ("train", "gravel", "skimage", "skimage/data/gravel.png", "gravel texture (greyscale, CC0Textures Gravel04)",
     "CC0"),
    ("train", "brick", "skimage", "skimage/data/brick.png", "brick wall (greyscale, CC0Textures Bricks25)", "CC0"),
    ("train", "coins", "skimage", "skimage/data/coins.png", "Greek coins from Pompeii (Brooklyn Museum, greyscale)",
     "no known copyright restrictions (as scikit-image states)"),
    ("val", "chelsea", "skimage", "skimage/data/chelsea.png", "Chelsea the cat",
     "CC0 (photographer Stefan van der Walt)"),
    ("val", "coffee", "skimage", "skimage/data/coffee.png", "coffee cup (Pikolo Espresso Bar)",
     "CC0 (photographer Rachel Michetti)"),
    ("val", "rocket", "skimage", "skimage/data/rocket.jpg", "launch of DSCOVR on a Falcon 9 (SpaceX Photos)",
     "public domain (released into the public domain by SpaceX)"),
]


def load(wheel: zipfile.ZipFile, member: str) -> Image.Image:
    data = wheel.read(member)
    if member.endswith("face.dat"):  # a bz2-compressed raw (768, 1024, 3) uint8 array
        return Image.fromarray(np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3))
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB")


def fit(img: Image.Image, split: str) -> Image.Image:
    w, h = img.size
    k = 512 / max(w, h) if split == "train" else 256 / min(w, h)
    return img if k >= 1 else img.resize((round(w * k), round(h * k)), Image.LANCZOS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("skimage_wheel")
    p.add_argument("scipy_wheel")
    p.add_argument("sklearn_wheel")
    args = p.parse_args()
    paths = {"skimage": args.skimage_wheel, "scipy": args.scipy_wheel, "sklearn": args.sklearn_wheel}
    wheels = {k: zipfile.ZipFile(v) for k, v in paths.items()}
    names = {k: Path(v).name.split("-")[:2] for k, v in paths.items()}
    rows = []
    for split, name, wheel, member, what, licence in PHOTOS:
        img = fit(load(wheels[wheel], member), split)
        (OUT / split).mkdir(parents=True, exist_ok=True)
        img.save(OUT / split / f"{name}.jpg", quality=90, optimize=True)
        pkg = "==".join(names[wheel]).replace("_", "-")
        rows.append(f"| {split}/{name}.jpg | {img.size[0]}x{img.size[1]} | {what} | {licence} | {pkg}: `{member}` |")
    (OUT / "SOURCES.md").write_text(
        "# Photos of the no-argument job (`vaetrain train`)\n\n"
        "Every image is public domain, CC0 or CC BY 2.0 (credit as given; or, where marked, has no known copyright\n"
        "restrictions) as stated in the docstrings / README of the package that bundles it. Changes: downscaled and\n"
        "re-encoded as JPEG by\n"
        "`scripts/make_embedded_photos.py`. `train/` and `val/` hold different photos.\n\n"
        "| file | size | what | licence | taken from (PyPI package: file) |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
