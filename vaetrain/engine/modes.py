"""What the student learns, one function per mode; each turns a batch into ``LossInputs``.

``autoencode``  image -> student encoder -> (sampled) latent -> student decoder; the target is the
                teacher's round trip when there is a teacher and ``target="teacher"``, else the photo.
``decoder``     teacher latents (``batch["latent"]`` from a cache, or the teacher's encoder) -> student
                decoder; the target is the teacher's decoding (or the photo).
``encoder``     image -> student encoder -> latents, against the teacher's latents.
``latent``      teacher A latents -> student (an interposer ``forward(z)``) -> teacher B latents.

Teachers run through :class:`Teacher`: in exactly their configured dtype, with autocast OFF, so a
``bf16-mixed`` run still computes fp32 targets when ``teacher_dtype=float32`` (inside Lightning's
autocast they would silently be bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaetrain.convention import to_diffusion, uint8_to_model
from vaetrain.losses import LossInputs

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"module.teacher_dtype={name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


class Teacher:
    """A frozen autoencoder (never registered in the LightningModule: not optimised, not checkpointed)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model.requires_grad_(False).eval(), dtype

    @property
    def has_encoder(self) -> bool:
        return getattr(self.model, "has_encoder", True)

    @property
    def has_decoder(self) -> bool:
        return getattr(self.model, "has_decoder", True)

    def to(self, device: torch.device) -> None:
        self.model.to(device=device, dtype=self.dtype)

    def _run(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x.to(self.dtype)).float()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._run(self.model.encode, x)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self._run(self.model.decode, z)

    def decode_with_grad(self, z: Tensor) -> Tensor:
        """Decode the STUDENT's latents: gradient flows back to ``z`` (never into the frozen weights)."""
        return self._run(self.model.decode, z)


@dataclass
class Setup:
    """What the mode functions need besides the batch and the model."""

    teacher: Teacher | None
    teacher_b: Teacher | None
    target: str  # "teacher" | "real"
    sample_posterior: bool
    decode_latents: bool
    noise: Callable[[Tensor], Tensor]  # standard normal noise shaped like its argument, seeded per step


def prepare_batch(batch: Any, channels_last: bool = False) -> dict:
    """A loader batch on the device -> the engine's convention: uint8 images become [-1, 1] floats (done on the
    device to save loader time), cached latents become fp32; optionally in channels-last memory order."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batches must be dicts with an 'image' entry (got {type(batch).__name__})")
    batch = dict(batch)
    img = batch.get("image")
    if img is not None:
        batch["image"] = uint8_to_model(img) if img.dtype == torch.uint8 else img.float()
    for k in ("latent", "latent_b", "logvar"):
        if isinstance(batch.get(k), Tensor):
            batch[k] = batch[k].float()
    if channels_last:
        batch.update({k: v.contiguous(memory_format=torch.channels_last) for k, v in batch.items()
                      if isinstance(v, Tensor) and v.ndim == 4})
    return batch


def _latents(batch: Mapping, key: str, teacher: Teacher | None, real: Tensor | None, mode: str) -> Tensor:
    if isinstance(batch.get(key), Tensor):
        return batch[key]  # cached teacher posterior mean (diffusion space)
    if teacher is None or not teacher.has_encoder or real is None:
        raise ValueError(f"mode={mode} needs batch['{key}'] (a latent cache) or a teacher with an encoder")
    return teacher.encode(real)


def _posterior_latents(model: nn.Module, x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(raw mean, raw logvar, diffusion-space latents of the mean); deterministic encoders give no posterior."""
    post = model.posterior(x) if hasattr(model, "posterior") else None
    if post is None:
        return None, None, model.encode(x)
    mean, logvar = post
    return mean, logvar, to_diffusion(mean, model.scaling_factor, model.shift_factor)


def _area(x: Tensor | None, size: torch.Size) -> Tensor | None:
    return F.interpolate(x, size=size, mode="area") if x is not None and x.shape[-2:] != size else x  # (B, 3, h, w)


def autoencode(model: nn.Module, batch: Mapping, s: Setup, train: bool) -> LossInputs:
    real = batch["image"]
    # one encoder pass: deterministic encoders (TAESD) give their raw latents, KL ones a posterior to sample
    post = model.posterior(real) if hasattr(model, "posterior") else None
    if post is None:
        mean = logvar = None
        z_raw = model.encode_raw(real)
    else:
        mean, logvar = post
        z_raw = mean + torch.exp(0.5 * logvar) * s.noise(mean) if (train and s.sample_posterior) else mean
    recon = model.decode_raw(z_raw)
    cond = to_diffusion(z_raw, model.scaling_factor, model.shift_factor)
    teacher = z_target = z_pred = None
    if s.teacher is not None and (s.target == "teacher" or not train):
        z_target = _latents(batch, "latent", s.teacher, real, "autoencode")
        teacher = s.teacher.decode(z_target) if s.teacher.has_decoder else None
        # the student's latents (posterior mean) beside the teacher's: a latent term keeps the latent space of
        # finetunes that also train the encoder (fp16-fix, midblock-attention removal)
        z_pred = to_diffusion(mean, model.scaling_factor, model.shift_factor) if mean is not None else cond
    target = teacher if (s.target == "teacher" and teacher is not None) else real
    return LossInputs(real=real, target=target, recon=recon, teacher=teacher, z_target=z_target, z_pred=z_pred,
                      mean=mean, logvar=logvar, cond=cond)


def decoder(model: nn.Module, batch: Mapping, s: Setup, train: bool) -> LossInputs:
    real = batch.get("image")
    z = _latents(batch, "latent", s.teacher, real, "decoder")
    recon = model.decode(z)
    teacher = s.teacher.decode(z) if s.teacher.has_decoder and (s.target == "teacher" or not train) else None
    use_teacher = s.target == "teacher" and teacher is not None
    # a student that decodes below full resolution (Birch-san's MLP: one pixel per latent) is compared with the
    # references area-averaged to its own size; which reference is the target was decided above, before resizing
    real, teacher = (_area(x, recon.shape[-2:]) for x in (real, teacher))
    target = teacher if use_teacher else real
    return LossInputs(real=real, target=target, recon=recon, teacher=teacher, z_target=z, cond=z)


def encoder(model: nn.Module, batch: Mapping, s: Setup, train: bool) -> LossInputs:
    real = batch["image"]
    z_target = _latents(batch, "latent", s.teacher, real, "encoder")
    mean, logvar, z_pred = _posterior_latents(model, real)
    recon = target = teacher = cond = None
    if s.decode_latents:
        recon, cond = s.teacher.decode_with_grad(z_pred), z_pred
        target = teacher = s.teacher.decode(z_target)
    return LossInputs(real=real, target=target, recon=recon, teacher=teacher, z_target=z_target, z_pred=z_pred,
                      mean=mean, logvar=logvar, cond=cond)


def latent(model: nn.Module, batch: Mapping, s: Setup, train: bool) -> LossInputs:
    real = batch.get("image")
    z_a = _latents(batch, "latent", s.teacher, real, "latent")
    z_target = _latents(batch, "latent_b", s.teacher_b, real, "latent")
    z_pred = model(z_a)
    recon = target = teacher = cond = None
    if s.decode_latents:
        recon, cond = s.teacher_b.decode_with_grad(z_pred), z_pred
        target = teacher = s.teacher_b.decode(z_target)
    return LossInputs(real=real, target=target, recon=recon, teacher=teacher, z_target=z_target, z_pred=z_pred,
                      cond=cond)


def check_mode(mode: str, target: str, teacher, teacher_b, adversarial, decode_latents: bool, accumulate: int) -> None:
    """What each mode needs, checked before anything runs (``ValueError`` with one line)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {tuple(MODES)}")
    if target not in ("teacher", "real"):
        raise ValueError(f"module.target={target!r}: use 'teacher' or 'real'")
    if mode in ("decoder", "encoder") and teacher is None:
        raise ValueError(f"mode={mode} distils a teacher: set teacher=... (e.g. teacher=taef2)")
    if mode == "latent" and (teacher is None or teacher_b is None):
        raise ValueError("mode=latent maps teacher A's latents to teacher B's: set teacher=... and teacher_b=...")
    if accumulate < 1:
        raise ValueError(f"module.accumulate={accumulate}: must be >= 1")
    if adversarial is not None and mode in ("encoder", "latent") and not decode_latents:
        raise ValueError(f"a discriminator judges images: mode={mode} needs module.decode_latents=true")


MODES: dict[str, Callable[[nn.Module, Mapping, Setup, bool], LossInputs]] = {
    "autoencode": autoencode, "decoder": decoder, "encoder": encoder, "latent": latent}

# modes whose image comes out of the STUDENT's decoder: only there can the adaptive GAN weight read the
# gradient at the student's last layer
STUDENT_DECODES = ("autoencode", "decoder")
