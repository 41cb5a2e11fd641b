"""The A1111 sampler and schedule-type names, mapped to the functions of this package, and the registry through which
user code adds its own.

SAMPLERS[name] is a SamplerInfo: the function (always called as fn(model, x, sigmas, extra_args, callback, disable,
**options)), the options A1111 passes by default, and what "Automatic" means for its schedule. SCHEDULERS[name] is
fn(n, denoiser, is_sdxl=False) -> sigmas [n + 1]. get_sigmas() and sample() put the two together.

register_sampler() / register_scheduler() add to these tables and unregister_sampler() / unregister_scheduler()
remove what was added, so everything that lists or resolves names (GenerationParams, infotexts, the web UI) sees
user samplers as it sees A1111's:

    def sample_my_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        ...   # the loop of samplers.sampling.sample_euler, changed
    register_sampler('My Euler', sample_my_euler, schedule='Karras')
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import schedules
from .noise import BrownianTreeNoiseSampler, mix_seed, seeded_noise_sampler
from .sampling import (sample_ddim, sample_dpm_2, sample_dpm_2_ancestral, sample_dpm_adaptive, sample_dpm_fast,
                       sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde,
                       sample_dpmpp_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_lcm, sample_lms,
                       sample_plms, sample_restart, sample_unipc)


def _model_range(denoiser):
    return float(denoiser.sigma_min), float(denoiser.sigma_max)


# Schedule types; the parameters of Karras (rho 7), Polyexponential (rho 1) and Beta (alpha = beta = 0.6) are A1111's
# defaults. "Automatic" on its own is the model's uniform schedule; get_sigmas() replaces it by the sampler's default.
SCHEDULERS = {
    'Automatic': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_uniform(n, denoiser),
    'Uniform': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_uniform(n, denoiser),
    'Karras': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_karras(n, *_model_range(denoiser)),
    'Exponential': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_exponential(n, *_model_range(denoiser)),
    'Polyexponential': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_polyexponential(
        n, *_model_range(denoiser)),
    'SGM Uniform': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_sgm_uniform(n, denoiser),
    'KL Optimal': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_kl_optimal(n, *_model_range(denoiser)),
    'Align Your Steps': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_align_your_steps(n, is_sdxl),
    'Simple': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_simple(n, denoiser),
    'Normal': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_normal(n, denoiser),
    'DDIM': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_ddim_uniform(n, denoiser),
    'Beta': lambda n, denoiser, is_sdxl=False: schedules.get_sigmas_beta(n, *_model_range(denoiser)),
}


def _positive_range(sigmas):
    positive = sigmas[sigmas > 0]
    return positive.min(), positive.max()


def _dpm_fast_on_schedule(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM fast over the schedule's range with one model evaluation per step (as A1111 runs it)."""
    sigma_min, sigma_max = _positive_range(sigmas)
    return sample_dpm_fast(model, x, sigma_min, sigma_max, len(sigmas) - 1, extra_args, callback, disable, **options)


def _dpm_adaptive_on_schedule(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM adaptive over the schedule's range; the step count is its own (only the range of sigmas is used)."""
    sigma_min, sigma_max = _positive_range(sigmas)
    return sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args, callback, disable, **options)


@dataclass(frozen=True)
class SamplerInfo:
    """One A1111 sampler.

    function: fn(model, x, sigmas, extra_args, callback, disable, **options).
    options: keyword arguments A1111 passes by default (its ancestral eta is 1, its DDIM eta 0).
    automatic_schedule: SCHEDULERS-style function used when the schedule type is "Automatic".
    discard_penultimate_sigma: sample n + 1 levels and drop the last nonzero one (A1111 does this for DPM2 and
        DPM++ 3M SDE, whose last step would otherwise be wasted on a tiny interval).
    noise: 'none' (deterministic), 'rng' (fresh Gaussian noise per step) or 'brownian' (Brownian-tree noise).
    aliases: other names that resolve to this sampler (A1111's API accepts k-diffusion's, e.g. 'k_euler_a').
    """
    name: str
    function: Callable
    options: dict = field(default_factory=dict)
    automatic_schedule: Callable = SCHEDULERS['Automatic']
    discard_penultimate_sigma: bool = False
    noise: str = 'none'
    aliases: tuple[str, ...] = ()


def _lcm_schedule(n, denoiser, is_sdxl=False):
    return schedules.get_sigmas_lcm(n, denoiser)


# The aliases are the k-diffusion function names A1111's API still accepts.
_SAMPLER_LIST = [
    SamplerInfo('Euler a', sample_euler_ancestral, {'eta': 1.0}, noise='rng',
                aliases=('k_euler_a', 'k_euler_ancestral')),
    SamplerInfo('Euler', sample_euler, aliases=('k_euler',)),
    SamplerInfo('LMS', sample_lms, aliases=('k_lms',)),
    SamplerInfo('Heun', sample_heun, aliases=('k_heun',)),
    SamplerInfo('DPM2', sample_dpm_2, automatic_schedule=SCHEDULERS['Karras'], discard_penultimate_sigma=True,
                aliases=('k_dpm_2',)),
    SamplerInfo('DPM2 a', sample_dpm_2_ancestral, {'eta': 1.0}, automatic_schedule=SCHEDULERS['Karras'],
                discard_penultimate_sigma=True, noise='rng', aliases=('k_dpm_2_a',)),
    SamplerInfo('DPM++ 2S a', sample_dpmpp_2s_ancestral, {'eta': 1.0}, automatic_schedule=SCHEDULERS['Karras'],
                noise='rng', aliases=('k_dpmpp_2s_a',)),
    SamplerInfo('DPM++ 2M', sample_dpmpp_2m, automatic_schedule=SCHEDULERS['Karras'], aliases=('k_dpmpp_2m',)),
    SamplerInfo('DPM++ SDE', sample_dpmpp_sde, {'eta': 1.0}, automatic_schedule=SCHEDULERS['Karras'],
                noise='brownian', aliases=('k_dpmpp_sde',)),
    SamplerInfo('DPM++ 2M SDE', sample_dpmpp_2m_sde, {'eta': 1.0, 'solver_type': 'midpoint'},
                automatic_schedule=SCHEDULERS['Exponential'], noise='brownian', aliases=('k_dpmpp_2m_sde',)),
    SamplerInfo('DPM++ 2M SDE Heun', sample_dpmpp_2m_sde, {'eta': 1.0, 'solver_type': 'heun'},
                automatic_schedule=SCHEDULERS['Exponential'], noise='brownian', aliases=('k_dpmpp_2m_sde_heun',)),
    SamplerInfo('DPM++ 3M SDE', sample_dpmpp_3m_sde, {'eta': 1.0}, automatic_schedule=SCHEDULERS['Exponential'],
                discard_penultimate_sigma=True, noise='brownian', aliases=('k_dpmpp_3m_sde',)),
    SamplerInfo('DPM fast', _dpm_fast_on_schedule, {'eta': 1.0}, noise='rng', aliases=('k_dpm_fast',)),
    SamplerInfo('DPM adaptive', _dpm_adaptive_on_schedule, {'eta': 1.0}, noise='rng', aliases=('k_dpm_ad',)),
    SamplerInfo('Restart', sample_restart, automatic_schedule=SCHEDULERS['Karras'], noise='rng',
                aliases=('restart',)),
    SamplerInfo('DDIM', sample_ddim, {'eta': 0.0}, automatic_schedule=SCHEDULERS['DDIM'], noise='rng',
                aliases=('ddim',)),
    SamplerInfo('PLMS', sample_plms, automatic_schedule=SCHEDULERS['DDIM'], aliases=('plms',)),
    # A1111 runs UniPC on timesteps evenly spaced from 999 to 0, which SGM Uniform reproduces up to the last step.
    SamplerInfo('UniPC', sample_unipc, {'order': 3, 'variant': 'bh1', 'lower_order_final': True},
                automatic_schedule=SCHEDULERS['SGM Uniform'], aliases=('unipc',)),
    SamplerInfo('LCM', sample_lcm, automatic_schedule=_lcm_schedule, noise='rng', aliases=('k_lcm',)),
]
SAMPLERS = {info.name: info for info in _SAMPLER_LIST}
# What ships with the package: registering cannot replace these, unregistering cannot remove them.
_BUILTIN_SAMPLERS = frozenset(SAMPLERS)
_BUILTIN_SCHEDULERS = frozenset(SCHEDULERS)
NOISE_KINDS = ('none', 'rng', 'brownian')


def _sampler_by_name(name):
    """The SamplerInfo whose name or alias is `name`, or None."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    return next((info for info in SAMPLERS.values() if name in info.aliases), None)


def register_sampler(name, function, *, schedule='Automatic', noise='none', options=None, aliases=(),
                     discard_penultimate_sigma=False):
    """Make `function` available as the sampler `name` everywhere a sampler name is accepted; returns its SamplerInfo.

    function: fn(model, x, sigmas, extra_args, callback, disable, **options) -> x, like samplers.sampling.sample_euler
        (call callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'}) once per step so progress and previews work).
    schedule: the schedule used when the schedule type is "Automatic": a SCHEDULERS name or fn(n, denoiser,
        is_sdxl=False) -> sigmas [n + 1].
    noise: 'none' for a deterministic sampler; 'rng' or 'brownian' if it takes a noise_sampler(sigma, sigma_next)
        option, which sample() then derives from each image's seed so that an infotext reproduces the image.
    options: default keyword arguments for function. aliases: other accepted names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a sampler name must be a non-empty string, got {name!r}")
    if not callable(function):
        raise TypeError(f"sampler {name!r}: function must be callable, got {type(function).__name__}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"sampler {name!r}: noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}")
    for taken in (name, *aliases):
        if _sampler_by_name(taken) is not None:
            raise ValueError(f"the sampler name {taken!r} is already registered; unregister_sampler({taken!r}) "
                             "first or choose another name")
    if isinstance(schedule, str):
        schedule = get_scheduler(schedule)
    elif not callable(schedule):
        raise TypeError(f"sampler {name!r}: schedule must be a SCHEDULERS name or a function, got {schedule!r}")
    info = SamplerInfo(name, function, dict(options or {}), schedule, discard_penultimate_sigma, noise,
                       tuple(aliases))
    SAMPLERS[name] = info
    return info


def unregister_sampler(name):
    """Remove a sampler added by register_sampler (by its name)."""
    if name in _BUILTIN_SAMPLERS:
        raise ValueError(f"{name!r} is one of A1111's samplers and cannot be unregistered")
    if name not in SAMPLERS:
        raise ValueError(f"no sampler named {name!r} is registered; registered: "
                         f"{', '.join(sorted(set(SAMPLERS) - _BUILTIN_SAMPLERS)) or 'none'}")
    del SAMPLERS[name]


def register_scheduler(name, function):
    """Make `function` available as the schedule type `name`: fn(n, denoiser, is_sdxl=False) -> sigmas [n + 1],
    descending and ending in 0 (denoiser.sigma_min / sigma_max / sigmas give the model's range)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a schedule type name must be a non-empty string, got {name!r}")
    if not callable(function):
        raise TypeError(f"schedule type {name!r}: function must be callable, got {type(function).__name__}")
    if name in SCHEDULERS:
        raise ValueError(f"the schedule type {name!r} is already registered; unregister_scheduler({name!r}) first "
                         "or choose another name")
    SCHEDULERS[name] = function


def unregister_scheduler(name):
    """Remove a schedule type added by register_scheduler."""
    if name in _BUILTIN_SCHEDULERS:
        raise ValueError(f"{name!r} is one of A1111's schedule types and cannot be unregistered")
    if name not in SCHEDULERS:
        raise ValueError(f"no schedule type named {name!r} is registered")
    del SCHEDULERS[name]


def get_scheduler(name):
    """SCHEDULERS[name], or a ValueError listing the valid names."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown schedule type {name!r}; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def resolve_sampler(sampler, schedule='Automatic'):
    """(SamplerInfo, schedule name) for a sampler name or alias. Legacy names that carry the schedule, such as
    'DPM++ 2M Karras' or 'DPM++ 3M SDE Exponential', are split as A1111 reads old infotexts. A SamplerInfo is taken
    as it is, and a bare function as an unregistered deterministic sampler named after it."""
    get_scheduler(schedule)  # refuses an unknown schedule type
    if isinstance(sampler, SamplerInfo):
        return sampler, schedule
    if callable(sampler):
        return SamplerInfo(getattr(sampler, '__name__', 'custom sampler'), sampler), schedule
    info = _sampler_by_name(sampler)
    if info is not None:
        return info, schedule
    for schedule_name in SCHEDULERS:
        suffix = ' ' + schedule_name
        if sampler.lower().endswith(suffix.lower()) and _sampler_by_name(sampler[:-len(suffix)]) is not None:
            return _sampler_by_name(sampler[:-len(suffix)]), schedule_name
    raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)} (a schedule type may be appended, "
                     "e.g. 'DPM++ 2M Karras')")


def get_sigmas(sampler, schedule, steps, denoiser, is_sdxl=False):
    """The noise levels A1111 would sample for (sampler, schedule type, steps) on this denoiser: [steps + 1], ending in
    0. "Automatic" uses the sampler's default schedule. sampler: a name, a SamplerInfo or a sampler function."""
    info, schedule = resolve_sampler(sampler, schedule)
    schedule_fn = info.automatic_schedule if schedule == 'Automatic' else SCHEDULERS[schedule]
    if info.discard_penultimate_sigma:
        sigmas = schedule_fn(steps + 1, denoiser, is_sdxl=is_sdxl)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule_fn(steps, denoiser, is_sdxl=is_sdxl)


def sample(sampler, model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, seeds=None,
           **options):
    """Run the sampler `sampler` (a SAMPLERS name, a SamplerInfo or a sampler function) from x [B, ...] at noise
    level sigmas[0].

    noise_sampler: overrides the sampler's noise source. seeds: B integers making a stochastic sampler's noise a
    function of each image's seed alone (a Brownian tree per image for SDE samplers, a CPU generator per image for the
    others; both independent of the initial noise drawn with the same seed). Without either, noise comes from torch's
    global RNG (SDE samplers: a Brownian tree with a random seed). options override SamplerInfo.options.
    """
    info, _ = resolve_sampler(sampler)
    options = {**info.options, **options}
    if info.noise != 'none':
        if noise_sampler is None and seeds is not None:
            if info.noise == 'brownian':
                noise_sampler = BrownianTreeNoiseSampler(x, *_positive_range(sigmas), seed=[int(s) for s in seeds])
            else:
                generators = [torch.Generator('cpu').manual_seed(mix_seed(s, stream=2)) for s in seeds]
                noise_sampler = seeded_noise_sampler(x, generators)
        options['noise_sampler'] = noise_sampler
    return info.function(model, x, sigmas, extra_args, callback, disable, **options)
