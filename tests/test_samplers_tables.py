"""samplers: the A1111 SAMPLERS / SCHEDULERS tables end to end, the model-dependent schedule types, the restart
sampler, and the classifier-free-guidance wrapper."""

import math

import pytest
import torch
from scipy import stats

import samplers
from ldm.schedule import scaled_linear_alphas_cumprod
from sampler_oracles import GaussianProblem, k_sampling

STEPS = 20


@pytest.fixture(scope='module')
def sd_schedule():
    """The noise-level table of SD's scaled-linear schedule (a DiscreteEpsDenoiser without a model)."""
    return samplers.DiscreteEpsDenoiser(None, scaled_linear_alphas_cumprod())


def test_tables_list_exactly_the_a1111_names():
    assert list(samplers.SAMPLERS) == [
        'Euler a', 'Euler', 'LMS', 'Heun', 'DPM2', 'DPM2 a', 'DPM++ 2S a', 'DPM++ 2M', 'DPM++ SDE', 'DPM++ 2M SDE',
        'DPM++ 2M SDE Heun', 'DPM++ 3M SDE', 'DPM fast', 'DPM adaptive', 'Restart', 'DDIM', 'PLMS', 'UniPC', 'LCM']
    assert list(samplers.SCHEDULERS) == [
        'Automatic', 'Uniform', 'Karras', 'Exponential', 'Polyexponential', 'SGM Uniform', 'KL Optimal',
        'Align Your Steps', 'Simple', 'Normal', 'DDIM', 'Beta']


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_every_sampler_runs_end_to_end_and_samples_the_data_distribution(name, sd_schedule):
    problem = GaussianProblem(shape=(4, 1, 32, 32))
    sigmas = samplers.get_sigmas(name, 'Automatic', STEPS, sd_schedule)
    x = problem.start(float(sigmas[0]))
    out = samplers.sample(name, problem.denoiser, x, sigmas, disable=True, seeds=[1, 2, 3, 4])
    standardized = (out - problem.mu) / problem.s
    assert torch.isfinite(out).all()
    assert abs(float(standardized.mean())) < 0.08
    if name == 'LCM':
        # LCM jumps to D's estimate at each step, which only a consistency-distilled model makes a sample;
        # with the exact (posterior-mean) denoiser the spread shrinks.
        assert 0.3 < float(standardized.std()) < 1.0
    else:
        # 20 steps: first-order methods (Euler, Euler a, DDIM) under-disperse by up to ~15%.
        assert 0.8 < float(standardized.std()) < 1.1


@pytest.mark.parametrize('name', list(samplers.SAMPLERS))
def test_same_seeds_give_bitwise_identical_samples(name, sd_schedule):
    problem = GaussianProblem(shape=(2, 2, 4, 4))
    sigmas = samplers.get_sigmas(name, 'Automatic', STEPS, sd_schedule)
    x = problem.start(float(sigmas[0]))
    first = samplers.sample(name, problem.denoiser, x, sigmas, disable=True, seeds=[7, 8])
    second = samplers.sample(name, problem.denoiser, x, sigmas, disable=True, seeds=[7, 8])
    assert torch.equal(first, second)
    info = samplers.SAMPLERS[name]
    if info.noise != 'none' and info.options.get('eta', 1.0) > 0:
        other = samplers.sample(name, problem.denoiser, x, sigmas, disable=True, seeds=[7, 9])
        assert not torch.equal(other[1], first[1])
        if name != 'DPM adaptive':  # its step sizes are chosen for the whole batch, so images interact
            assert torch.equal(other[0], first[0])


@pytest.mark.parametrize('name', ['Euler a', 'DPM++ 2M SDE'])
def test_an_image_depends_on_its_own_seed_not_on_the_batch(name, sd_schedule):
    problem = GaussianProblem(shape=(3, 2, 4, 4))
    sigmas = samplers.get_sigmas(name, 'Automatic', 8, sd_schedule)
    x = problem.start(float(sigmas[0]))
    batch = samplers.sample(name, problem.denoiser, x, sigmas, disable=True, seeds=[1, 2, 3])
    alone = samplers.sample(name, problem.denoiser, x[2:], sigmas, disable=True, seeds=[3])
    assert torch.equal(batch[2:], alone)


@pytest.mark.parametrize('schedule', list(samplers.SCHEDULERS))
@pytest.mark.parametrize('steps', [1, 4, 20])
def test_every_schedule_type_gives_decreasing_levels_ending_in_zero(schedule, steps, sd_schedule):
    sigmas = samplers.SCHEDULERS[schedule](steps, sd_schedule)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert float(sigmas[-1]) == 0.0 and (sigmas[:-1] > 0).all()
    assert (sigmas[1:] < sigmas[:-1]).all()
    assert float(sigmas[0]) <= float(sd_schedule.sigma_max) * (1 + 1e-4)  # AYS's published 14.615 rounds up


@pytest.mark.parametrize('schedule', list(samplers.SCHEDULERS))
def test_every_schedule_type_runs_with_every_sampler_family(schedule, sd_schedule):
    problem = GaussianProblem(shape=(1, 1, 8, 8))
    for name in ('Euler', 'DPM++ 2M SDE', 'UniPC'):
        sigmas = samplers.get_sigmas(name, schedule, 6, sd_schedule)
        out = samplers.sample(name, problem.denoiser, problem.start(float(sigmas[0])), sigmas, disable=True, seeds=[0])
        assert torch.isfinite(out).all()


def test_unknown_names_raise_listing_the_valid_ones(sd_schedule):
    with pytest.raises(ValueError, match="unknown sampler 'Euler b'.*Euler a, Euler, LMS"):
        samplers.sample('Euler b', None, torch.zeros(1), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown schedule type 'Karas'.*Automatic, Uniform, Karras"):
        samplers.get_sigmas('Euler', 'Karas', 10, sd_schedule)
    with pytest.raises(ValueError, match="unknown schedule type"):
        samplers.get_scheduler('karras ')


def test_legacy_names_carry_their_schedule(sd_schedule):
    assert samplers.resolve_sampler('DPM++ 2M Karras') == (samplers.SAMPLERS['DPM++ 2M'], 'Karras')
    assert samplers.resolve_sampler('DPM++ 3M SDE Exponential') == (samplers.SAMPLERS['DPM++ 3M SDE'], 'Exponential')
    assert samplers.resolve_sampler('DPM++ 2M SDE Heun Karras') == (samplers.SAMPLERS['DPM++ 2M SDE Heun'], 'Karras')
    torch.testing.assert_close(samplers.get_sigmas('DPM++ 2M Karras', 'Automatic', 10, sd_schedule),
                               samplers.get_sigmas_karras(10, sd_schedule.sigma_min, sd_schedule.sigma_max))


def test_automatic_uses_each_samplers_a1111_default(sd_schedule):
    lo, hi = sd_schedule.sigma_min, sd_schedule.sigma_max
    torch.testing.assert_close(samplers.get_sigmas('Euler a', 'Automatic', 10, sd_schedule),
                               samplers.get_sigmas_uniform(10, sd_schedule))
    torch.testing.assert_close(samplers.get_sigmas('DPM++ 2M', 'Automatic', 10, sd_schedule),
                               samplers.get_sigmas_karras(10, lo, hi))
    torch.testing.assert_close(samplers.get_sigmas('DPM++ 2M SDE', 'Automatic', 10, sd_schedule),
                               samplers.get_sigmas_exponential(10, lo, hi))
    torch.testing.assert_close(samplers.get_sigmas('DDIM', 'Automatic', 10, sd_schedule),
                               samplers.get_sigmas_ddim_uniform(10, sd_schedule))


def test_dpm2_and_3m_sde_discard_the_penultimate_level(sd_schedule):
    for name, schedule in (('DPM2', samplers.get_sigmas_karras), ('DPM++ 3M SDE', samplers.get_sigmas_exponential)):
        longer = schedule(11, sd_schedule.sigma_min, sd_schedule.sigma_max)
        torch.testing.assert_close(samplers.get_sigmas(name, 'Automatic', 10, sd_schedule),
                                   torch.cat([longer[:-2], longer[-1:]]))


# ----------------------------------------------------------------------------------------------------------------------
# Model-dependent schedule types (A1111 definitions)
# ----------------------------------------------------------------------------------------------------------------------

def test_simple_takes_every_kth_training_level(sd_schedule):
    sigmas = samplers.get_sigmas_simple(10, sd_schedule)
    torch.testing.assert_close(sigmas[:-1], sd_schedule.sigmas[[999, 899, 799, 699, 599, 499, 399, 299, 199, 99]])


def test_sgm_uniform_and_normal_space_timesteps_evenly(sd_schedule):
    sgm = samplers.get_sigmas_sgm_uniform(4, sd_schedule)
    normal = samplers.get_sigmas_normal(4, sd_schedule)
    torch.testing.assert_close(sd_schedule.sigma_to_t(sgm[:-1], quantize=False), torch.tensor([999., 749.25, 499.5,
                                                                                              249.75]), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(sd_schedule.sigma_to_t(normal[:-1], quantize=False), torch.tensor([999., 666., 333.,
                                                                                                 0.]), atol=1e-3,
                               rtol=0)


def test_kl_optimal_is_evenly_spaced_in_arctan_sigma(sd_schedule):
    sigmas = samplers.get_sigmas_kl_optimal(7, 0.03, 14.6)
    angles = torch.atan(sigmas[:-1].double())
    torch.testing.assert_close(angles, torch.linspace(math.atan(14.6), math.atan(0.03), 7, dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize('steps', [3, 20])
def test_beta_schedule_uses_the_beta_quantiles_of_scipy(steps):
    sigmas = samplers.get_sigmas_beta(steps, 0.0292, 14.6146)
    quantiles = [stats.beta.ppf(p, 0.6, 0.6) for p in 1 - torch.linspace(0, 1, steps, dtype=torch.float64).numpy()]
    expected = torch.tensor([0.0292 + q * (14.6146 - 0.0292) for q in quantiles] + [0.0], dtype=torch.float32)
    torch.testing.assert_close(sigmas, expected, rtol=1e-6, atol=0)


def test_align_your_steps_reproduces_nvidias_tables_and_interpolates_log_linearly():
    for is_sdxl, table in ((False, samplers.ALIGN_YOUR_STEPS_SD15), (True, samplers.ALIGN_YOUR_STEPS_SDXL)):
        torch.testing.assert_close(samplers.get_sigmas_align_your_steps(11, is_sdxl),
                                   torch.tensor(list(table) + [0.0]), rtol=1e-6, atol=0)
        # 21 levels: the table's points plus log-midpoints between them.
        finer = samplers.get_sigmas_align_your_steps(21, is_sdxl)
        torch.testing.assert_close(finer[:-1:2], torch.tensor(table), rtol=1e-6, atol=0)
        torch.testing.assert_close(finer[1:-1:2], torch.tensor([math.sqrt(a * b) for a, b in zip(table, table[1:])]),
                                   rtol=1e-6, atol=0)


def test_lcm_schedule_is_every_kth_distilled_timestep(sd_schedule):
    sigmas = samplers.get_sigmas_lcm(4, sd_schedule)
    assert sd_schedule.sigma_to_t(sigmas[:-1]).long().tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match='1..50 steps'):
        samplers.get_sigmas_lcm(51, sd_schedule)


# ----------------------------------------------------------------------------------------------------------------------
# Restart
# ----------------------------------------------------------------------------------------------------------------------

def test_restart_without_restarts_is_heun():
    problem = GaussianProblem()
    sigmas = samplers.get_sigmas_karras(12, 0.0292, 14.6146)
    x = problem.start(14.6146)
    reference = k_sampling.sample_heun(problem.denoiser, x, sigmas, disable=True)
    ours = samplers.sample_restart(problem.denoiser, x, sigmas, disable=True, restart_list={})
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.parametrize('steps,restart_steps,times', [(20, 9, 1), (40, 10, 2)])
def test_restart_default_follows_a1111s_rule_and_keeps_the_step_count(steps, restart_steps, times):
    """A1111: for 20+ steps, a Karras schedule with restart_steps * times fewer steps; on reaching the level nearest
    0.1, jump up to the level nearest 2 and descend through restart_steps + 1 Karras levels, `times` times."""
    problem = GaussianProblem()
    sigmas = samplers.get_sigmas_karras(steps, 0.0292, 14.6146)
    visited = []
    samplers.sample_restart(problem.denoiser, problem.start(14.6146), sigmas, disable=True,
                            callback=lambda info: visited.append(info['sigma']))
    main = samplers.get_sigmas_karras(steps - restart_steps * times, float(sigmas[-2]), float(sigmas[0])).tolist()
    restart_at = min(range(len(main)), key=lambda k: abs(main[k] - 0.1))
    restart_to = min(range(len(main)), key=lambda k: abs(main[k] - 2.0))
    descent = samplers.get_sigmas_karras(restart_steps + 1, main[restart_at], main[restart_to])[:-2].tolist()
    expected = main[:restart_at] + descent * times + main[restart_at:-1]
    assert len(visited) == steps and problem.calls == 2 * steps - 1  # Heun steps; the last one, to 0, is Euler
    torch.testing.assert_close(torch.tensor(visited), torch.tensor(expected), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------------

class RecordingDenoiser:
    """D(x, sigma, context, y=None) = 0.5 x + context (+ y), recording the batch size of every call."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, context, y=None):
        self.batch_sizes.append(x.shape[0])
        out = 0.5 * x + context.mean(dim=1).reshape(x.shape[0], 1, 1, -1)[..., :x.shape[-1]]
        return out if y is None else out + y.reshape(-1, 1, 1, 1)


def test_cfg_makes_one_batched_call_and_combines_cond_and_uncond():
    model = RecordingDenoiser()
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([3.0, 3.0])
    cond, uncond = torch.randn(2, 77, 4), torch.randn(2, 77, 4)
    out = samplers.CFGDenoiser(model)(x, sigma, cond, uncond, cond_scale=7.0)
    assert model.batch_sizes == [4]
    expected = model(x, sigma, uncond) + 7.0 * (model(x, sigma, cond) - model(x, sigma, uncond))
    torch.testing.assert_close(out, expected)


def test_cfg_batches_dict_conditionings_key_by_key():
    model = RecordingDenoiser()
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([3.0, 3.0])
    cond = {'context': torch.randn(2, 77, 4), 'y': torch.randn(2)}
    uncond = {'context': torch.randn(2, 77, 4), 'y': torch.randn(2)}
    out = samplers.CFGDenoiser(model)(x, sigma, cond, uncond, cond_scale=5.0)
    assert model.batch_sizes == [4]
    expected = model(x, sigma, **uncond) + 5.0 * (model(x, sigma, **cond) - model(x, sigma, **uncond))
    torch.testing.assert_close(out, expected)


def test_cfg_with_different_prompt_lengths_falls_back_to_two_calls():
    model = RecordingDenoiser()
    x, sigma = torch.randn(1, 3, 4, 4), torch.tensor([3.0])
    cond, uncond = torch.randn(1, 154, 4), torch.randn(1, 77, 4)
    out = samplers.CFGDenoiser(model)(x, sigma, cond, uncond, cond_scale=2.0)
    assert model.batch_sizes == [1, 1]
    torch.testing.assert_close(out, model(x, sigma, uncond) + 2.0 * (model(x, sigma, cond) - model(x, sigma, uncond)))


def test_cfg_scale_one_skips_the_unconditional_pass():
    model = RecordingDenoiser()
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([3.0, 3.0])
    cond = torch.randn(2, 77, 4)
    out = samplers.CFGDenoiser(model)(x, sigma, cond, None, cond_scale=1.0, guidance_rescale=0.7)
    assert model.batch_sizes == [2]
    torch.testing.assert_close(out, model(x, sigma, cond))


def test_prompt_schedule_switches_conditioning_at_the_edit_step_for_every_evaluation():
    """[a:b:3] with 8 steps: a for steps 0..3, b after, including Heun's and DPM2's extra evaluations."""
    sigmas = samplers.get_sigmas_karras(8, 0.0292, 14.6146)
    cond_a, cond_b = torch.zeros(1, 77, 4), torch.ones(1, 77, 4)
    cond_at = samplers.prompt_schedule([(3, cond_a), (8, cond_b)], sigmas)
    levels = sigmas.tolist()
    for step in range(8):
        expected = cond_a if step <= 3 else cond_b
        inside = math.sqrt(levels[step] * levels[step + 1]) if levels[step + 1] > 0 else levels[step] / 2
        for sigma in (levels[step], levels[step] * (1 - 1e-7), inside):  # step start, round-off, a mid-step level
            assert cond_at(torch.tensor([sigma])) is expected

    seen = []

    def model(x, sigma, context):
        seen.append((float(sigma[0]), float(context.mean())))
        return x * 0

    samplers.sample_dpm_2(samplers.CFGDenoiser(model), torch.zeros(1, 1, 2, 2), sigmas, disable=True,
                          extra_args={'cond': cond_at, 'uncond': cond_at, 'cond_scale': 1.0})
    for sigma, used in seen:
        step = sum(1 for s in levels[1:] if s >= sigma)
        assert used == (0.0 if step <= 3 else 1.0)
