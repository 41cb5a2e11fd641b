"""python -m benchmarks.sampler_overhead — per-step overhead of every sampler against its reference implementation,
measured in the same run.

    python -m benchmarks.sampler_overhead [--steps 30] [--shape 1,4,8,8] [--repeats 7] [--threads 1]

With a trivial model (one multiply) on a small tensor, the time per step is the sampler's own overhead: Python,
scalar maths and tensor-op dispatch. References: k-diffusion's sampling.py (loaded from its file by
tests/sampler_oracles.py, as the tests do: its package __init__ needs torchvision), and diffusers' schedulers for DDIM,
PLMS, UniPC and LCM, which k-diffusion lacks (there our side includes the DiscreteEpsDenoiser wrapper that turns their
eps model into a denoiser). Both optional test dependencies; a reference that cannot be imported shows as "n/a". Ratio =
ours / reference: below 1 is faster. Each entry is the best of --repeats runs.
"""

import argparse
import sys
import time
import warnings

import torch

from benchmarks import common
from samplers import sampling, schedules, wrappers
from samplers.noise import BrownianTreeNoiseSampler


def best_time(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def trivial_denoiser(x, sigma):
    return x * 0.9


def trivial_eps_model(x, t):
    return x * 0.1


def k_diffusion_rows(k_sampling, x, sigmas, steps):
    """(label, run ours, run reference, model calls) for the samplers both libraries have."""
    def fresh_noise(sigma, sigma_next):
        return torch.randn_like(x)

    def pair(name, **options):
        ours, theirs = getattr(sampling, name), getattr(k_sampling, name)
        return (lambda: ours(trivial_denoiser, x, sigmas, disable=True, **options),
                lambda: theirs(trivial_denoiser, x, sigmas, disable=True, **options))

    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    rows = [
        ('Euler', *pair('sample_euler'), steps),
        ('Euler a', *pair('sample_euler_ancestral', noise_sampler=fresh_noise), steps),
        ('Heun', *pair('sample_heun'), 2 * steps - 1),
        ('DPM2', *pair('sample_dpm_2'), 2 * steps - 1),
        ('DPM2 a', *pair('sample_dpm_2_ancestral', noise_sampler=fresh_noise), 2 * steps - 1),
        ('LMS', *pair('sample_lms'), steps),
        ('DPM++ 2S a', *pair('sample_dpmpp_2s_ancestral', noise_sampler=fresh_noise), 2 * steps - 1),
        ('DPM++ 2M', *pair('sample_dpmpp_2m'), steps),
        ('DPM++ SDE (randn noise)', *pair('sample_dpmpp_sde', noise_sampler=fresh_noise), 2 * steps - 1),
        ('DPM++ 2M SDE (randn noise)', *pair('sample_dpmpp_2m_sde', noise_sampler=fresh_noise), steps),
        ('DPM++ 2M SDE Heun (randn noise)', *pair('sample_dpmpp_2m_sde', noise_sampler=fresh_noise,
                                                  solver_type='heun'), steps),
        ('DPM++ 3M SDE (randn noise)', *pair('sample_dpmpp_3m_sde', noise_sampler=fresh_noise), steps),
        ('DPM fast', lambda: sampling.sample_dpm_fast(trivial_denoiser, x, sigma_min, sigma_max, steps, disable=True),
         lambda: k_sampling.sample_dpm_fast(trivial_denoiser, x, sigma_min, sigma_max, steps, disable=True), steps),
    ]
    # Brownian-tree noise: one query per step, as an SDE sampler makes (tree built per run, as the samplers do).
    levels = sigmas[:-1].tolist()

    def brownian(sampler_class):
        noise = sampler_class(x, sigma_min, sigma_max, seed=0)
        for sigma, sigma_next in zip(levels, levels[1:]):
            noise(torch.tensor(sigma), torch.tensor(sigma_next))

    # torchsde warns when a float32 query rounds a hair past the tree's float64 end; the values are unaffected.
    warnings.filterwarnings('ignore', message='Should have tb<=t1')
    rows.append(('BrownianTreeNoiseSampler (per step)', lambda: brownian(BrownianTreeNoiseSampler),
                 lambda: brownian(k_sampling.BrownianTreeNoiseSampler), steps))
    return rows


def diffusers_rows(x, steps):
    """(label, run ours, run reference, model calls) for the timestep samplers, against diffusers' scheduler loops."""
    from diffusers import DDIMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler

    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
    compvis = dict(num_train_timesteps=1000, trained_betas=betas, timestep_spacing='leading', steps_offset=1)
    # ᾱ from the same betas the schedulers get (samplers take the schedule as data; the formula lives in ldm).
    denoiser = wrappers.DiscreteEpsDenoiser(trivial_eps_model, torch.cumprod(1 - torch.from_numpy(betas), dim=0))

    def diffusers_loop(make_scheduler, n):
        def run():
            scheduler = make_scheduler()
            scheduler.set_timesteps(n)
            sample = x
            for t in scheduler.timesteps:
                sample = scheduler.step(trivial_eps_model(sample, t), t, sample).prev_sample
        return run

    def ours(sampler, sigmas, **options):
        return lambda: sampler(denoiser, x, sigmas, disable=True, **options)

    ddim_sigmas = schedules.get_sigmas_ddim_uniform(steps, denoiser)
    lcm_steps = min(steps, 50)
    return [
        ('DDIM', ours(sampling.sample_ddim, ddim_sigmas),
         diffusers_loop(lambda: DDIMScheduler(**compvis, set_alpha_to_one=False), steps), steps),
        ('PLMS', ours(sampling.sample_plms, ddim_sigmas),
         diffusers_loop(lambda: PNDMScheduler(**compvis, skip_prk_steps=True, set_alpha_to_one=False), steps),
         steps + 1),
        ('UniPC (bh2, order 2)', ours(sampling.sample_unipc, ddim_sigmas, order=2, variant='bh2'),
         diffusers_loop(lambda: UniPCMultistepScheduler(**compvis, solver_order=2, solver_type='bh2'), steps), steps),
        ('LCM', ours(sampling.sample_lcm, schedules.get_sigmas_lcm(lcm_steps, denoiser)),
         diffusers_loop(lambda: LCMScheduler(**compvis), lcm_steps), lcm_steps),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.sampler_overhead',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=30, help='sampling steps per run (default 30)')
    parser.add_argument('--shape', default='1,4,8,8', help='sample shape B,C,H,W (default 1,4,8,8)')
    parser.add_argument('--repeats', type=int, default=7, help='runs per measurement; the best is kept (default 7)')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(size) for size in args.shape.split(','))
    except ValueError:
        parser.error(f'--shape must be comma-separated integers such as 1,4,8,8, got {args.shape!r}')
    if args.steps < 2 or args.repeats < 1 or args.threads < 1:
        parser.error('--steps must be at least 2, --repeats and --threads at least 1')

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(shape) * 14.6
    sigmas = schedules.get_sigmas_karras(args.steps, 0.0292, 14.6146)

    rows = []
    try:
        common.use_test_oracles()
        from sampler_oracles import k_sampling
        rows += [(label, ours, reference, calls, 'k-diffusion')
                 for label, ours, reference, calls in k_diffusion_rows(k_sampling, x, sigmas, args.steps)]
    except ImportError as error:
        print(f'k-diffusion reference unavailable: {error}', file=sys.stderr)
    try:
        rows += [(label, ours, reference, calls, 'diffusers')
                 for label, ours, reference, calls in diffusers_rows(x, args.steps)]
    except ImportError as error:
        print(f'diffusers reference unavailable: {error}', file=sys.stderr)
    rows.append(('Restart', lambda: sampling.sample_restart(trivial_denoiser, x, sigmas, disable=True), None,
                 2 * args.steps - 1, '-'))

    print(f'per-step time, trivial model, x {tuple(shape)}, {args.steps} steps, {args.threads} thread(s), '
          f'best of {args.repeats}')
    print(f'{"sampler":36s} {"ours ms":>9s} {"ref ms":>9s} {"ratio":>7s}  reference')
    for label, ours, reference, calls, reference_name in rows:
        ours_ms = best_time(ours, args.repeats) / args.steps * 1e3
        if reference is None:
            print(f'{label:36s} {ours_ms:9.3f} {"n/a":>9s} {"n/a":>7s}  {reference_name}')
            continue
        reference_ms = best_time(reference, args.repeats) / args.steps * 1e3
        print(f'{label:36s} {ours_ms:9.3f} {reference_ms:9.3f} {ours_ms / reference_ms:7.2f}  {reference_name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
