"""Our samplers, schedules and training objective against diffusers' reference implementations.

A fixed random linear function of (x_t, t) stands in for the network, so both sides step on identical outputs, and
diffusers' schedulers are built from `schedule_to_diffusers` (the DDIMScheduler config we export, set_alpha_to_one=True)
plus each scheduler's own options. Checked, for leading (steps_offset=1) and trailing spacing at a step count that
divides 1000, with eps and v prediction:
    DDIM eta=0 and eta=1 (`DDIMScheduler`, our per-image noise fed in through `variance_noise`),
    DDPM (`DDPMScheduler`, variance_type=fixed_small, one generator per image as `StackedRandomGenerator` draws),
    DPM-Solver++(2M) (`DPMSolverMultistepScheduler`, dpmsolver++, order 2, final_sigmas_type=zero);
and alphas_cumprod of the three beta schedules with and without zero terminal SNR, min-SNR-gamma weights against
`diffusers.training_utils.compute_snr`, and `diffusion_loss` against a diffusers-style training step.

The timesteps visited are compared for every step count and all three spacings. Not compared, as they differ by
design: DDIM with trailing spacing at step counts that do not divide 1000 (diffusers steps to t - T // n, we to the
next visited timestep), linspace spacing, and DPM-Solver++ with zero terminal SNR.
diffusers runs its schedule in float32, we in float64: tolerances are relative (1e-5 of the output's scale) plus, for
SNR-derived quantities, the part explained by the measured float32 alphas_cumprod difference.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr

from ldm.convert.schedule import schedule_from_diffusers, schedule_to_diffusers
from ldm.diffusion import (
    Denoiser,
    DiffusionConfig,
    NoiseSchedule,
    ScheduleConfig,
    diffusion_loss,
    loss_weight,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from ldm.seeding import StackedRandomGenerator

C, SIZE = 4, 4
SEEDS = [3, 11]              # one per image
NUM_STEPS = 8                # divides 1000: leading and trailing visit the same timesteps on both sides
RTOL = 1e-5                  # relative to the output's scale, float32
ABAR_ATOL = 2e-6             # diffusers' float32 cumprod over 1000 steps vs our float64 one
# (leading0: an old SD 1 scheduler config's offset, whose last step lands on t = 0 and still adds noise)
SPACINGS = {"leading": dict(timestep_spacing="leading", steps_offset=1), "trailing": dict(timestep_spacing="trailing"),
            "leading0": dict(timestep_spacing="leading", steps_offset=0)}
BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (0.00085, 0.012)}

_g = torch.Generator().manual_seed(0)
_W = torch.randn(C, C, generator=_g, dtype=torch.float64) * 0.3 + 0.5 * torch.eye(C, dtype=torch.float64)
_BIAS = torch.randn(C, generator=_g, dtype=torch.float64)


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed linear 'network' of (x_t, t), computed in float64 and returned in x's dtype."""
    y = torch.einsum("ij,bjhw->bihw", _W, x.double()) + (t.double() / 1000).view(-1, 1, 1, 1) * _BIAS.view(1, -1, 1, 1)
    return y.to(x.dtype)


def _x_T() -> torch.Tensor:
    return torch.randn(len(SEEDS), C, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _per_image_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One draw of shape like[1:] per image from its own generator, stacked: what `StackedRandomGenerator` does."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in generators])


def _check_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """max |ours - ref| <= rtol * max |ref| (scale-aware: eps-prediction trajectories divide by alpha)."""
    assert ours.shape == ref.shape, f"{what}: shapes {tuple(ours.shape)} and {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), f"{what}: non-finite values"
    diff, scale = (ours.double() - ref.double()).abs().max().item(), ref.abs().max().item()
    assert scale > 1e-2, f"{what}: trivial output"
    assert diff <= rtol * scale, f"{what}: max abs difference {diff:.3g} > {rtol} * scale {scale:.3g}"


def _snr_rtol(ours: NoiseSchedule, theirs, t: torch.Tensor) -> torch.Tensor:
    """Relative tolerance on SNR-derived values at `t`: RTOL plus twice what the alphas_cumprod difference explains
    (d log SNR = d abar / (abar (1 - abar)); near t = 0, 1 - abar has few float32 digits)."""
    abar = ours.alphas_cumprod[t]
    d_abar = (theirs.alphas_cumprod.double()[t] - abar).abs()
    return RTOL + 2 * d_abar / (abar * (1 - abar)).clamp(min=1e-300)


def _schedule(spacing: str, **kw) -> ScheduleConfig:
    return ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **SPACINGS[spacing], **kw)


# ---------------------------------------------------------------- samplers


def _run_ours(sampler: str, config: ScheduleConfig, prediction: str) -> tuple[torch.Tensor, list[int]]:
    schedule = NoiseSchedule(config)
    denoiser = Denoiser(model, schedule, prediction)
    ts = schedule.timesteps(NUM_STEPS)
    rng = StackedRandomGenerator(SEEDS)
    if sampler.startswith("ddim"):
        eta = float(sampler.removeprefix("ddim_eta"))
        return sample_ddim(denoiser, _x_T(), ts, eta=eta, rng=rng if eta else None), ts
    if sampler == "ddpm":
        return sample_ddpm(denoiser, _x_T(), ts, rng), ts
    return sample_dpmpp_2m(denoiser, _x_T(), ts), ts


def _run_diffusers(sampler: str, config: ScheduleConfig, prediction: str, ours_ts: list[int]):
    exported = schedule_to_diffusers(config, prediction)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    if sampler.startswith("ddim"):
        scheduler = DDIMScheduler.from_config(exported)
        scheduler.set_timesteps(NUM_STEPS)
    elif sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(exported, variance_type="fixed_small")
        scheduler.set_timesteps(NUM_STEPS)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            exported, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True)
        if config.timestep_spacing == "leading":
            # note: its `leading` is spaced by T // (n + 1) (889, 778, ... at n = 8), unlike its DDIM / DDPM
            # schedulers and ours (876, 751, ..., 1): the solver is compared on our timesteps.
            scheduler.set_timesteps(timesteps=ours_ts)
        else:
            scheduler.set_timesteps(NUM_STEPS)
    x = _x_T()
    for t in scheduler.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t)))
        if sampler.startswith("ddim"):
            # Our sampler draws once per step but the last (whose std is 0): the same per-image streams.
            eta = float(sampler.removeprefix("ddim_eta"))
            noise = _per_image_noise(generators, x) if eta else None
            x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        elif sampler == "ddpm":
            x = scheduler.step(out, t, x, generator=generators).prev_sample   # a list: one generator per image
        else:
            x = scheduler.step(out, t, x).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "leading0"])
@pytest.mark.parametrize("sampler", ["ddim_eta0", "ddim_eta0.5", "ddim_eta1", "ddpm", "dpmpp_2m"])
def test_sampler_matches_diffusers_scheduler(sampler, spacing, prediction):
    config = _schedule(spacing)
    ours, ours_ts = _run_ours(sampler, config, prediction)
    theirs, their_ts = _run_diffusers(sampler, config, prediction, ours_ts)
    assert their_ts == ours_ts
    _check_close(ours, theirs, f"{sampler} {spacing} {prediction}")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_visited_timesteps_match_ddim_scheduler_at_every_step_count(spacing):
    """The same timesteps as DDIMScheduler.set_timesteps for every step count (half-way cases included: linspace at
    27 of 1000 steps visits 499, not 500), skipping those where diffusers' own arange yields timestep -1."""
    for num_train_timesteps in (1000, 100, 37):
        options = SPACINGS.get(spacing, {"timestep_spacing": spacing})
        config = ScheduleConfig(num_train_timesteps=num_train_timesteps, **options)
        schedule, reference = NoiseSchedule(config), DDIMScheduler.from_config(schedule_to_diffusers(config, "eps"))
        compared = 0
        for num_steps in range(1, num_train_timesteps + 1):
            if spacing == "leading" and num_steps == num_train_timesteps:
                continue  # steps past the last training timestep with steps_offset=1: refused (test_diffusion.py)
            reference.set_timesteps(num_steps)
            theirs = [int(t) for t in reference.timesteps]
            if min(theirs) < 0:
                continue
            assert schedule.timesteps(num_steps) == theirs, f"{spacing}, {num_steps} of {num_train_timesteps} steps"
            compared += 1
        assert compared >= num_train_timesteps * 0.9


def test_zero_terminal_snr_ddim_with_full_noise_stays_finite():
    """At t = T - 1 (alphas_cumprod = 0) with eta = 1, 1 - abar_s - sigma^2 is zero up to rounding."""
    config = ScheduleConfig(beta_schedule="scaled_linear", zero_terminal_snr=True, timestep_spacing="trailing")
    schedule = NoiseSchedule(config)
    denoiser = Denoiser(model, schedule, "v")
    for num_steps in (7, 10, 50):
        x = sample_ddim(denoiser, _x_T(), schedule.timesteps(num_steps), eta=1.0, rng=StackedRandomGenerator(SEEDS))
        assert torch.isfinite(x).all(), f"{num_steps} steps"
        assert x.abs().max().item() > 1e-2


# ---------------------------------------------------------------- schedules and training objective


def _both_schedules(beta_schedule: str, zero_terminal_snr: bool):
    start, end = BETA_RANGES[beta_schedule]
    config = ScheduleConfig(beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                            zero_terminal_snr=zero_terminal_snr)
    return config, NoiseSchedule(config), DDPMScheduler.from_config(schedule_to_diffusers(config, "v"))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_match_diffusers(beta_schedule, zero_terminal_snr):
    _, ours, theirs = _both_schedules(beta_schedule, zero_terminal_snr)
    a, b = ours.alphas_cumprod, theirs.alphas_cumprod.double()
    diff = (a - b).abs()
    positive = a > 0
    rel = (diff[positive] / a[positive]).max().item()
    assert diff.max().item() <= ABAR_ATOL
    assert rel <= 1e-4          # down to alphas_cumprod ~ 1e-9 at the end of the cosine schedule
    if zero_terminal_snr:
        assert a[-1].item() == 0.0 and b[-1].item() == 0.0
    else:
        assert bool(positive.all())


@pytest.mark.parametrize(("prediction", "zero_terminal_snr"), [("eps", False), ("v", False), ("v", True)])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_min_snr_weights_match_compute_snr(beta_schedule, prediction, zero_terminal_snr):
    # (eps-prediction with zero terminal SNR is refused by DiffusionConfig)
    _, ours, theirs = _both_schedules(beta_schedule, zero_terminal_snr)
    t = torch.arange(ours.num_train_timesteps)
    gamma = 5.0
    # The min-SNR recipe of diffusers' train_text_to_image.py.
    snr = compute_snr(theirs, t)
    ref = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    ref = ref / snr if prediction == "eps" else ref / (snr + 1)
    got = loss_weight(ours.snr(t), prediction, "min_snr", gamma)
    rel = (got.double() - ref.double()).abs() / ref.double().abs().clamp(min=1e-30)
    tol = _snr_rtol(ours, theirs, t)
    if zero_terminal_snr:           # SNR 0 at t = T - 1: both weights are exactly 0 (v)
        assert got[-1].item() == 0.0 and ref[-1].item() == 0.0
        rel, tol = rel[:-1], tol[:-1]
    assert bool((rel <= tol).all()), f"worst at t={int((rel / tol).argmax())}"


@pytest.mark.parametrize("gamma", [5.0, 1.0])
@pytest.mark.parametrize(("prediction", "zero_terminal_snr"), [("eps", False), ("v", False), ("v", True),
                                                               ("x0", False)])
def test_diffusion_loss_matches_a_diffusers_training_step(prediction, zero_terminal_snr, gamma):
    """Timesteps, then noise, then offset noise from one generator (our documented order), fed to diffusers'
    add_noise / get_velocity / compute_snr and the min-SNR recipe (at the default gamma and another)."""
    batch, offset = 64, 0.1
    config = DiffusionConfig(schedule=ScheduleConfig(zero_terminal_snr=zero_terminal_snr), prediction=prediction,
                             loss_weighting="min_snr", min_snr_gamma=gamma, offset_noise=offset)
    ours_schedule = NoiseSchedule(config.schedule)
    theirs = DDPMScheduler.from_config(schedule_to_diffusers(config.schedule, prediction))
    x0 = torch.randn(batch, C, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    got = diffusion_loss(model, x0, ours_schedule, config, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g) + offset * torch.randn(batch, C, 1, 1, generator=g)
    x_t = theirs.add_noise(x0, noise, t)
    target = {"eps": noise, "v": theirs.get_velocity(x0, noise, t), "x0": x0}[prediction]
    err = (model(x_t, t) - target).pow(2).mean(dim=(1, 2, 3))
    snr = compute_snr(theirs, t)
    weight = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction == "eps":
        weight = weight / snr
    elif prediction == "v":
        weight = weight / (snr + 1)
    ref = weight * err

    rel = (got.double() - ref.double()).abs() / ref.double().abs().clamp(min=1e-30)
    tol = _snr_rtol(ours_schedule, theirs, t)
    assert bool((rel <= tol).all()), f"worst at t={int(t[(rel / tol).argmax()])}"


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDIMScheduler",
                                  "PNDMScheduler"])
def test_a_scheduler_config_without_timestep_spacing_takes_its_class_default(name):
    """diffusers' default spacing depends on the scheduler class (linspace for the solvers, leading for DDIM / DDPM /
    PNDM): an imported config that leaves it out is spaced as its own class would space it."""
    config = {"_class_name": name, "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012}
    schedule, _ = schedule_from_diffusers(config)
    assert schedule.timestep_spacing == getattr(diffusers, name).from_config(config).config.timestep_spacing

