"""The noise schedule and prediction type: diffusers' scheduler_config.json <-> our `ScheduleConfig` + prediction.

Names: diffusers `squaredcos_cap_v2` is our `cosine` (Nichol & Dhariwal's with betas capped at 0.999, the same
formula), `epsilon` / `v_prediction` / `sample` are our `eps` / `v` / `x0`. The export writes a DDIMScheduler config
with `set_alpha_to_one=true`, since our samplers step to the clean data (alphas_cumprod = 1) at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.convert.common import UnsupportedCheckpointError
from ldm.diffusion.schedule import ScheduleConfig, make_betas

_BETAS_TO_OURS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_BETAS_TO_DIFFUSERS = {v: k for k, v in _BETAS_TO_OURS.items()}
_PREDICTION_TO_OURS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_PREDICTION_TO_DIFFUSERS = {v: k for k, v in _PREDICTION_TO_OURS.items()}

# Stable Diffusion's training schedule and sampling defaults (v1-inference.yaml and diffusers' SD scheduler configs).
SD_SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, timestep_spacing="leading", steps_offset=1)
# Scheduler classes whose `timestep_spacing` defaults to linspace in diffusers (the DDIM / DDPM / PNDM / LCM family's
# default is leading): a config that leaves the field out gets linspace. note: the Euler / Heun / LMS / KDPM2 classes
# visit DDIMScheduler's linspace timesteps; the multistep solvers (DPM-Solver, UniPC, DEIS, SA-Solver) space n + 1
# points and drop the last (10 steps: 999, 899, ..., 100 against 999, 888, ..., 0), which no spacing of ours repeats.
_LINSPACE_BY_DEFAULT = frozenset({
    "DEISMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler",
    "DPMSolverSDEScheduler", "DPMSolverSinglestepScheduler", "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler", "SASolverScheduler", "UniPCMultistepScheduler"})
# (beta_start, beta_end) of SD's (and LDM's text-to-image), LDM's unconditional and DDPM's schedules: recognised in
# rounded buffers.
_KNOWN_BETA_RANGES = ((SD_SCHEDULE.beta_start, SD_SCHEDULE.beta_end), (0.0015, 0.0195), (0.0001, 0.02))


def schedule_from_diffusers(config: Mapping[str, Any]) -> tuple[ScheduleConfig, str]:
    """(ScheduleConfig, prediction) of a diffusers scheduler config; fields it lacks take diffusers' defaults.

    Raises:
        UnsupportedCheckpointError: trained_betas, clip_sample or thresholding set, a beta schedule / prediction
            type we do not implement, or zero terminal SNR with leading spacing or eps-prediction.
    """
    what = f"scheduler config ({config.get('_class_name', 'unknown scheduler')})"
    if config.get("trained_betas") is not None:
        raise UnsupportedCheckpointError(f"{what}: trained_betas (an explicit beta list) is not supported")
    for option in ("clip_sample", "thresholding"):  # sampling options, which latents should not have
        if config.get(option):
            raise UnsupportedCheckpointError(f"{what}: {option}=true (clipping each step's x0 estimate) is not what "
                                             f"our samplers do, so the images would differ from diffusers'; set "
                                             f"\"{option}\": false in its scheduler_config.json, as Stable "
                                             f"Diffusion's configs have it")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in _BETAS_TO_OURS:
        raise UnsupportedCheckpointError(f"{what}: beta_schedule={beta_schedule!r} is not supported; choose one of "
                                         f"{sorted(_BETAS_TO_OURS)}")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTION_TO_OURS:
        raise UnsupportedCheckpointError(f"{what}: prediction_type={prediction_type!r} is not supported; choose one "
                                         f"of {sorted(_PREDICTION_TO_OURS)}")
    default_spacing = "linspace" if config.get("_class_name") in _LINSPACE_BY_DEFAULT else "leading"
    spacing = config.get("timestep_spacing", default_spacing)
    if config.get("rescale_betas_zero_snr") and spacing == "leading":
        raise UnsupportedCheckpointError(f"{what}: rescale_betas_zero_snr=true with timestep_spacing=leading never "
                                         f"samples from pure noise (Lin et al. 2023), which this framework refuses; "
                                         f"set \"timestep_spacing\": \"trailing\" in its scheduler_config.json")
    if config.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
        raise UnsupportedCheckpointError(f"{what}: rescale_betas_zero_snr=true with prediction_type=epsilon: at SNR 0 "
                                         f"the noise carries no information about x0 (Lin et al. 2023), which this "
                                         f"framework refuses; in its scheduler_config.json set \"prediction_type\": "
                                         f"\"v_prediction\" if the UNet was trained for v, else "
                                         f"\"rescale_betas_zero_snr\": false")
    schedule = ScheduleConfig(
        num_train_timesteps=config.get("num_train_timesteps", 1000), beta_schedule=_BETAS_TO_OURS[beta_schedule],
        beta_start=config.get("beta_start", 0.0001), beta_end=config.get("beta_end", 0.02),
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        timestep_spacing=spacing, steps_offset=config.get("steps_offset", 0))
    return schedule, _PREDICTION_TO_OURS[prediction_type]


def check_schedule_and_prediction(schedule: Any, prediction: Any) -> None:
    """Refuse a schedule that is no `ScheduleConfig` and a prediction that is not ours (eps, v, x0), diffusers' names
    included: an exporter checks them before it writes a file that its readers would misread."""
    if not isinstance(schedule, ScheduleConfig):
        raise TypeError(f"schedule must be an ldm.diffusion.schedule.ScheduleConfig, got {type(schedule).__name__}"
                        + (" (ScheduleConfig(**d) of a dict of its fields)" if isinstance(schedule, Mapping) else ""))
    if prediction not in _PREDICTION_TO_DIFFUSERS:
        ours = _PREDICTION_TO_OURS.get(prediction) if isinstance(prediction, str) else None
        raise ValueError(f"prediction={prediction!r}: ldm's predictions are eps, v and x0"
                         + (f" ({prediction!r} is diffusers' name of {ours!r})" if ours else ""))


def schedule_to_diffusers(schedule: ScheduleConfig, prediction: str) -> dict[str, Any]:
    """A DDIMScheduler config for our schedule and prediction (`scheduler/scheduler_config.json`)."""
    check_schedule_and_prediction(schedule, prediction)
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": _BETAS_TO_DIFFUSERS[schedule.beta_schedule], "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "trained_betas": None, "prediction_type": _PREDICTION_TO_DIFFUSERS[prediction],
        "timestep_spacing": schedule.timestep_spacing, "steps_offset": schedule.steps_offset,
        "rescale_betas_zero_snr": schedule.zero_terminal_snr, "clip_sample": False, "set_alpha_to_one": True,
        "thresholding": False,
    }


def schedule_from_betas(betas: torch.Tensor) -> ScheduleConfig:
    """SD's schedule with the beta range of an LDM checkpoint's `betas` buffer, checked against our formulas.

    The buffer may be stored in half precision (pruned fp16 files): it is compared within its dtype's rounding, and
    SD's and LDM's beta ranges are recognised through it (0.000850201 in fp16 is SD's 0.00085).

    Raises:
        UnsupportedCheckpointError: the betas follow neither the linear nor the scaled-linear schedule.
    """
    rtol = max(1e-4, 2 * torch.finfo(betas.dtype).eps) if betas.is_floating_point() else 1e-4
    betas = betas.double()
    start, end = float(betas[0]), float(betas[-1])
    ranges = [(s, e) for s, e in _KNOWN_BETA_RANGES if abs(s - start) <= rtol * s and abs(e - end) <= rtol * e]
    start, end = ranges[0] if ranges else (round(start, 8), round(end, 8))
    for name in ("scaled_linear", "linear"):
        if torch.allclose(make_betas(name, len(betas), start, end), betas, rtol=rtol, atol=1e-7):
            return ScheduleConfig(num_train_timesteps=len(betas), beta_schedule=name, beta_start=start,
                                  beta_end=end, timestep_spacing="leading", steps_offset=1)
    raise UnsupportedCheckpointError(f"the checkpoint's betas ({len(betas)} steps, {start:.6g} .. {end:.6g}) follow "
                                     f"neither a linear nor a scaled-linear schedule")
