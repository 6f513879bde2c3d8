"""The KL autoencoder's loss: reconstruction + LPIPS + KL + patch GAN, as LDM's `LPIPSWithDiscriminator`.

Generator side (Rombach et al. 2022, App. G; Esser et al. 2021, Eq. 7):

    nll  = sum_pixels((|x - x_rec| + w_p * LPIPS(x, x_rec)) / exp(logvar) + logvar)     (summed, then batch mean)
    loss = nll + w_kl * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_G(D(x_rec))

with the adaptive weight lambda = disc_weight * clamp(||grad_L nll|| / (||grad_L L_G|| + 1e-4), 0, 1e4) at the
decoder's last layer L, detached. The discriminator trains on D(x) against D(x_rec.detach()) from `disc_start` on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import check_choice, check_min
from ldm.losses.lpips import build_lpips
from ldm.nn.autoencoder import DiagonalGaussianDistribution
from ldm.nn.discriminator import DiscriminatorConfig, NLayerDiscriminator

GAN_LOSSES = ("hinge", "vanilla", "non_saturating")
REC_LOSSES = ("l1", "l2")


@dataclass
class LossConfig:
    rec_loss: str = "l1"                      # pixel loss: l1 (LDM) or l2
    lpips_weight: float = 1.0                 # weight of LPIPS in the reconstruction term; 0 disables it
    lpips_pretrained_backbone: bool = True    # ImageNet VGG16 from the torch hub cache (never downloaded)
    logvar_init: float = 0.0                  # initial log-variance of the reconstruction likelihood
    learn_logvar: bool = False                # optimize the log-variance with the autoencoder
    kl_weight: float = 1e-6                   # weight of the KL term
    gan_loss: str = "hinge"                   # hinge | vanilla | non_saturating
    disc_start: int = 50001                   # training step from which the GAN terms are on
    disc_factor: float = 1.0                  # multiplies both GAN losses once on
    disc_weight: float = 0.5                  # multiplies the adaptive generator weight
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        check_choice("rec_loss", self.rec_loss, REC_LOSSES)
        check_choice("gan_loss", self.gan_loss, GAN_LOSSES)
        check_min(0, lpips_weight=self.lpips_weight, kl_weight=self.kl_weight, disc_start=self.disc_start,
                  disc_factor=self.disc_factor, disc_weight=self.disc_weight)


def discriminator_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on real and fake patch logits (taming's hinge_d_loss / vanilla_d_loss)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's loss: -E[D(x_rec)] for hinge and vanilla (as taming), -E[log sigmoid D(x_rec)] otherwise."""
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    return -logits_fake.mean()


class AutoencoderLoss(nn.Module):
    """Holds the LPIPS network, the discriminator and the log-variance; computes both sides of the GAN game.

    Args:
        config: weights and switches; see `LossConfig`.
    """

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.perceptual = build_lpips(config.lpips_pretrained_backbone) if config.lpips_weight > 0 else None
        self.discriminator = NLayerDiscriminator(config.disc)
        logvar = torch.full((), float(config.logvar_init))
        if config.learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

    def train(self, mode: bool = True) -> AutoencoderLoss:
        """The module trains; LPIPS stays in eval mode: Lightning's `.train()` (at fit start and after each
        validation) would switch on the dropout (p=0.5) in front of its linear heads and make the loss random."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def disc_active(self, step: int) -> bool:
        return step >= self.config.disc_start and self.config.disc_factor > 0

    def adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """disc_weight * clamp(||d nll / d L|| / (||d g_loss / d L|| + 1e-4), 0, 1e4), detached (as CompVis')."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.config.disc_weight

    def generator_step(
        self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussianDistribution, step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and its terms (detached) for logging.

        Args:
            x: inputs (B, C, H, W) in [-1, 1].
            x_rec: reconstructions of `x`, same shape.
            posterior: q(z | x) that `x_rec` was decoded from.
            step: the training step (GAN terms from `disc_start` on).
            last_layer: the decoder's output weight, for the adaptive weight (required in training with the GAN on).
        """
        c, B = self.config, x.shape[0]
        rec = (x - x_rec).abs() if c.rec_loss == "l1" else (x - x_rec).pow(2)       # (B, C, H, W)
        total = rec
        p_loss = torch.zeros((), device=x.device)
        if self.perceptual is not None:
            p_loss = self.perceptual(x.contiguous(), x_rec.contiguous())              # (B, 1, 1, 1)
            total = rec + c.lpips_weight * p_loss
        nll_loss = (total / torch.exp(self.logvar) + self.logvar).sum() / B
        kl_loss = posterior.kl().sum() / B
        loss = nll_loss + c.kl_weight * kl_loss

        g_loss = d_weight = torch.zeros((), device=x.device)
        if self.disc_active(step):
            g_loss = generator_loss(c.gan_loss, self.discriminator(x_rec.contiguous()))
            if self.training and last_layer is not None:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * c.disc_factor * g_loss

        log = {"total_loss": loss, "nll_loss": nll_loss, "rec_loss": rec.mean(), "p_loss": p_loss.mean(),
               "kl_loss": kl_loss, "g_loss": g_loss, "disc_weight": d_weight, "logvar": self.logvar.clone(),
               "disc_factor": torch.tensor(c.disc_factor if self.disc_active(step) else 0.0)}
        return loss, {k: v.detach() for k, v in log.items()}  # (logvar a copy: the step's update is in place)

    def discriminator_step(self, x: torch.Tensor, x_rec: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real `x` and detached `x_rec`; zero (and no forward) before `disc_start`."""
        if not self.disc_active(step):
            zero = torch.zeros((), device=x.device)
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(x_rec.contiguous().detach())
        d_loss = self.config.disc_factor * discriminator_loss(self.config.gan_loss, logits_real, logits_fake)
        log = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {k: v.detach() for k, v in log.items()}
