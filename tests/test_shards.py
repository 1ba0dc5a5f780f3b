"""`vaetrain shards`: packing, limits, manifest, reproducibility, odd names and bad files."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from vaetrain.cli import run
from vaetrain.commands.shards import make_shards
from vaetrain.data import ImageDataModule
from vaetrain.safe import UserError


@pytest.fixture(scope="module")
def folders(assets, tmp_path_factory) -> Path:
    """Two input folders: 10 real photos (one named jack-o'-lantern) + a caption, and a folder of oddities."""
    root = tmp_path_factory.mktemp("in")
    a, b = root / "photos", root / "misc" / "deep"
    a.mkdir()
    b.mkdir(parents=True)
    src = sorted((assets / "images" / "train" / "imagenet400").iterdir())
    pick = [f for f in src if "jack-o'-lantern" in f.name] + [f for f in src if "'" not in f.name][:9]
    for f in pick:
        shutil.copy(f, a / f.name)
    (a / pick[1].name).with_suffix(".txt").write_text("a caption")
    Image.new("RGBA", (80, 60), (0, 255, 0, 128)).save(b / "alpha.png")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(b / "tiny.png")
    (b / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = (a / pick[2].name).read_bytes()
    (b / "cut.jpg").write_bytes(data[: len(data) // 3])
    (b / "notes.md").write_text("not an image")
    return root


def test_pack_manifest_limits_and_skips(folders, tmp_path):
    out = tmp_path / "s"
    m = make_shards([str(folders / "photos"), str(folders / "misc")], str(out), max_samples=4, max_size=64,
                    quality=90, min_size=32)
    assert m["samples"] == 11 and m["skipped"] == 3
    assert m["skipped_by_reason"] == {"corrupt_image": 1, "too_small": 1, "truncated_image": 1}
    assert [s["samples"] for s in m["shards"]] == [4, 4, 3] and m["pattern"] == "shard-{000000..000002}.tar"
    assert json.loads((out / "manifest.json").read_text())["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    names, metas, caption = [], [], None
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            for mem in tf.getmembers():
                assert mem.mtime == 0 and mem.uid == 0 and mem.uname == ""
                data = tf.extractfile(mem).read()
                names.append(mem.name)
                if mem.name.endswith(".json"):
                    metas.append(json.loads(data))
                elif mem.name.endswith(".txt"):
                    caption = data
                elif mem.name.endswith((".jpg", ".png")):
                    assert max(Image.open(io.BytesIO(data)).size) <= 64
    assert caption == b"a caption"
    assert any("jack-o'-lantern" in m_["source"] for m_ in metas)
    assert names[:2] == ["00000000.jpg", "00000000.json"]
    alpha = next(m_ for m_ in metas if m_["source"].endswith("alpha.png"))
    assert (alpha["width"], alpha["height"]) == (64, 48)


def test_byte_limit_and_reproducible(folders, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ma = make_shards([str(folders / "photos")], str(a), max_bytes=6000, max_size=48, quality=80)
    mb = make_shards([str(folders / "photos")], str(b), max_bytes=6000, max_size=48, quality=80)
    assert len(ma["shards"]) > 1 and all(s["bytes"] <= 6000 + 3 * 1024 + 10240 for s in ma["shards"])
    assert ma["sha256"] == mb["sha256"]  # same input, same bytes
    for s in ma["shards"]:
        assert (a / s["name"]).read_bytes() == (b / s["name"]).read_bytes()
    # a smaller re-run into the same folder removes the shards the manifest no longer lists
    m2 = make_shards([str(folders / "photos")], str(a), max_samples=100, max_size=48, quality=80)
    assert sorted(p.name for p in a.glob("*.tar")) == ["shard-000000.tar"] and m2["samples"] == 10


def test_keep_copies_bytes_and_loader_reads_them(folders, tmp_path):
    m = make_shards([str(folders / "photos")], str(tmp_path))
    with tarfile.open(tmp_path / m["shards"][0]["name"]) as tf:
        first = tf.extractfile("00000000.jpg").read()
    src = sorted(p for p in (folders / "photos").iterdir() if p.suffix != ".txt")[0]
    assert first == src.read_bytes()
    dm = ImageDataModule(source="webdataset", shards=str(tmp_path), image_size=32, batch_size=5, num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (5, 3, 32, 32)


def test_cli_positionals(folders, tmp_path):
    out = tmp_path / "cli"
    m = run("shards", [str(folders / "photos"), str(out), "max_samples=3", "format=webp", "max_size=40"])
    assert m["samples"] == 10 and len(m["shards"]) == 4
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert "00000000.webp" in tf.getnames()[:3]  # webdataset's TarWriter writes a sample's fields sorted
    with pytest.raises(UserError, match="format='gif'"):
        make_shards([str(folders / "photos")], str(out), format="gif")
    (tmp_path / "empty_in").mkdir()
    with pytest.raises(UserError, match="no images"):
        make_shards([str(tmp_path / "empty_in")], str(out))
    with pytest.raises(UserError, match="input folder /nonexistent/in does not exist"):
        make_shards(["/nonexistent/in"], str(out))


def test_a_killed_run_leaves_no_partial_shard(folders, tmp_path, monkeypatch):
    """Shards are written to a temporary name and renamed when complete: an interrupted pack leaves the finished
    shards and nothing half-written under a final name."""
    import vaetrain.commands.shards as shards_cmd

    real, calls = shards_cmd._encode, []

    def dying(args):
        calls.append(args)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(shards_cmd, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        make_shards([str(folders / "photos")], str(tmp_path), max_samples=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    for p in tmp_path.glob("*.tar"):
        with tarfile.open(p) as tf:
            assert len({n.split(".")[0] for n in tf.getnames()}) == 2  # two complete samples each
