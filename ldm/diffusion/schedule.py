"""Discrete variance-preserving noise schedules: betas, alphas_cumprod, zero-terminal-SNR rescaling, timestep spacing.

x_t = alpha_t * x_0 + sigma_t * eps with alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]),
t in [0, num_train_timesteps). All schedule arithmetic runs in float64; values are cast to the data's dtype on use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldm.config import ConfigError, check_choice, is_int

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Betas of a named schedule, float64 of shape (num_timesteps,).

    Args:
        schedule: `linear` (Ho et al. 2020, with beta_start=1e-4, beta_end=0.02), `scaled_linear` (linear in
            sqrt(beta): Stable Diffusion's, with 0.00085 and 0.012) or `cosine` (Nichol & Dhariwal 2021, eq. 17).
        num_timesteps: number of training timesteps T.
        beta_start, beta_end: first and last beta of the linear schedules (ignored by cosine).
        cosine_s: the cosine schedule's offset s.
    """
    check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    # note: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas are clipped at 0.999 to avoid a singular end.
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR exactly zero (Lin et al. 2023, Algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    # Shift so the last value is zero, then scale so the first value is unchanged.
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def check_num_steps(num_steps: int, num_train_timesteps: int, key: str = "num_steps", spacing: str = "trailing",
                    steps_offset: int = 0) -> None:
    """Raise ConfigError, naming `key`, unless a sampler can take `num_steps` steps of the training schedule (with
    `leading` spacing, the offset must not push the last step past the last training timestep)."""
    if not is_int(num_steps):
        raise ConfigError(f"{key}={num_steps!r} must be a whole number of steps")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"{key}={num_steps} must lie in [1, {num_train_timesteps}], the model's "
                          f"num_train_timesteps (a sampler visits each training timestep at most once)")
    if spacing == "leading" and _leading_last(num_steps, num_train_timesteps, steps_offset) >= num_train_timesteps:
        most = max(n for n in range(1, num_steps)
                   if _leading_last(n, num_train_timesteps, steps_offset) < num_train_timesteps)
        raise ConfigError(f"{key}={num_steps} with timestep_spacing=leading and steps_offset={steps_offset} steps past "
                          f"the last training timestep ({num_train_timesteps - 1}): take e.g. {most} steps (a count "
                          f"n fits where (n - 1) * ({num_train_timesteps} // n) + {steps_offset} < "
                          f"{num_train_timesteps}), or timestep_spacing=trailing")


def _leading_last(num_steps: int, num_train_timesteps: int, steps_offset: int) -> int:
    """The largest timestep of `leading` spacing (diffusers' DDIMScheduler.set_timesteps)."""
    return (num_steps - 1) * (num_train_timesteps // num_steps) + steps_offset


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: str = "trailing",
                     steps_offset: int = 0) -> list[int]:
    """The `num_steps` training timesteps a sampler visits, in decreasing order.

    Args:
        spacing: how the steps are spread (Lin et al. 2023, Table 2): `leading` (0, k, 2k, ... from the start, so
            the last training timestep is never visited; Stable Diffusion's with steps_offset=1), `trailing` (from
            T-1 downwards in steps of T/num_steps: starts at pure noise, needed with zero terminal SNR) or `linspace`
            (evenly from T-1 to 0, rounded).
        steps_offset: added to `leading` timesteps.
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    check_num_steps(num_steps, num_train_timesteps, spacing=spacing, steps_offset=steps_offset)
    if spacing == "leading":
        step = num_train_timesteps // num_steps
        ts = [i * step + steps_offset for i in range(num_steps)]
    # note: numpy's arange and linspace, as diffusers computes them: where the exact value is half-way between two
    # timesteps (linspace, 27 of 1000: 499.5), their float rounding and Python's differ by one timestep
    elif spacing == "trailing":
        ts = (np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)[:num_steps].round() - 1).tolist()
    else:
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round().tolist()
    return sorted({int(t) for t in ts}, reverse=True)


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"   # linear | scaled_linear | cosine
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False        # Lin et al. 2023; needs prediction=v (or x0) and trailing spacing
    timestep_spacing: str = "trailing"     # leading | trailing | linspace, used by the samplers
    steps_offset: int = 0                  # Stable Diffusion's `leading` spacing uses 1

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if not is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps={self.num_train_timesteps!r} must be a whole number, at least 2")
        if self.beta_schedule != "cosine" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"beta_start={self.beta_start} and beta_end={self.beta_end} must satisfy 0 < beta_start "
                              f"<= beta_end < 1 (noise variances per step; Stable Diffusion: 0.00085 and 0.012)")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ConfigError(f"steps_offset={self.steps_offset} must lie in [0, num_train_timesteps) (Stable "
                              f"Diffusion: 1)")
        if self.zero_terminal_snr and self.timestep_spacing == "leading":
            raise ConfigError("zero_terminal_snr=true with timestep_spacing=leading never samples from pure noise "
                              "(Lin et al. 2023): use timestep_spacing=trailing")


class NoiseSchedule:
    """The discrete schedule: `alphas_cumprod[t]` and what derives from it (alpha, sigma, SNR, forward noising)."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config = config or ScheduleConfig()
        betas = make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas                                          # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)       # (T,) float64
        self.num_train_timesteps = config.num_train_timesteps

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t at integer timesteps `t` (B,), shaped (B, 1, ...) to broadcast against `like`."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().to(like.dtype).view(shape)
        sigma = (1 - abar).sqrt().to(like.dtype).view(shape)
        return alpha, sigma

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at timesteps `t` (B,), float32."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return (abar / (1 - abar)).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): alpha_t * x0 + sigma_t * noise."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def timesteps(self, num_steps: int) -> list[int]:
        """Sampling timesteps (decreasing) under this schedule's spacing."""
        return spaced_timesteps(num_steps, self.num_train_timesteps, self.config.timestep_spacing,
                                self.config.steps_offset)

    def check_num_steps(self, num_steps: int, key: str) -> None:
        """Raise ConfigError, naming `key`, unless a sampler can take `num_steps` steps under this schedule."""
        check_num_steps(num_steps, self.num_train_timesteps, key, self.config.timestep_spacing,
                        self.config.steps_offset)

    def abar(self, t: int) -> float:
        """alphas_cumprod at one timestep as a Python float; t < 0 means the clean data (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])
