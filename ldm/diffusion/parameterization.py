"""What the network predicts (eps, v or x0), conversions between them, loss weighting and offset noise.

With x_t = alpha * x0 + sigma * eps and alpha^2 + sigma^2 = 1 (variance preserving):
    eps-prediction   target eps                                    (Ho et al. 2020)
    v-prediction     target v = alpha * eps - sigma * x0            (Salimans & Ho 2022, eq. 9)
    x0-prediction    target x0
Each is an affine function of the others given (x_t, alpha, sigma), so any one converts to the rest.
"""

from __future__ import annotations

import torch

from ldm.config import check_choice

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("uniform", "min_snr")

Tensor = torch.Tensor


def to_x0(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The clean-data estimate x0 from a network output of type `prediction`."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha     # note: undefined where alpha = 0 (zero terminal SNR)
    if prediction == "v":
        return alpha * x_t - sigma * output
    if prediction == "x0":
        return output
    raise ValueError(f"prediction={prediction!r}; expected one of {PREDICTIONS}")


def to_eps(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The noise estimate eps from a network output of type `prediction`."""
    if prediction == "eps":
        return output
    if prediction == "v":
        return sigma * x_t + alpha * output
    if prediction == "x0":
        return (x_t - alpha * output) / sigma     # note: undefined where sigma = 0 (never at t >= 0)
    raise ValueError(f"prediction={prediction!r}; expected one of {PREDICTIONS}")


def to_v(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The velocity estimate v = alpha * eps - sigma * x0 from a network output of type `prediction`."""
    if prediction == "v":
        return output
    x0 = to_x0(output, x_t, alpha, sigma, prediction)
    eps = to_eps(output, x_t, alpha, sigma, prediction)
    return alpha * eps - sigma * x0


def target(prediction: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of the training loss for `prediction`."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction={prediction!r}; expected one of {PREDICTIONS}")


def loss_weight(snr: Tensor, prediction: str, weighting: str = "uniform", gamma: float = 5.0) -> Tensor:
    """Per-sample weight of the squared error in `prediction` space.

    `min_snr` (Hang et al. 2023) weights the x0-space error by min(SNR, gamma). The error in eps space is SNR times
    the x0 error, and in v space (SNR + 1) times, so the weight in each space is min(SNR, gamma) divided by that
    factor: eps -> min(SNR, gamma) / SNR, v -> min(SNR, gamma) / (SNR + 1), x0 -> min(SNR, gamma).
    """
    check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
    check_choice("prediction", prediction, PREDICTIONS)
    if weighting == "uniform":
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        # note: at SNR = 0 (zero terminal SNR) the limit of min(SNR, gamma)/SNR is 1.
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def offset_noise(shape: tuple[int, ...] | torch.Size, strength: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise plus `strength` times a per-channel constant (Guttenberg 2023, "offset noise")."""
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if strength > 0:
        b, c = shape[0], shape[1]
        noise = noise + strength * torch.randn((b, c) + (1,) * (len(shape) - 2), generator=generator,
                                               device=device, dtype=dtype)
    return noise

