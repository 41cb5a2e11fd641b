"""Diffusion samplers as plain functions (k-diffusion style), the A1111 sampler and schedule-type tables, discrete-model
and classifier-free-guidance wrappers, and img2img / inpainting maths. Depends on torch and tqdm only.

    from samplers import DiscreteEpsDenoiser, CFGDenoiser, get_sigmas, sample
    denoiser = DiscreteEpsDenoiser(unet, model.alphas_cumprod)   # unet(x_t, t, context=...) -> eps; ᾱ [1000] as data
    sigmas = get_sigmas('DPM++ 2M', 'Karras', 20, denoiser)                  # [21], ending in 0
    x = sample('DPM++ 2M', CFGDenoiser(denoiser), noise * sigmas[0], sigmas,
               extra_args={'cond': c, 'uncond': uc, 'cond_scale': 7.0})

A sampler of your own is any function with the signature of samplers.sampling.sample_euler; register_sampler() makes
it a name that generation parameters, infotexts and the web UI accept. model_denoiser(model) is D(x, sigma) for a
loaded ldm model.
"""

from .img2img import (InpaintingDenoiser, apply_mask, blur_mask, img2img_sigmas, img2img_steps, initial_latent,
                      latent_mask)
from .noise import (BrownianTree, BrownianTreeNoiseSampler, default_noise_sampler, mix_seed,
                    seeded_noise_sampler)
from .sampling import (get_ancestral_step, linear_multistep_coeff, sample_ddim, sample_dpm_2, sample_dpm_2_ancestral,
                       sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                       sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_euler,
                       sample_euler_ancestral, sample_heun, sample_lcm, sample_lms, sample_plms, sample_restart,
                       sample_unipc, to_d)
from .schedules import (ALIGN_YOUR_STEPS_SD15, ALIGN_YOUR_STEPS_SDXL, append_zero, get_sigmas_align_your_steps,
                        get_sigmas_beta, get_sigmas_ddim_uniform, get_sigmas_exponential, get_sigmas_karras,
                        get_sigmas_kl_optimal, get_sigmas_lcm, get_sigmas_normal, get_sigmas_polyexponential,
                        get_sigmas_sgm_uniform, get_sigmas_simple, get_sigmas_uniform, get_sigmas_vp)
from .tables import (SAMPLERS, SCHEDULERS, SamplerInfo, get_scheduler, get_sigmas, register_sampler,
                     register_scheduler, resolve_sampler, sample, unregister_sampler, unregister_scheduler)
from .wrappers import (CFGDenoiser, DiscreteEpsDenoiser, DiscreteSchedule, DiscreteVDenoiser, GuidanceIntervalDenoiser,
                       LCMDenoiser, guidance_interval, model_denoiser, prompt_schedule, rescale_zero_terminal_snr)
