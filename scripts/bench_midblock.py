"""Cost of the SD-family decoder's midblock attention: with vs without, at 512, 1024 and 2048 px.

Three measurements, all in one run so the ratios compare like with like:

1. FLOPs of the WHOLE decoder at the real SD/SDXL widths (ch 128, mult 1,2,4,4, 2 res blocks), with
   and without midblock attention, counted exactly by ``torch.utils.flop_counter`` on the meta
   device (no compute, so every size is cheap): the attention's share of the decoder.
2. Wall time and peak memory of the decoder's midblock section (``conv_in`` + ``mid``, real widths:
   512 channels at latent resolution), with vs without attention, each configuration in a fresh
   subprocess so its peak RSS is its own. Times are medians of ``--reps`` runs after one warm-up.
3. ``--full-decoder``: wall time of the whole real-width decoder at 512 px, with vs without
   attention (about a minute per pass on 2 CPU cores, hence off by default).

Default (sizes 512 1024) runs in about 2-3 minutes on 2 busy CPU cores; add 2048 with
``--sizes 512 1024 2048`` (the 65,536-token attention alone is ~4.4 TMAC: many minutes on a CPU).
The numbers are measured on this machine: quote ratios, not absolute times.

    python scripts/bench_midblock.py [--sizes 512 1024] [--reps 1] [--threads 2] [--full-decoder]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _build(attention: bool, device=None):
    from vaetrain.models.autoencoder_kl import AutoencoderKL

    with torch.device(device or "cpu"):
        return AutoencoderKL(latent_channels=4, encoder=False, decoder_attention=attention).eval()


def decoder_flops(px: int, attention: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ae = _build(attention, "meta")
    z = torch.empty(1, 4, px // 8, px // 8, device="meta")
    with FlopCounterMode(display=False) as fc:
        ae.decode_raw(z)
    return fc.get_total_flops()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(px: int, attention: bool, reps: int, part: str) -> dict:
    """Runs in a subprocess: time and peak memory of one configuration."""
    ae = _build(attention)
    dec = ae.decoder
    z = torch.randn(1, 4, px // 8, px // 8)

    def run():
        if part == "mid":
            return dec.mid(dec.conv_in(z))  # (1, 512, px/8, px/8)
        return ae.decode_raw(z)  # (1, 3, px, px)

    with torch.inference_mode():
        base = _rss_kib()
        times = []
        for i in range(reps + 1):
            t = time.perf_counter()
            run()
            if i:  # the first pass warms up allocator and kernels
                times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"px": px, "attention": attention, "part": part, "seconds": statistics.median(times),
            "peak_extra_mib": max(peak - base, 0) / 1024}


def _measure(px: int, attention: bool, reps: int, part: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", str(px), str(int(attention)), str(reps), part, str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"bench_midblock: worker {px}px attention={attention} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-decoder", action="store_true", help="also time the whole decoder at 512 px")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        px, attn, reps, part, threads = args.worker
        torch.set_num_threads(int(threads))
        print(json.dumps(worker(int(px), bool(int(attn)), int(reps), part)))
        return {}

    t0 = time.time()
    report: dict = {"flops": [], "mid": [], "full": []}
    print("1. whole SD decoder FLOPs (exact count, real widths)")
    print(f"   {'px':>5} {'with attn GFLOP':>16} {'no attn GFLOP':>14} {'attn share':>10}")
    for px in sorted(set(args.sizes) | {512, 1024, 2048}):
        with_a, without = decoder_flops(px, True), decoder_flops(px, False)
        share = 1 - without / with_a
        report["flops"].append({"px": px, "with": with_a, "without": without, "attention_share": share})
        print(f"   {px:>5} {with_a / 1e9:>16.1f} {without / 1e9:>14.1f} {share:>10.1%}")

    print(f"2. decoder midblock section (conv_in + mid, 512 ch), {args.threads} threads, median of {args.reps}")
    print(f"   {'px':>5} {'tokens':>7} {'s (attn)':>9} {'s (none)':>9} {'time x':>7} "
          f"{'MiB (attn)':>10} {'MiB (none)':>10} {'mem x':>7}")
    for px in args.sizes:
        a = _measure(px, True, args.reps, "mid", args.threads)
        n = _measure(px, False, args.reps, "mid", args.threads)
        row = {"px": px, "with": a, "without": n, "time_ratio": a["seconds"] / n["seconds"],
               "mem_ratio": a["peak_extra_mib"] / max(n["peak_extra_mib"], 1e-9)}
        report["mid"].append(row)
        print(f"   {px:>5} {(px // 8) ** 2:>7} {a['seconds']:>9.2f} {n['seconds']:>9.2f} {row['time_ratio']:>7.2f} "
              f"{a['peak_extra_mib']:>10.0f} {n['peak_extra_mib']:>10.0f} {row['mem_ratio']:>7.2f}")

    if args.full_decoder:
        print("3. whole decoder at 512 px (real widths)")
        a = _measure(512, True, 1, "full", args.threads)
        n = _measure(512, False, 1, "full", args.threads)
        report["full"].append({"px": 512, "with": a, "without": n, "time_ratio": a["seconds"] / n["seconds"]})
        print(f"   with attention {a['seconds']:.1f} s / {a['peak_extra_mib']:.0f} MiB, without {n['seconds']:.1f} s / "
              f"{n['peak_extra_mib']:.0f} MiB: time x{a['seconds'] / n['seconds']:.3f}")
    print(f"total {time.time() - t0:.0f} s")
    return report


if __name__ == "__main__":
    main()
