"""Decode time and peak memory of a TRAINED AutoencoderKL with vs without its midblock attention.

``scripts/bench_midblock.py`` measures the real SD widths; this measures the model a recipe actually produced (e.g.
vae16_cpu's and no_midblock_attn_cpu's exports) at 512, 1024 and 2048 px. Each (model, size) runs in a fresh
subprocess so that its peak RSS is its own; times are medians of ``--reps`` decodes after one warm-up, ratios are
taken within this run.

    python scripts/bench_no_attn.py --with-attn A.safetensors --without-attn B.safetensors [--sizes 512 1024 2048]
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

from bench_midblock import _rss_kib  # scripts/ is on sys.path when run as a script


def worker(path: str, px: int, reps: int) -> dict:
    from vaetrain.formats import load_autoencoder

    ae = load_autoencoder(path).float().eval()
    f = ae.downsample_factor
    z = torch.randn(1, ae.latent_channels, px // f, px // f, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = _rss_kib()
        times = []
        for i in range(reps + 1):
            t = time.perf_counter()
            ae.decode(z)  # (1, 3, px, px)
            if i:  # the first pass warms up the allocator and kernels
                times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    attn = ae.decoder.mid.attn_1 is not None
    return {"px": px, "attention": attn, "seconds": statistics.median(times), "peak_extra_mib": max(peak - base, 0) / 1024}


def _measure(path: str, px: int, reps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", path, str(px), str(reps), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        # a worker killed by the kernel (out of memory at large sizes with attention) is a result, not a crash
        why = f"signal {-res.returncode} (out of memory?)" if res.returncode < 0 else f"exit {res.returncode}"
        return {"px": px, "failed": f"{why} {' '.join(res.stderr.split())[-300:]}".strip()}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--with-attn", help="checkpoint of the model with midblock attention")
    ap.add_argument("--without-attn", help="checkpoint of the same model without it")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        path, px, reps, threads = args.worker
        torch.set_num_threads(int(threads))
        print(json.dumps(worker(path, int(px), int(reps))))
        return {}
    if not (args.with_attn and args.without_attn):
        ap.error("give both --with-attn and --without-attn")

    rows = []
    print(f"decode of one latent, {args.threads} thread(s), median of {args.reps} after a warm-up")
    print(f"  {'px':>5} {'s (attn)':>9} {'s (none)':>9} {'time x':>7} {'MiB (attn)':>10} {'MiB (none)':>10} {'mem x':>6}")
    for px in args.sizes:
        a = _measure(args.with_attn, px, args.reps, args.threads)
        n = _measure(args.without_attn, px, args.reps, args.threads)
        if "failed" in a or "failed" in n:
            rows.append({"px": px, "with": a, "without": n})
            cells = [f"{k}: {v['failed'] if 'failed' in v else format(v['seconds'], '.2f') + ' s'}"
                     for k, v in (("with attn", a), ("without", n))]
            print(f"  {px:>5} " + "; ".join(cells), flush=True)
            continue
        if not a["attention"] or n["attention"]:
            raise SystemExit("bench_no_attn: --with-attn must have midblock attention and --without-attn must not")
        row = {"px": px, "with": a, "without": n, "time_ratio": a["seconds"] / n["seconds"],
               "mem_ratio": a["peak_extra_mib"] / max(n["peak_extra_mib"], 1e-9)}
        rows.append(row)
        print(f"  {px:>5} {a['seconds']:>9.2f} {n['seconds']:>9.2f} {row['time_ratio']:>7.2f} "
              f"{a['peak_extra_mib']:>10.0f} {n['peak_extra_mib']:>10.0f} {row['mem_ratio']:>6.2f}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return {"rows": rows}


if __name__ == "__main__":
    main()
