"""The framework's training step against a hand-written loop doing the same work, in the same run, alternating.

Per shape: the same model, loss terms, optimizers, EMA, clipping and in-memory batches; the framework runs
``VAETrainModule`` under a Lightning ``Trainer`` (as ``vaetrain train`` does, loggers off), the loop is the plain
PyTorch a user would write. Per repetition, after ``--warmup`` steps: the median wall-clock ms/step and the mean
CPU ms/step of the process (on a GPU the wall clock is what counts; on a CPU shared with other jobs the CPU time
is the steadier measure); the best of ``--reps`` is kept for each and both ratios printed (goal <= 1.05).

    python scripts/bench_train.py                      # CPU: the three shapes at their CPU sizes
    python scripts/bench_train.py --device cuda --size 256 --bf16 --json out.json   # GPU: also img/s and MFU

Shapes: ``default`` (the default job: 4x TAESD autoencoder, MSE + LPIPS), ``taesd_decoder`` (a TAESD decoder
distilled from a TAESD teacher's cached latents: MSE + LPIPS + latent-conditioned PatchGAN with the adaptive
weight), ``kl_decoder`` (a KL decoder finetune: SD-layout AutoencoderKL, decoder trainable, MSE + LPIPS to the
frozen teacher's decoding).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from vaetrain.engine.module import VAETrainModule
from vaetrain.engine.performance import device_peak_flops, flop_counter
from vaetrain.losses import LPIPS, MSE, Adversarial, adaptive_weight, frozen
from vaetrain.models.autoencoder_kl import AutoencoderKL
from vaetrain.models.patchgan import NLayerDiscriminator
from vaetrain.models.taesd import TAESD


@dataclass
class Shape:
    name: str
    mode: str
    size: int
    batch: int
    lpips_weight: float
    gan: bool


SHAPES = {
    "default": Shape("default", "autoencode", 32, 16, 0.01, False),
    "taesd_decoder": Shape("taesd_decoder", "decoder", 64, 4, 0.1, True),
    "kl_decoder": Shape("kl_decoder", "decoder", 64, 2, 0.1, False),
}


def build(shape: Shape, seed: int = 0):
    """(student, teacher, losses, adversarial) for a shape, on the CPU, from a fixed seed."""
    torch.manual_seed(seed)
    lpips = LPIPS(weight=shape.lpips_weight, target="real" if shape.mode == "autoencode" else "teacher",
                  mode="random", net="squeeze", pretrained=False)
    losses = {"mse": MSE(target=lpips.target), "lpips": lpips}
    teacher = adv = None
    if shape.name == "default":
        student = TAESD(latent_channels=4, width=32, downsample_factor=4)
    elif shape.name == "taesd_decoder":
        teacher = TAESD(latent_channels=16, width=32)
        student = TAESD(latent_channels=16, width=32, encoder=False)
        adv = Adversarial(NLayerDiscriminator(cond_channels=16, ndf=32, n_layers=3, norm="none"), weight=0.1,
                          conditional=True, start_step=0)
    else:
        kw = dict(latent_channels=4, base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8)
        teacher = AutoencoderKL(**kw)
        student = AutoencoderKL(**kw)
        student.load_state_dict(teacher.state_dict())
    return student, teacher, losses, adv


def batches(shape: Shape, teacher, n: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (shape.batch, 3, shape.size, shape.size), generator=g, dtype=torch.uint8)
        b = {"image": img}
        if shape.mode == "decoder":  # decoder distillation trains from cached teacher latents
            with torch.no_grad():
                b["latent"] = teacher.encode(img.float() / 127.5 - 1)
        out.append(b)
    return out


def prepared(name: str, size: int | None, batch: int | None, device: str) -> tuple[Shape, list[dict]]:
    """A shape at the size and batch asked for (its own where None) and 8 in-memory batches for it."""
    base = SHAPES[name]
    shape = Shape(base.name, base.mode, size or base.size, batch or base.batch, base.lpips_weight, base.gan)
    _, teacher, _, _ = build(shape)
    return shape, batches(shape, teacher, 8, device)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_step(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """(median wall-clock s/step, mean CPU s/step of this process) over consecutive stamps. The median and the
    CPU time resist what a shared machine adds (other jobs' bursts land in a few steps, and not in our CPU time)."""
    wall = sorted(b[0] - a[0] for a, b in zip(stamps, stamps[1:]))
    cpu = (stamps[-1][1] - stamps[0][1]) / (len(stamps) - 1)
    return wall[len(wall) // 2], cpu


class _Clock(L.Callback):
    def __init__(self):
        self.t: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args):
        self.t.append(_stamp())

    def on_train_end(self, *args):
        self.t.append(_stamp())


def run_framework(shape: Shape, data: list[dict], steps: int, warmup: int, device: str,
                  bf16: bool) -> tuple[float, float]:
    student, teacher, losses, adv = build(shape)
    m = VAETrainModule(student, teacher=teacher, losses=losses, adversarial=adv, mode=shape.mode, optimizer=adamw,
                       d_optimizer=adamw, ema_decay=0.999, grad_clip=1.0, warmup_steps=0,
                       frozen=["encoder.*", "quant_conv.*"] if shape.name == "kl_decoder" else None)
    clock = _Clock()
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, log_every_n_steps=50, callbacks=[clock],
                        precision="bf16-mixed" if bf16 else "32-true")
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer.fit(m, train_dataloaders=loader)
    return _per_step(clock.t[warmup:])


def run_loop(shape: Shape, data: list[dict], steps: int, warmup: int, device: str, bf16: bool,
             flops: bool = False) -> tuple[tuple[float, float], int | None]:
    """The hand-written loop: same work, nothing else."""
    dev = torch.device(device)
    student, teacher, losses, adv = build(shape)
    student.to(dev)
    if shape.name == "kl_decoder":
        for n, p in student.named_parameters():
            p.requires_grad_(not n.startswith(("encoder.", "quant_conv.")))
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    for t in losses.values():
        t.to(dev)
    ema = torch.optim.swa_utils.AveragedModel(student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = adamw(params)
    if adv is not None:
        adv.to(dev)
        opt_d = adamw(list(adv.parameters()))
    counted = None
    stamps = []
    for i in range(steps):
        b = data[i % len(data)]
        stamps.append(_stamp())
        mode = flop_counter() if flops and i == warmup else None
        if mode is not None:
            mode.__enter__()
        x = b["image"].to(dev, non_blocking=True).float().div_(127.5).sub_(1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            if shape.mode == "autoencode":
                recon, ref = student(x), x
                z = None
            else:
                z = b["latent"].to(dev, non_blocking=True)
                recon = student.decode(z)
                with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                    ref = teacher.decode(z)
            rec = F.mse_loss(recon.float(), ref) + losses["lpips"].weight * losses["lpips"].distance(recon, ref).mean()
            total = rec
            if adv is not None:
                with frozen(adv.discriminator):
                    g = -adv.discriminator(recon, z).float().mean()
                w = adaptive_weight(rec, g, student.last_layer()) * adv.weight
                total = rec + w * g
        total.backward()
        if adv is not None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                d_loss = 0.5 * (F.relu(1 - adv.discriminator(x, z).float()).mean()
                                + F.relu(1 + adv.discriminator(recon.detach(), z).float()).mean())
            d_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if adv is not None:
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        ema.update_parameters(student)
        if mode is not None:
            mode.__exit__(None, None, None)
            counted = mode.get_total_flops()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(_stamp())
    t = stamps[warmup:]
    if flops:
        t = t[1:]  # the counted step ran slower
    return _per_step(t), counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=None, help="image size for every shape (default: each shape's)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.shapes:
        shape, data = prepared(name, args.size, args.batch, args.device)
        fw, loop = [], []
        for _ in range(args.reps):  # alternating, so drift in the machine's load hits both alike
            fw.append(run_framework(shape, data, args.steps, args.warmup, args.device, args.bf16))
            loop.append(run_loop(shape, data, args.steps, args.warmup, args.device, args.bf16)[0])
        _, flops = run_loop(shape, data, args.warmup + 3, args.warmup, args.device, args.bf16, flops=True)
        best_fw, best_loop = min(w for w, _ in fw), min(w for w, _ in loop)
        cpu_fw, cpu_loop = min(c for _, c in fw), min(c for _, c in loop)
        r = {"shape": name, "size": shape.size, "batch": shape.batch, "framework_ms": round(best_fw * 1e3, 2),
             "loop_ms": round(best_loop * 1e3, 2), "ratio": round(best_fw / best_loop, 3),
             "framework_cpu_ms": round(cpu_fw * 1e3, 2), "loop_cpu_ms": round(cpu_loop * 1e3, 2),
             "cpu_ratio": round(cpu_fw / cpu_loop, 3), "img_per_s": round(shape.batch / best_fw, 1),
             "gflop_per_step": round(flops / 1e9, 2)}
        peak = device_peak_flops(torch.device(args.device))
        if peak:
            r["mfu"] = round(flops / best_fw / peak, 4)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
