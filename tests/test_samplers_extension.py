"""The samplers package's extension points: model_denoiser (the one eps/v choice), the sampler and schedule registry,
and pluggable guidance with guidance interval checked against its closed form on an analytic Gaussian denoiser."""
import math

import pytest
import torch
from torch import nn

import samplers
from ldm.schedule import scaled_linear_alphas_cumprod
from samplers import (CFGDenoiser, GuidanceIntervalDenoiser, SamplerInfo, get_sigmas, guidance_interval,
                      model_denoiser, register_sampler, register_scheduler, resolve_sampler, sample,
                      unregister_sampler, unregister_scheduler)


class LinearModel:
    """A duck-typed latent-diffusion model whose UNet predicts 0.5 · x_t (its first 4 channels: inpainting UNets take
    9, predict 4): enough to check the eps and v formulas in closed form."""

    def __init__(self, parameterization):
        self.parameterization = parameterization
        self.alphas_cumprod = scaled_linear_alphas_cumprod().float()
        self.dtype = torch.float32
        self.seen = []

    def apply_model(self, x_t, t, context, y=None):
        self.seen.append((x_t.shape, t.clone()))
        return 0.5 * x_t[:, :4] + 0 * context.mean()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_model_denoiser_applies_the_eps_or_v_formula_of_the_model(parameterization):
    model = LinearModel(parameterization)
    denoiser = model_denoiser(model)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 3.0])
    denoised = denoiser(x, sigma, context=torch.zeros(2, 5, 8))
    c_in = (sigma ** 2 + 1).rsqrt()[:, None, None, None]
    x_t, s = x * c_in, sigma[:, None, None, None]
    # eps: D = x - sigma eps; v (Salimans & Ho 2022): D = c_in² x - sigma c_in v, with the prediction 0.5 x_t.
    expected = x - s * 0.5 * x_t if parameterization == "eps" else c_in ** 2 * x - s * c_in * 0.5 * x_t
    torch.testing.assert_close(denoised, expected, rtol=1e-6, atol=1e-6)
    # Unquantised by default (A1111's k-diffusion setting): the timesteps reaching the UNet are fractional.
    assert not torch.equal(model.seen[-1][1], model.seen[-1][1].round())
    model_denoiser(model, quantize=True)(x, sigma, context=torch.zeros(2, 5, 8))
    assert torch.equal(model.seen[-1][1], model.seen[-1][1].round())


def test_model_denoiser_feeds_the_inpainting_conditioning_beside_x():
    model = LinearModel("eps")
    model_denoiser(model)(torch.zeros(1, 4, 3, 3), torch.tensor([1.0]), context=torch.zeros(1, 5, 8),
                          concat=torch.zeros(1, 5, 3, 3))
    assert model.seen[-1][0] == (1, 9, 3, 3)


def test_model_denoiser_refuses_an_unknown_prediction_type():
    with pytest.raises(ValueError, match="predicts 'x0'.*'eps' and 'v'"):
        model_denoiser(LinearModel("x0"))


# ----- registry -----------------------------------------------------------------------------------------------------

def sample_halfway_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, fraction=0.5):
    """Euler steps that stop `fraction` of the way (a sampler a user might write to test an idea)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i]) * fraction
    return x


@pytest.fixture
def registered():
    info = register_sampler('Halfway Euler', sample_halfway_euler, schedule='Karras', options={'fraction': 0.25},
                            aliases=('halfway',))
    yield info
    if 'Halfway Euler' in samplers.SAMPLERS:
        unregister_sampler('Halfway Euler')


def test_registered_sampler_resolves_by_name_and_alias_and_runs_with_its_options(registered):
    assert samplers.SAMPLERS['Halfway Euler'] is registered
    assert resolve_sampler('halfway') == (registered, 'Automatic')
    assert resolve_sampler('Halfway Euler Exponential') == (registered, 'Exponential')  # legacy suffix form too

    class Identity(nn.Module):
        sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)

        def forward(self, x, sigma):
            return torch.zeros_like(x)

    sigmas = get_sigmas('Halfway Euler', 'Automatic', 4, Identity())
    torch.testing.assert_close(sigmas, samplers.get_sigmas_karras(4, 0.03, 14.6))  # its "Automatic" is Karras
    x = torch.ones(1, 1, 2, 2)
    # D = 0: each step scales x by 1 + (sigma_next / sigma - 1) · fraction, fraction 0.25 from the options.
    expected = math.prod(1 + (float(b) / float(a) - 1) * 0.25 for a, b in zip(sigmas[:-1], sigmas[1:]))
    torch.testing.assert_close(sample('Halfway Euler', Identity(), x, sigmas), x * expected)


def test_unregister_removes_the_sampler_and_builtins_stay(registered):
    unregister_sampler('Halfway Euler')
    assert 'Halfway Euler' not in samplers.SAMPLERS
    with pytest.raises(ValueError, match="unknown sampler 'halfway'"):
        resolve_sampler('halfway')
    with pytest.raises(ValueError, match="no sampler named 'Halfway Euler'"):
        unregister_sampler('Halfway Euler')
    with pytest.raises(ValueError, match="A1111's samplers and cannot be unregistered"):
        unregister_sampler('Euler')


@pytest.mark.parametrize("name, kwargs, message", [
    ('Euler', {}, "'Euler' is already registered"),
    ('New', {'aliases': ('k_euler',)}, "'k_euler' is already registered"),
    ('New', {'noise': 'gaussian'}, "noise must be one of none, rng, brownian"),
    ('New', {'schedule': 'Wavy'}, "unknown schedule type 'Wavy'"),
    ('', {}, "non-empty string"),
])
def test_register_sampler_refuses_clashes_and_unknown_settings(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_sampler(name, sample_halfway_euler, **kwargs)
    assert 'New' not in samplers.SAMPLERS


def test_a_sampler_function_or_info_can_be_used_without_registering():
    info, schedule = resolve_sampler(sample_halfway_euler, 'Karras')
    assert (info.name, info.function, schedule) == ('sample_halfway_euler', sample_halfway_euler, 'Karras')
    given = SamplerInfo('Mine', sample_halfway_euler)
    assert resolve_sampler(given) == (given, 'Automatic')


def test_registered_scheduler_is_a_schedule_type_until_unregistered():
    def linear(n, denoiser, is_sdxl=False):
        return torch.cat([torch.linspace(float(denoiser.sigma_max), float(denoiser.sigma_min), n), torch.zeros(1)])

    register_scheduler('Linear', linear)
    try:
        denoiser = model_denoiser(LinearModel("eps"))
        sigmas = get_sigmas('Euler', 'Linear', 5, denoiser)
        torch.testing.assert_close(sigmas, linear(5, denoiser))
        with pytest.raises(ValueError, match="'Linear' is already registered"):
            register_scheduler('Linear', linear)
    finally:
        unregister_scheduler('Linear')
    with pytest.raises(ValueError, match="unknown schedule type 'Linear'"):
        get_sigmas('Euler', 'Linear', 5, denoiser)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_scheduler('Karras')


# ----- guidance -----------------------------------------------------------------------------------------------------

class GaussianDenoiser(nn.Module):
    """The exact denoiser of data ~ N(mu, s² I): D(x, sigma) = (s² x + sigma² mu) / (s² + sigma²). The conditioning
    (`context`, [B, C, 1, 1]) is mu, so cond and uncond are two Gaussians with different means."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s2 = s * s

    def forward(self, x, sigma, context):
        sigma2 = sigma[:, None, None, None] ** 2
        return (self.s2 * x + sigma2 * context) / (self.s2 + sigma2)


def test_guidance_interval_is_cfg_inside_the_interval_and_conditional_outside():
    s2, scale, lo, hi = 0.25, 4.0, 0.5, 2.0
    mu_cond, mu_uncond = torch.full((3, 2, 1, 1), 1.5), torch.full((3, 2, 1, 1), -0.5)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    guided = GuidanceIntervalDenoiser(GaussianDenoiser(), lo, hi)
    for levels in ([0.1, 1.0, 5.0], [1.0, 1.0, 2.0], [0.2, 0.3, 9.0]):  # mixed, all inside, all outside
        sigma = torch.tensor(levels)
        out = guided(x, sigma, cond=mu_cond, uncond=mu_uncond, cond_scale=scale)
        for k, level in enumerate(levels):
            # Inside: D_u + w (D_c - D_u) is the Gaussian denoiser of mean mu_u + w (mu_c - mu_u); outside: D_c.
            mu = mu_uncond[k] + scale * (mu_cond[k] - mu_uncond[k]) if lo <= level <= hi else mu_cond[k]
            expected = (s2 * x[k] + level ** 2 * mu) / (s2 + level ** 2)
            torch.testing.assert_close(out[k], expected, rtol=1e-6, atol=1e-6)


def test_guidance_interval_covering_every_level_is_plain_cfg_bitwise():
    denoiser = GaussianDenoiser()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    args = dict(cond=torch.ones(2, 2, 1, 1), uncond=torch.zeros(2, 2, 1, 1), cond_scale=7.0)
    sigmas = samplers.get_sigmas_karras(6, 0.03, 14.6)
    everywhere = sample('Euler', guidance_interval(0, float('inf'))(denoiser), x * 14.6, sigmas, extra_args=args)
    assert torch.equal(everywhere, sample('Euler', CFGDenoiser(denoiser), x * 14.6, sigmas, extra_args=args))
    with pytest.raises(ValueError, match="0 <= sigma_lo <= sigma_hi"):
        GuidanceIntervalDenoiser(denoiser, 2.0, 1.0)
