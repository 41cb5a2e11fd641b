"""Noise schedules: functions returning the decreasing noise levels a sampler visits, with a final 0 appended.

The first four have k-diffusion's signatures and values. The others are the model-dependent schedule types A1111
offers; they take the denoiser (a samplers.wrappers.DiscreteSchedule, or anything with its attributes: the ascending
table ``sigmas`` [1000] of the model's training noise levels, ``sigma_min``, ``sigma_max``, ``sigma_to_t``,
``t_to_sigma``).

All values are computed in float64 and returned as float32 tensors.
"""

import math

import torch


def append_zero(sigmas):
    """Append the final noise level 0 (the clean sample)."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _as_schedule(values, device):
    """float64 list or tensor of n noise levels -> float32 tensor [n + 1] ending in 0."""
    return append_zero(torch.as_tensor(values, dtype=torch.float64).to(torch.float32)).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# k-diffusion schedules
# ----------------------------------------------------------------------------------------------------------------------

def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Karras et al. 2022, eq. 5: n levels evenly spaced in sigma**(1/rho); rho = 7 spends more steps at low noise."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return _as_schedule((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """n levels evenly spaced in log sigma."""
    log_sigmas = torch.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), n, dtype=torch.float64)
    return _as_schedule(log_sigmas.exp(), device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """n levels whose log sigma is a polynomial of degree rho in the step fraction (rho = 1: exponential)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(float(sigma_min)), math.log(float(sigma_max))
    return _as_schedule(torch.exp(ramp * (log_max - log_min) + log_min), device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The continuous VP-SDE schedule of Song et al. 2021: sigma(t) = sqrt(exp(beta_d t**2 / 2 + beta_min t) - 1) for
    t evenly spaced from 1 to eps_s."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _as_schedule(torch.sqrt(torch.expm1(beta_d * t ** 2 / 2 + beta_min * t)), device)


# ----------------------------------------------------------------------------------------------------------------------
# Model-dependent schedules (A1111 "Schedule type")
# ----------------------------------------------------------------------------------------------------------------------

def _sigmas_at(denoiser, timesteps):
    """Noise levels at (fractional) timesteps, log-interpolated in the denoiser's table."""
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=denoiser.sigmas.device)
    return denoiser.t_to_sigma(t).to(torch.float64)


def _timestep_range(denoiser):
    """(t of sigma_max, t of sigma_min) as the denoiser maps them (quantised or not)."""
    start = float(denoiser.sigma_to_t(torch.as_tensor(denoiser.sigma_max)))
    end = float(denoiser.sigma_to_t(torch.as_tensor(denoiser.sigma_min)))
    return start, end


def get_sigmas_uniform(n, denoiser):
    """"Uniform" (k-diffusion's default for discrete models): n timesteps evenly spaced from the last training
    timestep to 0."""
    t_max = len(denoiser.sigmas) - 1
    return _as_schedule(_sigmas_at(denoiser, torch.linspace(t_max, 0, n, dtype=torch.float64)), denoiser.sigmas.device)


def get_sigmas_sgm_uniform(n, denoiser):
    """"SGM Uniform": n + 1 timesteps evenly spaced from t(sigma_max) to t(sigma_min), dropping the last, so the
    steps are the same size as a schedule with one more level (the spacing of Stability's sgm code, "trailing")."""
    start, end = _timestep_range(denoiser)
    timesteps = torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]
    return _as_schedule(_sigmas_at(denoiser, timesteps), denoiser.sigmas.device)


def get_sigmas_normal(n, denoiser):
    """"Normal": n timesteps evenly spaced from t(sigma_max) to t(sigma_min) inclusive."""
    start, end = _timestep_range(denoiser)
    return _as_schedule(_sigmas_at(denoiser, torch.linspace(start, end, n, dtype=torch.float64)),
                        denoiser.sigmas.device)


def get_sigmas_simple(n, denoiser):
    """"Simple": every (1000 / n)-th entry of the training table, counted down from the noisiest."""
    table = denoiser.sigmas.tolist()
    stride = len(table) / n
    return _as_schedule([table[-(1 + int(k * stride))] for k in range(n)], denoiser.sigmas.device)


def get_sigmas_ddim_uniform(n, denoiser):
    """"DDIM": the timesteps of CompVis' DDIM "uniform" discretisation, 1, 1 + c, 1 + 2c, ... below 1000 with
    c = 1000 // n (offset 1, as diffusers' steps_offset=1 with "leading" spacing). When c does not divide 1000 this
    gives more than n steps (e.g. 31 for n = 30), exactly as CompVis and A1111 do."""
    table = denoiser.sigmas.tolist()
    stride = max(len(table) // n, 1)
    return _as_schedule(table[1::stride][::-1], denoiser.sigmas.device)


def _regularized_incomplete_beta(x, a, b):
    """I_x(a, b), the CDF of the Beta(a, b) distribution, by its continued fraction (evaluated with the modified
    Lentz method, Press et al., Numerical Recipes §6.4), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the
    fraction converges slowly."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_incomplete_beta(1.0 - x, b, a)
    log_prefactor = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300

    def lentz_update(numerator, c, d):
        d = 1.0 + numerator * d
        c = 1.0 + numerator / c
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = c if abs(c) > tiny else tiny
        return c, d, c * d

    # The fraction is 1 / (1 + d1 / (1 + d2 / (1 + ...))) with d1 = -(a + b) x / (a + 1) and d_m below.
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        c, d, factor = lentz_update(even, c, d)
        fraction *= factor
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        c, d, factor = lentz_update(odd, c, d)
        fraction *= factor
        if abs(factor - 1.0) < 1e-15:
            break
    return math.exp(log_prefactor) * fraction / a


def _beta_quantile(p, a, b):
    """Inverse CDF of Beta(a, b) by bisection (the CDF is monotone; 100 halvings reach float64 resolution)."""
    if p <= 0.0 or p >= 1.0:
        return min(max(p, 0.0), 1.0)
    low, high = 0.0, 1.0
    for _ in range(100):
        mid = (low + high) / 2
        if _regularized_incomplete_beta(mid, a, b) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def get_sigmas_beta(n, sigma_min, sigma_max, alpha=0.6, beta=0.6, device='cpu'):
    """"Beta" (Lee et al. 2024, arXiv:2407.12173) as A1111 defines it: sigma = sigma_min + q (sigma_max - sigma_min)
    where q runs over the Beta(alpha, beta) quantiles of n evenly spaced probabilities from 1 to 0. With
    alpha = beta < 1 the steps cluster at both ends of the range."""
    probabilities = torch.linspace(1, 0, n, dtype=torch.float64).tolist()
    quantiles = [_beta_quantile(p, alpha, beta) for p in probabilities]
    return _as_schedule([float(sigma_min) + q * (float(sigma_max) - float(sigma_min)) for q in quantiles], device)


def get_sigmas_kl_optimal(n, sigma_min, sigma_max, device='cpu'):
    """"KL Optimal" (Sabour et al. 2024, "Align Your Steps", arXiv:2404.14507: the schedule minimising the KL bound
    for Gaussian data): n levels evenly spaced in arctan(sigma), from sigma_max to sigma_min, then 0. (A1111's own
    version spaces n + 1 levels and stops at sigma_min without the final 0; we end on 0 like every other schedule.)"""
    if n == 1:
        return _as_schedule([float(sigma_max)], device)
    atan_min, atan_max = math.atan(float(sigma_min)), math.atan(float(sigma_max))
    fractions = torch.arange(n, dtype=torch.float64) / (n - 1)
    return _as_schedule(torch.tan(fractions * atan_min + (1 - fractions) * atan_max), device)


# The 10-step schedules NVIDIA published for Align Your Steps (Sabour et al. 2024,
# research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), noisiest first.
ALIGN_YOUR_STEPS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
ALIGN_YOUR_STEPS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def get_sigmas_align_your_steps(n, is_sdxl=False, device='cpu'):
    """"Align Your Steps": NVIDIA's optimised SD1.5 or SDXL table, resampled to n levels by linear interpolation of
    log sigma over evenly spaced positions (their log-linear recipe), then 0."""
    table = ALIGN_YOUR_STEPS_SDXL if is_sdxl else ALIGN_YOUR_STEPS_SD15
    log_table = [math.log(s) for s in table]
    levels = []
    for k in range(n):
        position = k * (len(table) - 1) / (n - 1) if n > 1 else 0.0
        low = min(int(position), len(table) - 2)
        weight = position - low
        levels.append(math.exp((1 - weight) * log_table[low] + weight * log_table[low + 1]))
    return _as_schedule(levels, device)


def get_sigmas_lcm(n, denoiser, original_steps=50):
    """The timesteps a Latent Consistency Model was distilled on (Luo et al. 2023): the `original_steps` evenly spaced
    timesteps k - 1, 2k - 1, ..., 999 (k = 1000 // original_steps), of which n are taken at evenly spaced indices
    from the noisiest (as diffusers' LCMScheduler, e.g. 999, 759, 499, 259 for n = 4)."""
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM schedules take 1..{original_steps} steps, got {n}")
    table = denoiser.sigmas.tolist()
    stride = len(table) // original_steps
    distilled_timesteps = [(k + 1) * stride - 1 for k in range(original_steps)][::-1]
    chosen = [distilled_timesteps[int(k * original_steps / n)] for k in range(n)]
    return _as_schedule([table[t] for t in chosen], denoiser.sigmas.device)
