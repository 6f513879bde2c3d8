"""Schedules, parameterizations, loss weights and samplers: closed forms, round trips, determinism, seeds."""

import math

import pytest
import torch

from ldm.config import ConfigError
from ldm.diffusion import (
    SAMPLERS,
    Denoiser,
    NoiseSchedule,
    ScheduleConfig,
    guided_denoiser,
    loss_weight,
    make_betas,
    offset_noise,
    run_sampler,
    spaced_timesteps,
    target,
    to_eps,
    to_v,
    to_x0,
)
from ldm.seeding import StackedRandomGenerator

# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_is_the_product_of_alphas(name):
    start, end = (1e-4, 0.02) if name == "linear" else (0.00085, 0.012)
    betas = make_betas(name, 1000, start, end)
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end))
    expected = [math.prod(1 - b for b in betas[: t + 1].tolist()) for t in (0, 10, 500, 999)]
    got = schedule.alphas_cumprod[[0, 10, 500, 999]].tolist()
    assert got == pytest.approx(expected, rel=1e-9)


def test_linear_schedules_match_closed_forms():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert betas[1].item() - betas[0].item() == pytest.approx((0.02 - 1e-4) / 999)
    sl = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert sl[500].item() == pytest.approx((0.00085**0.5 + 500 / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2)


def test_cosine_alphas_cumprod_follows_the_squared_cosine():
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):  # before the 0.999 clip at the very end
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescaling(name):
    plain = NoiseSchedule(ScheduleConfig(beta_schedule=name))
    zsnr = NoiseSchedule(ScheduleConfig(beta_schedule=name, zero_terminal_snr=True))
    assert zsnr.alphas_cumprod[-1].item() == 0.0
    assert zsnr.snr(torch.tensor([999])).item() == 0.0
    assert zsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert bool((zsnr.alphas_cumprod[1:] < zsnr.alphas_cumprod[:-1]).all())
    # Algorithm 1: sqrt(alphas_cumprod) is an affine map of the original one.
    a, b = plain.alphas_cumprod.sqrt(), zsnr.alphas_cumprod.sqrt()
    scale = (b[0] - b[500]) / (a[0] - a[500])
    assert torch.allclose(b, (a - a[-1]) * scale, atol=1e-12)


def test_timestep_spacings_match_lin_et_al_table_2():
    assert spaced_timesteps(10, 1000, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps(10, 1000, "leading", steps_offset=1) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps(10, 1000, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert spaced_timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="num_steps=0"):
        spaced_timesteps(0, 1000)


def test_leading_spacing_never_steps_past_the_last_training_timestep():
    """SD's spacing (leading, offset 1) at 1000 steps would need timestep 1000: refused naming the most steps that fit
    (diffusers' DDIMScheduler fails there with an IndexError), instead of silently taking 999 steps."""
    assert spaced_timesteps(999, 1000, "leading", steps_offset=1) == list(range(999, 0, -1))
    with pytest.raises(ConfigError, match=r"num_steps=1000 with timestep_spacing=leading and steps_offset=1 .*"
                                          r"take e\.g\. 999 steps"):
        spaced_timesteps(1000, 1000, "leading", steps_offset=1)
    # (with offset 2 not every count below 998 fits, e.g. 500: the message gives one that does, and the rule)
    with pytest.raises(ConfigError, match=r"model.val_num_steps=999 .* take e\.g\. 998 steps \(a count n fits where "
                                          r"\(n - 1\) \* \(1000 // n\) \+ 2 < 1000\)"):
        NoiseSchedule(ScheduleConfig(timestep_spacing="leading", steps_offset=2)).check_num_steps(
            999, "model.val_num_steps")
    assert spaced_timesteps(1000, 1000, "leading") == list(range(999, -1, -1))


def test_zero_terminal_snr_with_leading_spacing_and_a_negative_offset_are_refused():
    with pytest.raises(ConfigError, match="trailing"):
        ScheduleConfig(zero_terminal_snr=True, timestep_spacing="leading")
    with pytest.raises(ConfigError, match=r"steps_offset=-1 must lie in \[0, num_train_timesteps\)"):
        ScheduleConfig(timestep_spacing="leading", steps_offset=-1)  # t = -1 would mean both noise and data
    # beta_start=0 (alpha_bar[0] = 1) ended DDIM in a bare ZeroDivisionError; beta_end >= 1 or start > end likewise
    for start, end in ((0.0, 0.02), (0.001, 1.5), (0.02, 0.001)):
        with pytest.raises(ConfigError, match=rf"beta_start={start} and beta_end={end} must satisfy 0 < beta_start "
                                              r"<= beta_end < 1"):
            ScheduleConfig(beta_schedule="linear", beta_start=start, beta_end=end)
    with pytest.raises(ConfigError, match=r"num_train_timesteps=1000\.0 must be a whole number"):
        ScheduleConfig(num_train_timesteps=1000.0)


# ---------------------------------------------------------------- parameterizations and loss weights


def _noisy(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    alpha, sigma = schedule.alpha_sigma(t, x0)
    return x0, eps, alpha * x0 + sigma * eps, alpha, sigma


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_predictions_round_trip(prediction):
    schedule = NoiseSchedule()
    t = torch.tensor([0, 10, 500, 999])
    x0, eps, x_t, alpha, sigma = _noisy(schedule, t)
    out = target(prediction, x0, eps, alpha, sigma)
    v = alpha * eps - sigma * x0
    assert torch.allclose(to_x0(out, x_t, alpha, sigma, prediction), x0, atol=1e-4)
    assert torch.allclose(to_eps(out, x_t, alpha, sigma, prediction), eps, atol=1e-4)
    assert torch.allclose(to_v(out, x_t, alpha, sigma, prediction), v, atol=1e-4)


def test_v_prediction_is_exact_at_zero_terminal_snr():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    x0, eps, x_t, alpha, sigma = _noisy(schedule, torch.full((4,), 999))
    assert torch.equal(x_t, eps)
    v = target("v", x0, eps, alpha, sigma)
    assert torch.equal(to_x0(v, x_t, alpha, sigma, "v"), -v) and torch.allclose(to_x0(v, x_t, alpha, sigma, "v"), x0)


@pytest.mark.parametrize("prediction,factor", [("eps", lambda s: s), ("v", lambda s: s + 1), ("x0", lambda s: 1)])
def test_min_snr_weights_equal_min_snr_gamma_in_x0_space(prediction, factor):
    snr = torch.tensor([0.01, 0.5, 5.0, 20.0, 1e4])
    w = loss_weight(snr, prediction, "min_snr", gamma=5.0)
    # The error in `prediction` space is factor(snr) times the x0-space error.
    assert torch.allclose(w * factor(snr), snr.clamp(max=5.0), rtol=1e-5)
    assert torch.equal(loss_weight(snr, prediction, "uniform"), torch.ones(5))


def test_min_snr_weights_at_zero_snr_are_finite():
    snr = torch.tensor([0.0, 1.0])
    assert loss_weight(snr, "eps", "min_snr").tolist() == [1.0, 1.0]
    assert loss_weight(snr, "v", "min_snr").tolist() == [0.0, 0.5]


def test_offset_noise_adds_a_per_channel_constant():
    a = offset_noise((2, 3, 4, 4), 0.0, torch.Generator().manual_seed(1))
    b = offset_noise((2, 3, 4, 4), 0.5, torch.Generator().manual_seed(1))
    diff = b - a
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().sum() > 0


def test_logit_normal_timesteps_follow_their_quantiles():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from ldm.diffusion.objective import DiffusionConfig, sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, DiffusionConfig(), g)
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.float().mean().item() - 499.5) < 5
    config = DiffusionConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=1.0)
    t = sample_timesteps(20000, 1000, config, g)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    # Median T * sigmoid(0.5) = 622; P(t < 200) = Phi((logit(0.2) - 0.5) / 1) = Phi(-1.886) = 0.030.
    assert abs(t.float().median().item() - 1000 * torch.sigmoid(torch.tensor(0.5)).item()) < 5
    assert abs((t < 200).float().mean().item() - 0.0297) < 0.004
    # draw for draw diffusers' SD3 training recipe: indices = (u * num_train_timesteps).long()
    u = compute_density_for_timestep_sampling("logit_normal", 20000, 0.5, 1.0,
                                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_timesteps(20000, 1000, config, torch.Generator().manual_seed(1)), (u * 1000).long())
    narrow = DiffusionConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.5)  # another std too
    u = compute_density_for_timestep_sampling("logit_normal", 20000, 0.5, 0.5,
                                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_timesteps(20000, 1000, narrow, torch.Generator().manual_seed(1)), (u * 1000).long())
    with pytest.raises(ConfigError, match="timestep_sampling"):
        DiffusionConfig(timestep_sampling="lognormal")


# ---------------------------------------------------------------- samplers


class ToyNet(torch.nn.Module):
    """A tiny conditional network: output = conv(x) * (1 + t/1000) + cond."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, cond):
        return 0.1 * self.conv(x) * (1 + t.float()[:, None, None, None] / 1000) + cond[:, :, None, None]


def _sample(name, seeds, cond_value=1.0, scale=3.0, steps=8, prediction="v", zsnr=True):
    net = ToyNet()
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zsnr))
    cond = torch.full((len(seeds), 2), cond_value)
    uncond = torch.zeros(len(seeds), 2)
    denoiser = Denoiser(guided_denoiser(net, cond, uncond, scale), schedule, prediction)
    rng = StackedRandomGenerator(seeds)
    x = rng.randn((len(seeds), 2, 6, 6))
    return run_sampler(name, denoiser, x, schedule.timesteps(steps), rng, eta=0.5 if name == "ddim" else 0.0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_sample_at_batch_sizes_1_and_4(name):
    seeds = [7, 8, 9, 10]
    batch = _sample(name, seeds)
    singles = torch.cat([_sample(name, [s]) for s in seeds])
    assert torch.allclose(batch, singles, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_ddim_eta_zero_is_deterministic():
    schedule = NoiseSchedule()
    denoiser = Denoiser(lambda x, t: 0.3 * x, schedule, "eps")
    x = torch.randn(2, 2, 4, 4)
    a = run_sampler("ddim", denoiser, x, schedule.timesteps(10), StackedRandomGenerator([1, 2]), eta=0.0)
    b = run_sampler("ddim", denoiser, x, schedule.timesteps(10), StackedRandomGenerator([3, 4]), eta=0.0)
    assert torch.equal(a, b)


def test_guidance_scale_one_is_the_conditional_prediction_without_an_uncond_pass():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * cond[:, :, None, None]

    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 500)
    cond, uncond = torch.rand(3, 2), torch.rand(3, 2)
    assert torch.equal(guided_denoiser(model, cond, uncond, 1.0)(x, t), model(x, t, cond))
    assert calls == [3, 3]
    guided = guided_denoiser(model, cond, uncond, 4.0)(x, t)
    assert calls[-1] == 6  # cond and uncond in one batch
    expected = model(x, t, uncond) + 4.0 * (model(x, t, cond) - model(x, t, uncond))
    assert torch.allclose(guided, expected, atol=1e-6)


def test_guidance_batches_dict_conditionings():
    model = lambda x, t, c: x * c["context"].mean(dim=(1, 2))[:, None, None, None]
    cond, uncond = {"context": torch.ones(2, 3, 4)}, {"context": torch.zeros(2, 3, 4)}
    x = torch.randn(2, 1, 2, 2)
    assert torch.allclose(guided_denoiser(model, cond, uncond, 2.0)(x, torch.zeros(2)), 2 * x)


def _ddpm_std(schedule, timesteps, s):
    """Std of DDPM's output for N(mu, s^2) data, iterating Var(x_s) = (c0 k + c1)^2 Var(x_t) + posterior variance."""
    var = 1.0
    for t, r in zip(timesteps, list(timesteps[1:]) + [-1]):
        abar_t, abar_r = schedule.abar(t), schedule.abar(r)
        k = math.sqrt(abar_t) * s**2 / (abar_t * s**2 + 1 - abar_t)             # d E[x0 | x_t] / d x_t
        c0 = math.sqrt(abar_r) * (1 - abar_t / abar_r) / (1 - abar_t)            # posterior mean's x0 coefficient
        c1 = math.sqrt(abar_t / abar_r) * (1 - abar_r) / (1 - abar_t)            # and x_t coefficient
        var = (c0 * k + c1) ** 2 * var + (1 - abar_t / abar_r) * (1 - abar_r) / (1 - abar_t)
    return math.sqrt(var)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("prediction,zsnr", [("eps", False), ("v", True), ("x0", True)])
def test_samplers_recover_a_gaussian_with_the_exact_denoiser(name, prediction, zsnr):
    """For data N(mu, s^2) the optimal denoiser is known in closed form, and so is the output's std.

    The ODE samplers (DDIM at eta 0, DPM-Solver++) end with E[x0 | x_t] at the smallest visited t, whose std is
    s * sqrt(alpha^2 s^2 / var(x_t)). DDPM with the posterior variance under-disperses with few steps (Ho et al.
    2020, sec. 3.2); its std follows from iterating the linear-Gaussian step.
    """
    mu, s = 0.7, 0.3
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zsnr))

    def exact(x_t, t):
        alpha, sigma = schedule.alpha_sigma(t, x_t)
        x0 = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)
        eps = (x_t - alpha * x0) / sigma
        return target(prediction, x0, eps, alpha, sigma)

    seeds = list(range(4000))
    rng = StackedRandomGenerator(seeds)
    x = rng.randn((len(seeds), 1, 1, 1))
    timesteps = schedule.timesteps(25)
    out = run_sampler(name, Denoiser(exact, schedule, prediction), x, timesteps, rng, eta=0.0)
    abar = schedule.abar(timesteps[-1])
    expected_std = (_ddpm_std(schedule, timesteps, s) if name == "ddpm"
                    else s * math.sqrt(abar * s**2 / (abar * s**2 + 1 - abar)))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(expected_std, abs=0.015)


def test_eps_prediction_refuses_zero_terminal_snr():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    denoiser = Denoiser(lambda x, t: x, schedule, "eps")
    with pytest.raises(ValueError, match="prediction=v"):
        run_sampler("ddim", denoiser, torch.randn(1, 1, 2, 2), schedule.timesteps(4), StackedRandomGenerator([0]))
