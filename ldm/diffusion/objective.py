"""The training objective: pick timesteps and noise, noise the latents, regress the parameterization's target.

    noise ~ N(0, I) (+ offset noise), t ~ U{0, ..., T-1} (or logit-normal), x_t = alpha_t x0 + sigma_t noise
    loss = mean_b[ w(t_b) * mean((model(x_t, t) - target)^2) ],   w from `loss_weight` (uniform or min-SNR-gamma)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ldm.config import ConfigError, check_choice, check_min, check_positive
from ldm.diffusion.parameterization import LOSS_WEIGHTINGS, PREDICTIONS, loss_weight, offset_noise, target
from ldm.diffusion.schedule import NoiseSchedule, ScheduleConfig

TIMESTEP_SAMPLINGS = ["uniform", "logit_normal"]


@dataclass
class DiffusionConfig:
    """Schedule, parameterization and loss weighting: the node `model.diffusion`."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "eps"            # eps | v | x0: what the UNet outputs (v is needed with zero terminal SNR)
    loss_weighting: str = "uniform"    # uniform | min_snr (Hang et al. 2023, converted to the prediction's space)
    min_snr_gamma: float = 5.0         # gamma of min_snr
    offset_noise: float = 0.0          # strength of per-channel offset noise in training (0: off; SD fine-tunes: 0.1)
    timestep_sampling: str = "uniform"  # uniform | logit_normal: t / T = sigmoid(N(logit_mean, logit_std^2)) (SD3,
    #                                    Esser et al. 2024): fewer nearly clean steps, more of the noisy ones that
    #                                    decide layout and colour; logit_mean > 0 shifts further towards noise
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        if self.prediction == "eps" and self.schedule.zero_terminal_snr:
            raise ConfigError("prediction=eps cannot be used with schedule.zero_terminal_snr=true: at SNR 0 the "
                              "noise carries no information about x0 (Lin et al. 2023); use prediction=v")
        check_positive(logit_std=self.logit_std)
        check_min(0, offset_noise=self.offset_noise)
        if not math.isfinite(self.logit_mean):
            raise ConfigError(f"logit_mean={self.logit_mean} must be a finite number")
        if not self.min_snr_gamma > 0:  # inf: no clipping, the plain SNR weight
            raise ConfigError(f"min_snr_gamma={self.min_snr_gamma} must be > 0")


def check_ignored_settings(config: DiffusionConfig, prefix: str = "model.diffusion") -> None:
    """Refuse, for a new model, settings its choices would ignore: logit_mean / logit_std without logit-normal
    timesteps. (Not in `__post_init__`: a recorded config, a checkpoint's or an export's, loads as it was.)"""
    if config.timestep_sampling != "logit_normal" and (config.logit_mean, config.logit_std) != (0.0, 1.0):
        raise ConfigError(f"{prefix}.logit_mean={config.logit_mean} / logit_std={config.logit_std} apply to "
                          f"timestep_sampling=logit_normal; set it, or leave them out for "
                          f"timestep_sampling={config.timestep_sampling}")


def diffusion_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   schedule: NoiseSchedule, config: DiffusionConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample weighted squared error (B,) of `model(x_t, t)` against the target of `config.prediction`.

    Args:
        model: the network with its conditioning bound, (x_t, t) -> output shaped like x_t.
        x0: clean (scaled) latents (B, C, h, w).
        schedule: the noise schedule.
        config: prediction, loss weighting and offset noise.
        generator: timesteps, then noise, are drawn from it (the training step's generator).
    """
    t = sample_timesteps(x0.shape[0], schedule.num_train_timesteps, config, generator, x0.device)        # (B,)
    noise = offset_noise(x0.shape, config.offset_noise, generator, x0.device, x0.dtype)                  # (B, C, h, w)
    alpha, sigma = schedule.alpha_sigma(t, x0)                                                           # (B, 1, 1, 1)
    x_t = alpha * x0 + sigma * noise                                                                     # (B, C, h, w)
    out = model(x_t, t).float()                                                                          # (B, C, h, w)
    err = (out - target(config.prediction, x0, noise, alpha, sigma).float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return loss_weight(schedule.snr(t), config.prediction, config.loss_weighting, config.min_snr_gamma) * err


def sample_timesteps(batch_size: int, num_timesteps: int, config: DiffusionConfig,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps (B,) in [0, num_timesteps): uniform, or floor(T * sigmoid(N(logit_mean, logit_std^2)))."""
    if config.timestep_sampling == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    z = torch.randn(batch_size, generator=generator, device=device) * config.logit_std + config.logit_mean
    return (torch.sigmoid(z) * num_timesteps).long().clamp(max=num_timesteps - 1)
