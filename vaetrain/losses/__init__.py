"""Loss terms for distilling and finetuning autoencoders (one module per kind of term).

Every term returns its UNWEIGHTED scalar from one :class:`LossInputs`; the engine applies ``weight``.
Guards against the silent failures users of other VAE trainers report: LPIPS is never under
``no_grad``; delicate arithmetic (LPIPS normalisation, KL, adaptive weight, D losses) is fp32 with
autocast off; the discriminator loss detaches fakes and the generator loss freezes the discriminator.
"""

from vaetrain.losses.adversarial import Adversarial, adaptive_weight, corrected_target, frozen, r1_penalty
from vaetrain.losses.base import LossInputs, LossTerm
from vaetrain.losses.latent import KL, ActivationPenalty, LatentMSE
from vaetrain.losses.lpips import LPIPS
from vaetrain.losses.pixel import L1, MSE
from vaetrain.losses.replay import ReplayBuffer

__all__ = ["LossInputs", "LossTerm", "MSE", "L1", "LPIPS", "KL", "LatentMSE", "ActivationPenalty",
           "Adversarial", "adaptive_weight", "corrected_target", "frozen", "r1_penalty", "ReplayBuffer"]
