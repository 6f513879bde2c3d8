"""Samplers as pure functions (k-diffusion style) over a discrete variance-preserving schedule.

A sampler takes a `Denoiser` (network output -> (x0, eps) estimates at an integer timestep), the starting noise x_T,
the decreasing timesteps to visit and, where it adds fresh noise, a `StackedRandomGenerator` holding one generator per
image, so an image depends on its own seed only. After the last timestep every sampler returns the x0 estimate
(the step to alphas_cumprod = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldm.config import ConfigError
from ldm.diffusion.parameterization import PREDICTIONS, to_eps, to_x0
from ldm.diffusion.schedule import NoiseSchedule
from ldm.seeding import StackedRandomGenerator

Tensor = torch.Tensor
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]     # (x_t, t, cond) -> network output
GuidedFn = Callable[[Tensor, Tensor], Tensor]         # (x_t, t) -> network output with guidance applied
Callback = Callable[[dict[str, Any]], None]

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")


def concat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, dicts and lists of them, or None."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: concat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(concat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch conditionings of types {type(a).__name__} and {type(b).__name__}")


def guided_denoiser(model_fn: ModelFn, cond: Any, uncond: Any | Callable[[], Any], scale: float) -> GuidedFn:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond), cond and uncond in one batch.

    At scale 1 the result is the conditional output itself and the unconditional pass is skipped; `uncond` may be a
    function building the unconditional conditioning, called only when guidance needs it (this is the one place
    that decides whether guidance is on). Guidance is
    applied to the raw network output; eps, v and x0 are affine in it at fixed (x_t, t), so the result is the same
    as guiding any of them.
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)
    if callable(uncond):
        uncond = uncond()
    if uncond is None:
        raise ValueError(f"guidance_scale={scale} needs an unconditional conditioning, got uncond=None")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, uncond))
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


class Denoiser:
    """Turns a network output of type `prediction` (eps | v | x0) into (x0, eps) estimates at one timestep."""

    def __init__(self, model: GuidedFn, schedule: NoiseSchedule, prediction: str):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}; expected one of {PREDICTIONS}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        if self.prediction == "eps" and self.schedule.abar(t) == 0:
            raise ValueError(f"eps-prediction cannot denoise at t={t} where the SNR is zero (zero_terminal_snr): "
                             "train with prediction=v (Lin et al. 2023)")
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.model(x, tt).to(x.dtype)
        alpha, sigma = self.schedule.alpha_sigma(tt, x)
        return to_x0(out, x, alpha, sigma, self.prediction), to_eps(out, x, alpha, sigma, self.prediction)


def _steps(timesteps: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive (t, s) pairs, s < t, ending with s = -1 (the clean data, alphas_cumprod = 1)."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must strictly decrease, got {ts}")
    return list(zip(ts, ts[1:] + [-1]))


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], rng: StackedRandomGenerator,
                callback: Callback | None = None) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (DDPM, Ho et al. 2020, eqs. 6-7), on spaced steps."""
    for i, (t, s) in enumerate(_steps(timesteps)):
        x0, _ = denoiser(x, t)
        abar_t, abar_s = denoiser.schedule.abar(t), denoiser.schedule.abar(s)
        alpha_ts = abar_t / abar_s                      # the step's alpha between s and t
        beta_ts = 1 - alpha_ts
        coef_x0 = math.sqrt(abar_s) * beta_ts / (1 - abar_t)            # eq. 7
        coef_xt = math.sqrt(alpha_ts) * (1 - abar_s) / (1 - abar_t)
        mean = coef_x0 * x0 + coef_xt * x
        var = beta_ts * (1 - abar_s) / (1 - abar_t)
        x = mean + math.sqrt(var) * rng.randn_like(x) if s >= 0 else mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], eta: float = 0.0,
                rng: StackedRandomGenerator | None = None, callback: Callback | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like noise at eta = 1."""
    if eta > 0 and rng is None:
        raise ValueError(f"eta={eta} adds noise at each step: pass rng (a StackedRandomGenerator)")
    for i, (t, s) in enumerate(_steps(timesteps)):
        x0, eps = denoiser(x, t)
        abar_t, abar_s = denoiser.schedule.abar(t), denoiser.schedule.abar(s)
        sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * rng.randn_like(x)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


def _log_snr_half(abar: float) -> float:
    """lambda = log(alpha / sigma); -inf at zero SNR, +inf for the clean data."""
    if abar <= 0:
        return -math.inf
    if abar >= 1:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, timesteps: Sequence[int],
                    callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M), the second-order multistep data-prediction solver (Lu et al. 2022, Algorithm 2)."""
    schedule = denoiser.schedule
    old_x0: Tensor | None = None
    h_last = math.inf
    for i, (t, s) in enumerate(_steps(timesteps)):
        x0, _ = denoiser(x, t)
        if s < 0:
            x = x0                                   # sigma_s = 0: the solver's step lands on the x0 estimate
        else:
            abar_t, abar_s = schedule.abar(t), schedule.abar(s)
            h = _log_snr_half(abar_s) - _log_snr_half(abar_t)
            if old_x0 is None or not math.isfinite(h_last) or not math.isfinite(h):
                d = x0                               # first order (DPM-Solver++(1) = DDIM) where no history
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            sigma_ratio = math.sqrt((1 - abar_s) / (1 - abar_t))
            x = sigma_ratio * x - math.sqrt(abar_s) * math.expm1(-h) * d
            h_last = h
        old_x0 = x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


def check_eta(sampler: str, eta: float) -> None:
    """`eta` is DDIM's noise scale: refused with the other samplers, which would sample as if it were 0."""
    if eta != 0 and sampler != "ddim" and sampler in SAMPLERS:  # (an unknown name is refused as such)
        raise ConfigError(f"eta={eta} is DDIM's noise scale, which sampler={sampler} does not take ("
                          f"{'it adds DDPM noise of its own' if sampler == 'ddpm' else 'it adds no noise'}): set "
                          f"sampler=ddim or leave eta at 0")


def run_sampler(name: str, denoiser: Denoiser, x: Tensor, timesteps: Sequence[int], rng: StackedRandomGenerator,
                eta: float = 0.0, callback: Callback | None = None) -> Tensor:
    """Dispatch to a sampler by name (ddpm | ddim | dpmpp_2m); `eta` is DDIM's (see `check_eta`)."""
    check_eta(name, eta)
    if name == "ddpm":
        return sample_ddpm(denoiser, x, timesteps, rng, callback)
    if name == "ddim":
        return sample_ddim(denoiser, x, timesteps, eta, rng, callback)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(denoiser, x, timesteps, callback)
    raise ValueError(f"sampler={name!r}; expected one of {SAMPLERS}")
