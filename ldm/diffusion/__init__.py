"""Noise schedules, parameterizations (eps / v / x0), loss weighting and samplers: pure functions, no Lightning."""

from ldm.diffusion.objective import DiffusionConfig, diffusion_loss
from ldm.diffusion.parameterization import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    loss_weight,
    offset_noise,
    target,
    to_eps,
    to_v,
    to_x0,
)
from ldm.diffusion.sampling import (
    SAMPLERS,
    Denoiser,
    check_eta,
    guided_denoiser,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from ldm.diffusion.schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    ScheduleConfig,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = [
    "BETA_SCHEDULES", "LOSS_WEIGHTINGS", "PREDICTIONS", "SAMPLERS", "TIMESTEP_SPACINGS", "Denoiser",
    "DiffusionConfig", "NoiseSchedule", "ScheduleConfig", "check_eta", "diffusion_loss", "guided_denoiser",
    "loss_weight", "make_betas", "offset_noise", "rescale_zero_terminal_snr", "run_sampler", "sample_ddim",
    "sample_ddpm", "sample_dpmpp_2m", "spaced_timesteps", "target", "to_eps", "to_v", "to_x0",
]
