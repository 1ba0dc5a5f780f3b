"""DDP layouts against each other: Lightning's one wrapper of the whole module against ``ddp_two_wrappers``.

Two processes (gloo on CPU, NCCL with ``--device cuda``), each running ``VAETrainModule`` under a Lightning
``Trainer`` on in-memory batches, for the shapes of ``bench_train.py`` (same models, losses and optimizers). Per
repetition the layouts alternate, so drift in the machine's load hits both alike; rank 0's median wall-clock and
mean CPU ms/step after ``--warmup`` steps are kept, the best of ``--reps`` for each, and their ratio printed
(two wrappers / one wrapper: below 1 means two wrappers are faster). Without accumulation: the one wrapper cannot train a GAN
with it (DDP's unused-parameter search and ``no_sync`` fail together; vaetrain refuses that combination).

    OMP_NUM_THREADS=1 python scripts/bench_ddp.py --threads 1 --reps 5 --json results/bench_ddp/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, Shape, _Clock, _per_step, adamw, build, prepared  # noqa: E402

from vaetrain.commands.train import resolve_strategy  # noqa: E402
from vaetrain.engine.module import VAETrainModule  # noqa: E402

LAYOUTS = {"one_wrapper": "ddp_one_wrapper", "two_wrappers": "ddp_two_wrappers"}


def run(shape: Shape, layout: str, data: list[dict], args) -> tuple[float, float]:
    student, teacher, losses, adv = build(shape)
    m = VAETrainModule(student, teacher=teacher, losses=losses, adversarial=adv, mode=shape.mode, optimizer=adamw,
                       d_optimizer=adamw, ema_decay=0.999, grad_clip=1.0, warmup_steps=0,
                       frozen=["encoder.*", "quant_conv.*"] if shape.name == "kl_decoder" else None)
    accel = "gpu" if args.device == "cuda" else "cpu"
    strategy = resolve_strategy({"strategy": LAYOUTS[layout], "devices": 2, "accelerator": accel}, adv is not None)
    clock = _Clock()
    trainer = L.Trainer(accelerator=accel, devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[clock],
                        use_distributed_sampler=False, precision="bf16-mixed" if args.bf16 else "32-true")
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer.fit(m, train_dataloaders=loader)
    return _per_step(clock.t[args.warmup:])


def worker(rank: int, args, port: int) -> None:
    # the variables a launcher sets: Lightning then starts no processes of its own
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.shapes:
        shape, data = prepared(name, args.size, args.batch, "cpu")
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in LAYOUTS}
        for _ in range(args.reps):
            for layout in LAYOUTS:
                times[layout].append(run(shape, layout, data, args))
        wall = {k: min(w for w, _ in v) for k, v in times.items()}
        cpu = {k: min(c for _, c in v) for k, v in times.items()}
        r = {"shape": name, "gan": shape.gan, "size": shape.size, "batch_per_rank": shape.batch,
             **{f"{k}_ms": round(v * 1e3, 2) for k, v in wall.items()},
             **{f"{k}_cpu_ms": round(v * 1e3, 2) for k, v in cpu.items()},
             "ratio": round(wall["two_wrappers"] / wall["one_wrapper"], 3),
             "cpu_ratio": round(cpu["two_wrappers"] / cpu["one_wrapper"], 3)}
        results.append(r)
        if rank == 0:
            print(json.dumps(r), flush=True)
    if rank == 0 and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["default", "taesd_decoder"], choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="per process")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args, port), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
