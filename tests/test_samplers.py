"""samplers: parity with k-diffusion's sampling.py / external.py on the analytic Gaussian denoiser, and the noise
sources.

Tolerance for "fp32 round-off": |ours - k-diffusion| <= 1e-5 |k-diffusion| + 1e-6 max|x_start|. The samples start
at magnitude ~3 sigma_max and every step mixes x with D, so float32 round-off of order 1e-7 max|x_start| (one ulp)
enters each step; k-diffusion computes its step coefficients in float32, we in float64.
"""

import math

import pytest
import torch

import samplers
from ldm.schedule import scaled_linear_alphas_cumprod
from sampler_oracles import GaussianProblem, NoiseQueue, k_external, k_sampling

SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146


def assert_fp32_parity(ours, reference, x_start):
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * float(x_start.abs().max()))


def discrete_schedule():
    return k_external.DiscreteSchedule(samplers.DiscreteEpsDenoiser(None, scaled_linear_alphas_cumprod())
                                       .sigmas, quantize=False)


def schedules_under_test(n):
    return {
        'karras': k_sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX),
        'exponential': k_sampling.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX),
        'uniform': discrete_schedule().get_sigmas(n),
    }


SCHEDULE_CASES = [(n, name) for n in (3, 10, 25) for name in ('karras', 'exponential', 'uniform')]

DETERMINISTIC = ['sample_euler', 'sample_heun', 'sample_dpm_2', 'sample_lms', 'sample_dpmpp_2m']
STOCHASTIC = {  # name -> extra keyword arguments
    'sample_euler_ancestral': {}, 'sample_dpm_2_ancestral': {}, 'sample_dpmpp_2s_ancestral': {},
    'sample_dpmpp_sde': {}, 'sample_dpmpp_2m_sde': {'solver_type': 'midpoint'},
    'sample_dpmpp_2m_sde_heun': {'solver_type': 'heun'}, 'sample_dpmpp_3m_sde': {}, 'sample_dpmpp_sde_eta_half':
    {'eta': 0.5},
}


@pytest.mark.parametrize('n,schedule', SCHEDULE_CASES)
@pytest.mark.parametrize('name', DETERMINISTIC)
def test_deterministic_samplers_match_k_diffusion(name, n, schedule):
    problem = GaussianProblem()
    sigmas = schedules_under_test(n)[schedule]
    x = problem.start(float(sigmas[0]))
    reference = getattr(k_sampling, name)(problem.denoiser, x, sigmas, disable=True)
    ours = getattr(samplers, name)(problem.denoiser, x, sigmas, disable=True)
    assert_fp32_parity(ours, reference, x)


@pytest.mark.parametrize('n,schedule', SCHEDULE_CASES)
@pytest.mark.parametrize('case', list(STOCHASTIC))
def test_stochastic_samplers_match_k_diffusion_with_the_same_noise(case, n, schedule):
    function = {'sample_dpmpp_2m_sde_heun': 'sample_dpmpp_2m_sde', 'sample_dpmpp_sde_eta_half': 'sample_dpmpp_sde'}
    name = function.get(case, case)
    problem = GaussianProblem()
    sigmas = schedules_under_test(n)[schedule]
    x = problem.start(float(sigmas[0]))
    reference_noise, our_noise = NoiseQueue(x.shape), NoiseQueue(x.shape)
    reference = getattr(k_sampling, name)(problem.denoiser, x, sigmas, disable=True, noise_sampler=reference_noise,
                                          **STOCHASTIC[case])
    ours = getattr(samplers, name)(problem.denoiser, x, sigmas, disable=True, noise_sampler=our_noise,
                                   **STOCHASTIC[case])
    assert_fp32_parity(ours, reference, x)
    # Same noise requests in the same order: the noise is attributed to the same steps.
    assert len(our_noise.calls) == len(reference_noise.calls)
    torch.testing.assert_close(torch.tensor(our_noise.calls), torch.tensor(reference_noise.calls), rtol=1e-6, atol=0)


@pytest.mark.parametrize('name', ['sample_euler', 'sample_heun', 'sample_dpm_2'])
def test_churn_matches_k_diffusion_when_every_step_churns(name):
    problem = GaussianProblem()
    sigmas = k_sampling.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX)
    x = problem.start(SIGMA_MAX)
    churn = {'s_churn': 2.0, 's_noise': 1.003}
    torch.manual_seed(123)  # both draw their churn noise with torch.randn_like, one per step
    reference = getattr(k_sampling, name)(problem.denoiser, x, sigmas, disable=True, **churn)
    torch.manual_seed(123)
    ours = getattr(samplers, name)(problem.denoiser, x, sigmas, disable=True, **churn)
    assert_fp32_parity(ours, reference, x)


@pytest.mark.parametrize('name', ['sample_euler', 'sample_heun', 'sample_dpm_2'])
def test_churn_limited_to_a_sigma_range_matches_k_diffusion(name, monkeypatch):
    """k-diffusion draws churn noise at every step, we only where gamma > 0: feed both the noise of step i."""
    problem = GaussianProblem()
    sigmas = k_sampling.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
    x = problem.start(SIGMA_MAX)
    step_noise = NoiseQueue(x.shape).noise
    drawn = iter(step_noise)

    class TorchWithQueuedRandn:
        def __getattr__(self, attribute):
            return (lambda like: next(drawn)) if attribute == 'randn_like' else getattr(torch, attribute)

    monkeypatch.setattr(k_sampling, 'torch', TorchWithQueuedRandn())
    churn = {'s_churn': 3.0, 's_tmin': 0.5, 's_tmax': 5.0}
    reference = getattr(k_sampling, name)(problem.denoiser, x, sigmas, disable=True, **churn)
    levels = sigmas.tolist()
    ours = getattr(samplers, name)(problem.denoiser, x, sigmas, disable=True,
                                   noise_sampler=lambda sigma, sigma_hat: step_noise[levels.index(sigma)], **churn)
    assert_fp32_parity(ours, reference, x)


@pytest.mark.parametrize('order', [1, 2, 3, 4, 5])
def test_lms_coefficients_match_k_diffusion_quadrature(order):
    # float64 levels: with float32 ones NumPy evaluates k-diffusion's integrand in float32 (~1e-7 relative).
    levels = k_sampling.get_sigmas_karras(12, SIGMA_MIN, SIGMA_MAX).double().numpy()
    for i in range(order - 1, 11):
        for j in range(order):
            reference = k_sampling.linear_multistep_coeff(order, levels, i, j)
            assert samplers.linear_multistep_coeff(order, levels, i, j) == pytest.approx(reference, rel=1e-9, abs=1e-12)


def test_lms_rejects_an_order_above_the_available_history():
    with pytest.raises(ValueError, match='too high'):
        samplers.linear_multistep_coeff(3, [3.0, 2.0, 1.0, 0.0], 1, 0)


@pytest.mark.parametrize('lms_order', [2, 3])
def test_lms_lower_orders_match_k_diffusion(lms_order):
    problem = GaussianProblem()
    sigmas = k_sampling.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
    x = problem.start(SIGMA_MAX)
    reference = k_sampling.sample_lms(problem.denoiser, x, sigmas, disable=True, order=lms_order)
    assert_fp32_parity(samplers.sample_lms(problem.denoiser, x, sigmas, disable=True, order=lms_order), reference, x)


@pytest.mark.parametrize('nfe', [6, 10, 11, 20])
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_dpm_fast_matches_k_diffusion(nfe, eta):
    problem = GaussianProblem()
    x = problem.start(SIGMA_MAX)
    reference_noise, our_noise = NoiseQueue(x.shape), NoiseQueue(x.shape)
    reference = k_sampling.sample_dpm_fast(problem.denoiser, x, SIGMA_MIN, SIGMA_MAX, nfe, disable=True, eta=eta,
                                           noise_sampler=reference_noise)
    problem.calls = 0
    ours = samplers.sample_dpm_fast(problem.denoiser, x, SIGMA_MIN, SIGMA_MAX, nfe, disable=True, eta=eta,
                                    noise_sampler=our_noise)
    assert_fp32_parity(ours, reference, x)
    assert problem.calls == nfe


@pytest.mark.parametrize('order', [2, 3])
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_dpm_adaptive_matches_k_diffusion_and_reports_nfe(order, eta):
    # A wide data distribution makes the local error estimates of the first steps (~1e-5) much larger than
    # k-diffusion's own float32 round-off in them (~1e-7); otherwise its PID controller amplifies that round-off.
    problem = GaussianProblem(data_std=5.0)
    x = problem.start(SIGMA_MAX)
    reference_noise, our_noise = NoiseQueue(x.shape), NoiseQueue(x.shape)
    reference, reference_info = k_sampling.sample_dpm_adaptive(
        problem.denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, order=order, eta=eta, noise_sampler=reference_noise,
        return_info=True)
    problem.calls = 0
    ours, info = samplers.sample_dpm_adaptive(problem.denoiser, x, SIGMA_MIN, SIGMA_MAX, disable=True, order=order,
                                              eta=eta, noise_sampler=our_noise, return_info=True)
    assert info == reference_info
    assert info['nfe'] == problem.calls
    assert_fp32_parity(ours, reference, x)


def test_callback_reports_each_step_with_its_sigma_and_denoised():
    problem = GaussianProblem()
    sigmas = k_sampling.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX)
    x = problem.start(SIGMA_MAX)
    ours, reference = [], []
    k_sampling.sample_heun(problem.denoiser, x, sigmas, disable=True, callback=reference.append)
    samplers.sample_heun(problem.denoiser, x, sigmas, disable=True, callback=ours.append)
    assert [info['i'] for info in ours] == list(range(6))
    for mine, theirs in zip(ours, reference):
        assert set(mine) == {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
        assert float(mine['sigma']) == float(theirs['sigma']) and float(mine['sigma_hat']) == float(theirs['sigma_hat'])
        assert_fp32_parity(mine['denoised'], theirs['denoised'], x)


def test_ancestral_step_matches_k_diffusion():
    for sigma_from, sigma_to, eta in [(10.0, 5.0, 1.0), (2.0, 1.9, 0.5), (1.0, 0.0, 1.0), (3.0, 1.0, 0.0)]:
        reference = k_sampling.get_ancestral_step(torch.tensor(sigma_from), torch.tensor(sigma_to), eta)
        ours = samplers.get_ancestral_step(sigma_from, sigma_to, eta)
        assert ours == pytest.approx([float(v) for v in reference], rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# Schedules and discrete wrappers against k-diffusion
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [1, 2, 10, 37])
def test_k_diffusion_schedules_match(n):
    pairs = [
        (samplers.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX), k_sampling.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)),
        (samplers.get_sigmas_karras(n, 0.1, 10.0, rho=3.0), k_sampling.get_sigmas_karras(n, 0.1, 10.0, rho=3.0)),
        (samplers.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX),
         k_sampling.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX)),
        (samplers.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0),
         k_sampling.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0)),
    ]
    for ours, reference in pairs:
        assert ours.dtype == reference.dtype and ours.shape == (n + 1,) and float(ours[-1]) == 0.0
        # k-diffusion evaluates these in float32: a few ulps (we evaluate in float64 and round once).
        torch.testing.assert_close(ours, reference, rtol=3e-6, atol=0)
    # VP: k-diffusion evaluates exp(x) - 1 in float32, which cancels near t = eps_s (x ~ 1e-4): compare it loosely
    # and check ours against the formula in float64.
    ours, reference = samplers.get_sigmas_vp(n), k_sampling.get_sigmas_vp(n)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=0)
    t = torch.linspace(1, 1e-3, n, dtype=torch.float64)
    exact = torch.sqrt(torch.expm1(19.9 * t ** 2 / 2 + 0.1 * t))
    torch.testing.assert_close(ours[:-1].double(), exact, rtol=1e-6, atol=0)


def test_sd_alphas_cumprod_give_the_known_sigma_range():
    denoiser = samplers.DiscreteEpsDenoiser(None, scaled_linear_alphas_cumprod())
    assert float(denoiser.sigma_min) == pytest.approx(0.0292, abs=1e-4)
    assert float(denoiser.sigma_max) == pytest.approx(14.6146, abs=1e-4)


@pytest.mark.parametrize('quantize', [True, False])
def test_discrete_denoisers_match_k_diffusion_wrappers(quantize):
    alphas_cumprod = scaled_linear_alphas_cumprod().float()
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    seen_t = []

    def unet(x_t, t, context=None):  # any function of (x_t, t) will do; records the timesteps it was given
        seen_t.append(t)
        return torch.einsum('ij,bjhw->bihw', weight, x_t) * (1 + t.reshape(-1, 1, 1, 1) / 1000) + context

    context = torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4) * 5
    sigma = torch.tensor([7.3, 0.21])
    pairs = [(samplers.DiscreteEpsDenoiser(unet, alphas_cumprod, quantize),
              k_external.DiscreteEpsDDPMDenoiser(unet, alphas_cumprod, quantize)),
             (samplers.DiscreteVDenoiser(unet, alphas_cumprod, quantize),
              k_external.DiscreteVDDPMDenoiser(unet, alphas_cumprod, quantize))]
    for ours, reference in pairs:
        seen_t.clear()
        torch.testing.assert_close(ours(x, sigma, context=context), reference(x, sigma, context=context),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen_t[0].float(), seen_t[1].float(), rtol=0, atol=1e-3)
        torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-6, atol=0)
        levels = torch.tensor([0.01, 0.0292, 0.5, 3.0, 14.6146, 20.0])
        torch.testing.assert_close(ours.sigma_to_t(levels).float(), reference.sigma_to_t(levels).float(),
                                   rtol=0, atol=1e-3)
        timesteps = torch.tensor([0.0, 0.5, 17.25, 998.9, 999.0])
        torch.testing.assert_close(ours.t_to_sigma(timesteps), reference.t_to_sigma(timesteps), rtol=1e-6, atol=0)


@pytest.mark.parametrize('n', [1, 7, 20, 1000])
def test_uniform_schedule_matches_k_diffusion_get_sigmas(n):
    denoiser = samplers.DiscreteEpsDenoiser(None, scaled_linear_alphas_cumprod())
    reference = k_external.DiscreteSchedule(denoiser.sigmas, quantize=False).get_sigmas(n)
    torch.testing.assert_close(samplers.get_sigmas_uniform(n, denoiser), reference, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Noise sources
# ----------------------------------------------------------------------------------------------------------------------

def test_brownian_noise_is_deterministic_per_seed_and_independent_of_query_order():
    x = torch.zeros(2, 3, 8, 8)
    queries = [(14.0, 9.0), (9.0, 3.5), (3.5, 0.2), (0.2, 0.05)]
    first = samplers.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=42)
    forward = [first(a, b) for a, b in queries]
    second = samplers.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=42)
    backward = [second(a, b) for a, b in reversed(queries)][::-1]
    for one, other in zip(forward, backward):
        assert torch.equal(one, other)
    other_seed = samplers.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=43)(*queries[0])
    assert not torch.allclose(other_seed, forward[0])


def test_brownian_noise_over_a_split_step_sums_to_the_same_increment():
    """Independence of the step count: the noise of [a, c] is that of [a, b] and [b, c] combined."""
    x = torch.zeros(1, 4, 16, 16)
    noise = samplers.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=7)
    for a, b, c in [(14.6, 7.0, 0.03), (5.0, 4.999, 4.99), (1.0, 0.3, 0.1)]:
        whole = noise(a, c) * math.sqrt(a - c)
        split = noise(a, b) * math.sqrt(a - b) + noise(b, c) * math.sqrt(b - c)
        torch.testing.assert_close(whole, split, rtol=0, atol=1e-5)


def test_brownian_noise_is_standard_normal_and_uncorrelated_across_steps():
    x = torch.zeros(1, 128, 128)  # 16384 values: standard errors ~0.008 for the mean, correlations and std
    noise = samplers.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=3)
    steps = [noise(a, b) for a, b in [(14.6, 10.0), (10.0, 2.0), (2.0, 1.99), (1.99, 0.03)]]
    for sample in steps:
        assert abs(float(sample.mean())) < 0.03 and abs(float(sample.std()) - 1) < 0.03
    correlations = torch.corrcoef(torch.stack([s.flatten() for s in steps]))
    assert (correlations - torch.eye(4)).abs().max() < 0.04


def test_brownian_noise_with_per_image_seeds_depends_only_on_each_seed():
    batch = samplers.BrownianTreeNoiseSampler(torch.zeros(3, 2, 4, 4), 0.1, 10.0, seed=[5, 6, 7])(8.0, 2.0)
    alone = samplers.BrownianTreeNoiseSampler(torch.zeros(1, 2, 4, 4), 0.1, 10.0, seed=[6])(8.0, 2.0)
    assert torch.equal(batch[1], alone[0])


def test_brownian_noise_rejects_levels_outside_its_range():
    noise = samplers.BrownianTreeNoiseSampler(torch.zeros(1, 2), 0.1, 10.0, seed=0)
    with pytest.raises(ValueError, match='outside its interval'):
        noise(12.0, 5.0)


def test_sde_samples_converge_as_the_brownian_path_is_refined():
    """With one Brownian path, refining the schedule changes the DPM++ 2M SDE sample less and less (fresh noise per
    step count would make every sample a different draw)."""
    problem = GaussianProblem(shape=(1, 2, 8, 8))
    x = problem.start(SIGMA_MAX)
    results = []
    for n in (16, 64, 256):
        sigmas = samplers.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX)
        noise = samplers.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=9)
        results.append(samplers.sample_dpmpp_2m_sde(problem.denoiser, x, sigmas, disable=True, noise_sampler=noise))
    coarse, fine = (results[1] - results[0]).abs().mean(), (results[2] - results[1]).abs().mean()
    assert fine < 0.6 * coarse
    sigmas = samplers.get_sigmas_exponential(256, SIGMA_MIN, SIGMA_MAX)
    other_path = samplers.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=10)
    fresh = samplers.sample_dpmpp_2m_sde(problem.denoiser, x, sigmas, disable=True, noise_sampler=other_path)
    assert (fresh - results[2]).abs().mean() > 5 * fine


def test_seeded_noise_sampler_draws_each_image_from_its_own_generator():
    x = torch.zeros(2, 3, 4)
    batch = samplers.seeded_noise_sampler(x, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = samplers.seeded_noise_sampler(x[:1], [torch.Generator().manual_seed(2)])
    first, second = batch(1.0, 0.5), batch(0.5, 0.1)
    assert torch.equal(first[1], alone(1.0, 0.5)[0]) and torch.equal(second[1], alone(0.5, 0.1)[0])
    assert not torch.equal(first, second)
