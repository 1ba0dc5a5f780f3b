"""Loader throughput against a plain PIL loop, the cost of corrupt samples, and the latent cache.

    python scripts/bench_data.py [--images 256] [--size 256] [--workers 0,1,2] [--repeat 3]

Every number is a ratio against a baseline measured in the same run on the same files, two ways: wall-clock
images/s (best of ``--repeat``, interleaved), and CPU seconds per image summed over the main process and the
loader workers (least of ``--repeat``; workers read from /proc, Linux), which other jobs on a shared machine
barely disturb; with a free core per worker the two agree.
1. ``ImageDataModule`` (WebDataset shards holding the photos' original bytes, and the folder source) vs a plain
   ``PIL open -> RGB -> resize short side -> centre crop -> tensor`` loop, for 0, 1 and 2 loader workers;
   "per worker" = loader img/s / (max(1, workers) x plain img/s); "cpu" = plain CPU/img / loader CPU/img
   (goal for both: >= 0.90 at 1 and 2 workers).
2. the same shards with 2% corrupt samples added (half junk bytes, half JPEGs cut in half): good images/s and
   CPU per good image against the clean shards (goal: < 5% slower), 2 x ``--repeat`` runs each, alternating
   which goes first, with the skip counts the loader reported (two epochs per run).
3. (``--cache``) seconds to cache the real TAEF2 teacher's latents, and a decoder-distillation step fed from
   the cache vs encoding with the teacher on the fly.
Needs the real assets (../shared/assets or $VAETRAIN_ASSETS).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaetrain.cli import assets_dir
from vaetrain.commands.cache_latents import cache_latents
from vaetrain.commands.shards import make_shards
from vaetrain.convention import uint8_to_model
from vaetrain.data import ImageDataModule, list_images
from vaetrain.data.tars import ShardWriter, members_of
from vaetrain.formats import load_autoencoder
from vaetrain.models.taesd import TAESD


def workers_cpu(loader) -> float:
    """CPU seconds used so far by the loader's live worker processes (from /proc: they are still running)."""
    total = 0.0
    for w in getattr(loader._iterator, "_workers", []):
        fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def plain_loop(files: list[str], size: int) -> tuple[float, float]:
    """The baseline: what anyone would write by hand. Returns (images/s, CPU seconds per image)."""
    c, t = time.process_time(), time.perf_counter()
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)))
        torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)
    return len(files) / (time.perf_counter() - t), (time.process_time() - c) / len(files)


def loader_rate(dm: ImageDataModule, n: int) -> tuple[float, float]:
    """Steady state: a second epoch with persistent workers (start-up, paid once per run, left out as it is from
    any long run). Returns (good images/s, CPU seconds per good image over the main process and the workers)."""
    loader = dm.train_dataloader()
    warm = sum(b["image"].shape[0] for b in loader)
    t, c, w = time.perf_counter(), time.process_time(), workers_cpu(loader)
    seen = sum(b["image"].shape[0] for b in loader)
    rate, cpu = seen / (time.perf_counter() - t), time.process_time() - c + workers_cpu(loader) - w
    assert warm == seen == n, (warm, seen, n)
    del loader
    gc.collect()
    return rate, cpu / seen


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return max(r for r, _ in runs), min(c for _, c in runs)


def salted_shards(clean: Path, out: Path, fraction: float, per_shard: int) -> int:
    """The clean shards' samples plus ``fraction`` corrupt ones spread evenly; returns how many were added."""
    samples = []
    for shard in sorted(clean.glob("*.tar")):
        members = members_of(shard.read_bytes())
        samples += [(n.split(".")[0], d) for n, d in members if n.endswith(".jpg")]
    target = max(1, round(len(samples) * fraction))
    every = len(samples) // target
    w = ShardWriter(out, "salted", max_samples=per_shard + -(-target // 4))
    added = 0
    for i, (key, data) in enumerate(samples):
        w.write(key, {"jpg": data})
        if (i + 1) % every == 0 and added < target:
            bad = b"\xff\xd8 junk " * 40 if added % 2 == 0 else data[: len(data) // 2]
            w.write(f"bad{added:05d}", {"jpg": bad})
            added += 1
    w.close()
    return added


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache", action="store_true", help="also part 3 (the latent cache)")
    p.add_argument("--cache-images", type=int, default=12)
    p.add_argument("--cache-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto", help="teacher/student device for part 3: auto | cpu | cuda")
    args = p.parse_args()
    torch.set_num_threads(1)
    assets = Path(assets_dir())
    if not (assets / "images").is_dir():
        sys.exit(f"bench_data: assets not found at {assets} (set VAETRAIN_ASSETS)")
    files = list_images(assets / "images" / "train" / "imagenet400")[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        folder = tmp / "photos"
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / Path(f).name)
        # 4 shards so 2 workers get equal shares; original bytes, no re-encode
        per_shard = max(1, len(files) // 4)
        make_shards([str(folder)], str(tmp / "shards"), max_samples=per_shard)
        n = len(files) // 4 * 4
        bs = 8 if n % 8 == 0 else 4
        files = list_images(folder)[:n]
        common = dict(image_size=args.size, batch_size=bs, crop="center", flip=False, shuffle=False,
                      persistent_workers=True, drop_last=False)

        print(f"# 1. loader vs plain PIL loop: {n} photos (~500x375 JPEG), {args.size}px centre crop, "
              f"{len(os.sched_getaffinity(0))} cpus, load average {os.getloadavg()[0]:.2f} at start")
        print(f"{'source':<11} {'workers':>7} {'plain img/s':>11} {'loader img/s':>12} {'ratio':>6} {'per worker':>10} "
              f"{'plain ms/img':>12} {'loader ms/img':>13} {'cpu':>5}")
        for w in (int(x) for x in args.workers.split(",")):
            for source in ("webdataset", "folder"):
                kw = dict(shards=str(tmp / "shards")) if source == "webdataset" else dict(folder=str(folder))
                plain, loader = [], []
                for _ in range(args.repeat):  # interleaved: both see the same machine load
                    plain.append(plain_loop(files, args.size))
                    loader.append(loader_rate(ImageDataModule(source=source, num_workers=w, **common, **kw), n))
                (p_rate, p_cpu), (l_rate, l_cpu) = best(plain), best(loader)
                ratio = l_rate / p_rate
                print(f"{source:<11} {w:>7} {p_rate:>11.1f} {l_rate:>12.1f} {ratio:>6.2f} {ratio / max(1, w):>10.2f} "
                      f"{p_cpu * 1e3:>12.2f} {l_cpu * 1e3:>13.2f} {p_cpu / l_cpu:>5.2f}")

        added = salted_shards(tmp / "shards", tmp / "salted", 0.02, per_shard)
        print(f"\n# 2. 2% corrupt samples: the same {n} photos + {added} corrupt (junk bytes / JPEGs cut in half)")
        print(f"{'workers':>7} {'clean img/s':>11} {'salted img/s':>12} {'slower':>7} {'clean ms/img':>12} "
              f"{'salted ms/img':>13} {'cpu cost':>8}  skips")
        for w in (int(x) for x in args.workers.split(",")):
            clean, salted, skips = [], [], {}
            for i in range(2 * args.repeat):
                for kind in ("clean", "salted")[:: 1 if i % 2 else -1]:  # alternate which goes first
                    dm = ImageDataModule(source="webdataset", shards=str(tmp / ("shards" if kind == "clean" else kind)),
                                         num_workers=w, max_skip_rate=0.05, **common)
                    (clean if kind == "clean" else salted).append(loader_rate(dm, n))
                    if kind == "salted":
                        skips = {k: v for k, v in dm.skip_stats().items() if v and k != "samples"}
            (c_rate, c_cpu), (s_rate, s_cpu) = best(clean), best(salted)
            print(f"{w:>7} {c_rate:>11.1f} {s_rate:>12.1f} {1 - s_rate / c_rate:>7.1%} {c_cpu * 1e3:>12.2f} "
                  f"{s_cpu * 1e3:>13.2f} {s_cpu / c_cpu - 1:>8.1%}  {skips}")
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
        if args.cache:
            bench_cache(assets, folder, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_cache(assets: Path, folder: Path, tmp: Path, args) -> None:
    w = assets / "weights"
    teacher = load_autoencoder([str(w / "taef2_encoder.pth"), str(w / "taef2_decoder.pth")]).eval()
    files = list_images(folder)[: args.cache_images]
    sub = tmp / "cache_src"
    sub.mkdir()
    for f in files:
        shutil.copy(f, sub / Path(f).name)
    size, bs = args.cache_size, 4
    image_dm = dict(source="folder", folder=str(sub), image_size=size, batch_size=bs, num_workers=0,
                    crop="center", flip=False, shuffle=False, drop_last=False)
    t = time.perf_counter()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    s = cache_latents(teacher, ImageDataModule(**image_dm), str(tmp / "cache"), dtype="fp16", device=str(dev))
    total = time.perf_counter() - t
    print(f"\n# 3. cache-latents, real TAEF2 on {dev}, {s['samples']} photos at {size}px: {total:.2f} s "
          f"({s['samples'] / total:.1f} img/s; teacher encode {s['encode_seconds']:.2f} s)")

    torch.manual_seed(0)
    student = TAESD(latent_channels=32, width=16, encoder=False).to(dev)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step(batch, latent):
        loss = torch.nn.functional.mse_loss(student.decode(latent), uint8_to_model(batch["image"].to(dev)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(kind: str) -> float:
        if kind == "cached":
            dm = ImageDataModule(source="cached", shards=str(tmp / "cache"), image_size=size, batch_size=bs,
                                 num_workers=0, crop="center", flip=False, shuffle=False, drop_last=True)
            dm.expect_teacher(teacher)
        else:
            dm = ImageDataModule(**{**image_dm, "drop_last": True})
        times = []
        for i, batch in enumerate(_cycle(dm, args.steps + 1)):
            t0 = time.perf_counter()  # the loader's own time is measured above; here: teacher + student
            if kind == "cached":
                latent = batch["latent"].to(dev).float()
            else:
                with torch.no_grad():
                    latent = teacher.encode(uint8_to_model(batch["image"].to(dev)))
            step(batch, latent)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up allocators
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    live, cached = run("live"), run("cached")
    print(f"   decoder-distillation step (TAESD-w16 decoder student, batch {bs} at {size}px, median of {args.steps}): "
          f"live teacher encode {live * 1e3:.1f} ms, cached latents {cached * 1e3:.1f} ms "
          f"(saving {1 - cached / live:.0%})")


def _cycle(dm: ImageDataModule, n: int):
    loader, got = dm.train_dataloader(), 0
    while got < n:
        for b in loader:
            yield b
            got += 1
            if got >= n:
                return


if __name__ == "__main__":
    main()
