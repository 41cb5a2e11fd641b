"""samplers vs diffusers' timestep schedulers (DDIM, PNDM-as-PLMS, UniPC, LCM) configured like CompVis, plus the
zero-terminal-SNR rescale and guidance rescale against diffusers' own functions.

Mapping from diffusers' timestep loop to our sigma-space samplers. diffusers keeps x_vp = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps and calls an eps model at integer timesteps t_k; we keep x = x_vp / sqrt(abar_t) at
sigma_k = sqrt((1 - abar_tk) / abar_tk) and call DiscreteEpsDenoiser(eps_model) (quantised, so it feeds the model the
same integer t_k). So: sigmas = [sigma(t_0), ..., sigma(t_{n-1}), sigma_final], x_start = x_vp,T / sqrt(abar_t0), and
diffusers' result = ours * sqrt(abar_final). diffusers' last step goes to "final_alpha_cumprod": 1 with
set_alpha_to_one=True (sigma_final = 0, our schedules' final 0) or abar_0 with set_alpha_to_one=False, the CompVis
setting (sigma_final = sigma(t=0) ~ 0.029, so we replace the final 0 by it).

Tolerance: |ours - diffusers| <= 1e-5 |diffusers| + 1e-6 max|x_start|, i.e. float32 round-off (see test_samplers.py).
"""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale_zero_terminal_snr

import samplers
from ldm.schedule import scaled_linear_alphas_cumprod
from sampler_oracles import GaussianProblem, NoiseQueue

# CompVis / A1111 configuration of the diffusers schedulers: SD's "scaled linear" betas (given in float64, as CompVis
# computes them), leading timestep spacing with offset 1.
SD_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
COMPVIS = dict(num_train_timesteps=1000, trained_betas=SD_BETAS.numpy(), timestep_spacing='leading', steps_offset=1)


def eps_model_for(problem, alphas_cumprod):
    """The eps-prediction model (x_vp, t) -> eps whose denoiser is the problem's exact Gaussian D."""
    def eps_model(x_vp, t):
        abar = alphas_cumprod[t.long()].reshape(-1, *[1] * (x_vp.ndim - 1)).to(x_vp.dtype)
        sigma = ((1 - abar) / abar).sqrt()
        x = x_vp / abar.sqrt()
        return (x - problem.denoiser(x, sigma.flatten())) / sigma
    return eps_model


def run_diffusers(scheduler, eps_model, x_vp, **step_kwargs):
    x = x_vp.clone()
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {key: (value(i) if callable(value) else value) for key, value in step_kwargs.items()}
        x = scheduler.step(eps_model(x, t.expand(x.shape[0])), t, x, **kwargs).prev_sample
    return x


def compvis_final_sigma(denoiser, sigmas, set_alpha_to_one):
    """Our schedule with its final level as diffusers' last step has it, and the matching output scale."""
    if set_alpha_to_one:
        return sigmas, 1.0
    return torch.cat([sigmas[:-1], denoiser.sigmas[:1]]), float(1 / (1 + denoiser.sigmas[0] ** 2)) ** 0.5


def assert_fp32_parity(ours, reference, x_start):
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * float(x_start.abs().max()))


@pytest.fixture
def problem():
    return GaussianProblem()


@pytest.fixture
def x_vp(problem):
    return torch.randn(problem.shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize('steps', [10, 25, 50])
@pytest.mark.parametrize('set_alpha_to_one', [False, True])
@pytest.mark.parametrize('eta', [0.0, 0.7])
def test_ddim_matches_diffusers_ddim_scheduler(problem, x_vp, steps, set_alpha_to_one, eta):
    scheduler = DDIMScheduler(**COMPVIS, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    scheduler.set_timesteps(steps)
    eps_model = eps_model_for(problem, scheduler.alphas_cumprod)
    denoiser = samplers.DiscreteEpsDenoiser(eps_model, scheduler.alphas_cumprod)
    ddim_sigmas = samplers.get_sigmas_ddim_uniform(steps, denoiser)
    # Our DDIM schedule is diffusers' "leading" timesteps with steps_offset 1.
    assert torch.equal(denoiser.sigma_to_t(ddim_sigmas[:-1]).long(), scheduler.timesteps)
    sigmas, output_scale = compvis_final_sigma(denoiser, ddim_sigmas, set_alpha_to_one)
    reference_noise, our_noise = NoiseQueue(x_vp.shape), NoiseQueue(x_vp.shape)
    # diffusers adds std_dev_t * z in x_vp; we add sigma_up * z in x = x_vp / sqrt(abar_prev): the same z.
    reference = run_diffusers(scheduler, eps_model, x_vp, eta=eta,
                              variance_noise=(lambda i: reference_noise.noise[i]) if eta else None)
    x_start = x_vp * (1 + sigmas[0] ** 2) ** 0.5
    ours = samplers.sample_ddim(denoiser, x_start, sigmas, eta=eta, noise_sampler=our_noise, disable=True)
    assert_fp32_parity(ours * output_scale, reference, x_start)


def test_ddim_schedule_keeps_compvis_step_count_when_steps_do_not_divide_1000():
    """CompVis and A1111 space DDIM timesteps by 1000 // n from 1, so 30 steps give 31 timesteps (diffusers' leading
    spacing gives 30, stopping at 958); we follow CompVis."""
    denoiser = samplers.DiscreteEpsDenoiser(None, scaled_linear_alphas_cumprod())
    sigmas = samplers.get_sigmas_ddim_uniform(30, denoiser)
    assert denoiser.sigma_to_t(sigmas[:-1]).long().tolist() == list(range(1, 1000, 33))[::-1]


@pytest.mark.parametrize('steps', [10, 20])
@pytest.mark.parametrize('set_alpha_to_one', [False, True])
def test_plms_matches_diffusers_pndm_without_runge_kutta_steps(problem, x_vp, steps, set_alpha_to_one):
    """PNDMScheduler(skip_prk_steps=True) is CompVis' PLMS: a Heun first step, then Adams-Bashforth 2, 3, 4."""
    scheduler = PNDMScheduler(**COMPVIS, skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(steps)
    eps_model = eps_model_for(problem, scheduler.alphas_cumprod)
    denoiser = samplers.DiscreteEpsDenoiser(eps_model, scheduler.alphas_cumprod)
    sigmas, output_scale = compvis_final_sigma(denoiser, samplers.get_sigmas_ddim_uniform(steps, denoiser),
                                               set_alpha_to_one)
    reference = run_diffusers(scheduler, eps_model, x_vp)
    problem.calls = 0
    x_start = x_vp * (1 + sigmas[0] ** 2) ** 0.5
    ours = samplers.sample_plms(denoiser, x_start, sigmas, disable=True)
    assert problem.calls == len(scheduler.timesteps) == steps + 1
    assert_fp32_parity(ours * output_scale, reference, x_start)


UNIPC_CASES = [(steps, order, variant, final) for steps in (5, 10, 20) for order in (1, 2, 3)
               for variant in ('bh1', 'bh2') for final in ('zero', 'sigma_min')
               if not (variant == 'bh1' and final == 'zero')]  # diffusers returns NaN there: B(h) = -h is infinite


@pytest.mark.parametrize('steps,order,variant,final', UNIPC_CASES)
def test_unipc_matches_diffusers_unipc_scheduler(problem, x_vp, steps, order, variant, final):
    scheduler = UniPCMultistepScheduler(**COMPVIS, solver_order=order, solver_type=variant, final_sigmas_type=final,
                                        lower_order_final=True)
    scheduler.set_timesteps(steps)
    eps_model = eps_model_for(problem, scheduler.alphas_cumprod)
    denoiser = samplers.DiscreteEpsDenoiser(eps_model, scheduler.alphas_cumprod)
    final_sigma = 0.0 if final == 'zero' else float(denoiser.sigmas[0])
    sigmas = torch.cat([denoiser.sigmas[scheduler.timesteps], torch.tensor([final_sigma])])
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1e-6, atol=0)
    reference = run_diffusers(scheduler, eps_model, x_vp)
    x_start = x_vp * (1 + sigmas[0] ** 2) ** 0.5
    ours = samplers.sample_unipc(denoiser, x_start, sigmas, order=order, variant=variant, disable=True)
    assert_fp32_parity(ours / (1 + final_sigma ** 2) ** 0.5, reference, x_start)


def test_unipc_bh1_ends_on_the_denoised_sample_where_the_final_level_is_zero(problem, x_vp):
    sigmas = samplers.get_sigmas_karras(6, 0.0292, 14.6146)
    last = []
    ours = samplers.sample_unipc(problem.denoiser, x_vp * 14.6146, sigmas, variant='bh1', disable=True,
                                 callback=last.append)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, last[-1]['denoised'])


@pytest.mark.parametrize('steps', [1, 2, 4, 8])
def test_lcm_matches_diffusers_lcm_scheduler(problem, x_vp, steps):
    scheduler = LCMScheduler(**COMPVIS)
    scheduler.set_timesteps(steps)
    eps_model = eps_model_for(problem, scheduler.alphas_cumprod)
    denoiser = samplers.LCMDenoiser(samplers.DiscreteEpsDenoiser(eps_model, scheduler.alphas_cumprod))
    sigmas = samplers.get_sigmas_lcm(steps, denoiser)
    assert torch.equal(denoiser.sigma_to_t(sigmas[:-1]).long(), scheduler.timesteps)
    reference = run_diffusers(scheduler, eps_model, x_vp, generator=torch.Generator().manual_seed(11))
    x_start = x_vp * (1 + sigmas[0] ** 2) ** 0.5
    # diffusers draws its re-noising noise from the generator inside step(); ours asks the noise sampler in the
    # same order, one draw per step but the last.
    noise = samplers.default_noise_sampler(x_start, generator=torch.Generator().manual_seed(11))
    ours = samplers.sample_lcm(denoiser, x_start, sigmas, noise_sampler=noise, disable=True)
    assert_fp32_parity(ours, reference, x_start)


def test_zero_terminal_snr_rescale_matches_diffusers():
    reference = torch.cumprod(1 - diffusers_rescale_zero_terminal_snr(SD_BETAS), dim=0)
    ours = samplers.rescale_zero_terminal_snr(scaled_linear_alphas_cumprod())
    torch.testing.assert_close(ours[:-1], reference[:-1], rtol=1e-9, atol=1e-12)
    assert float(reference[-1]) == 0.0  # exact zero SNR, infinite sigma: we keep A1111's finite stand-in instead
    assert float(ours[-1]) == samplers.wrappers.ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD
    denoiser = samplers.DiscreteEpsDenoiser(None, ours)
    assert 4000 < float(denoiser.sigma_max) < 5000 and torch.isfinite(denoiser.sigmas).all()


@pytest.mark.parametrize('phi', [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers_on_the_noise_prediction(phi):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator) * 3
    sigma = torch.tensor([2.5, 2.5])
    cond, uncond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    def denoiser(x, sigma, context):  # any denoiser will do
        return x * 0.1 + context

    ours = samplers.CFGDenoiser(denoiser)(x, sigma, cond, uncond, cond_scale=7.5, guidance_rescale=phi)
    eps_cond = (x - denoiser(x, sigma, cond)) / 2.5
    eps_uncond = (x - denoiser(x, sigma, uncond)) / 2.5
    eps_cfg = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    reference = x - 2.5 * rescale_noise_cfg(eps_cfg, eps_cond, guidance_rescale=phi)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
