"""Samplers: plain functions that integrate the diffusion ODE/SDE from sigmas[0] down to sigmas[-1].

Every sampler works in the "variance-exploding" form of Karras et al. 2022 (EDM): a sample at noise level sigma is
x = x0 + sigma * noise, and the model is a denoiser ``model(x, sigma, **extra_args) -> D(x; sigma)``, an estimate of
x0, where sigma is a tensor [B] (one level per batch item, all equal here). The probability-flow ODE is then

    dx/dsigma = (x - D(x; sigma)) / sigma                                   (Karras et al. 2022, eq. 3 with sigma(t)=t)

Signatures follow k-diffusion: ``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``.
x: [B, ...] starts at noise level sigmas[0] (i.e. already scaled by it); sigmas: 1-D, decreasing, usually ending in 0.
``callback`` is called once per step with {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}; ``disable`` turns the tqdm bar
off. Every stochastic sampler takes ``noise_sampler(sigma, sigma_next) -> N(0, I) noise`` (see samplers.noise).

Noise levels are handled as Python floats: the step coefficients are scalars, and computing them in float64 on the host
is both cheaper (no tiny tensor ops per step) and more accurate than 0-d float32 tensors.
"""

import math

import torch
from tqdm.auto import tqdm, trange

from .noise import BrownianTreeNoiseSampler, default_noise_sampler
from .schedules import get_sigmas_karras


# ----------------------------------------------------------------------------------------------------------------------
# Shared maths
# ----------------------------------------------------------------------------------------------------------------------

def to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE, (x - D) / sigma. sigma: a float, a 0-d tensor or a tensor [B]."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split the step sigma_from -> sigma_to into a deterministic move to sigma_down and fresh noise of size sigma_up,
    with sigma_down**2 + sigma_up**2 = sigma_to**2.

    sigma_up = eta * sqrt(sigma_to**2 (sigma_from**2 - sigma_to**2) / sigma_from**2) is the DDPM posterior standard
    deviation written in sigma (eta = 1: ancestral sampling, eta = 0: deterministic). Returns (sigma_down, sigma_up).
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _as_floats(sigmas):
    return sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]


def _batch_sigma(x, sigma):
    """The noise level as the model takes it: a tensor [B] on x's device."""
    return x.new_full((x.shape[0],), sigma)


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al. 2022, Alg. 2 lines 4-6: raise the noise level from sigma to sigma_hat = (1 + gamma) sigma by adding
    fresh noise, which lets the next ODE step correct errors made earlier. Returns (x, sigma_hat)."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    x = x + noise_sampler(sigma, sigma_hat) * (s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5)
    return x, sigma_hat


def _report(callback, x, i, sigmas, sigma_hat, denoised):
    if callback is not None:
        callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigma_hat, 'denoised': denoised})


# ----------------------------------------------------------------------------------------------------------------------
# Karras et al. 2022 (EDM) ODE solvers in sigma
# ----------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None):
    """Euler steps on the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2 without the
    Heun correction). First order."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    n_steps = len(sigma_list) - 1
    for i in trange(n_steps, disable=disable):
        x, sigma_hat = _churn(x, sigma_list[i], n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, _batch_sigma(x, sigma_hat), **extra_args)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_list[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling: an Euler step down to sigma_down, then fresh noise up to sigma_next
    (see get_ancestral_step). With eta = 1 this is DDPM sampling written in sigma."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., noise_sampler=None):
    """Heun's method (trapezoidal predictor-corrector) with optional churn: Karras et al. 2022, Alg. 2. Second order,
    two model calls per step except the last step to sigma = 0, which is Euler (the slope at 0 is undefined)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    n_steps = len(sigma_list) - 1
    for i in trange(n_steps, disable=disable):
        sigma_next = sigma_list[i + 1]
        x, sigma_hat = _churn(x, sigma_list[i], n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, _batch_sigma(x, sigma_hat), **extra_args)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, model(x_euler, _batch_sigma(x, sigma_next), **extra_args))
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., noise_sampler=None):
    """Midpoint method with the midpoint taken in log sigma (inspired by DPM-Solver-2, Lu et al. 2022) and the churn
    of Karras et al. 2022, Alg. 2. Second order; the last step to sigma = 0 is Euler."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    n_steps = len(sigma_list) - 1
    for i in trange(n_steps, disable=disable):
        sigma_next = sigma_list[i + 1]
        x, sigma_hat = _churn(x, sigma_list[i], n_steps, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, _batch_sigma(x, sigma_hat), **extra_args)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * sigma_next)  # halfway in log sigma
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, _batch_sigma(x, sigma_mid), **extra_args))
            x = x + d_mid * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """sample_dpm_2's log-sigma midpoint step down to sigma_down, then fresh noise up to sigma_next."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = x + d * (sigma_mid - sigma)
            d_mid = to_d(x_mid, sigma_mid, model(x_mid, _batch_sigma(x, sigma_mid), **extra_args))
            x = x + d_mid * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def linear_multistep_coeff(order, t, i, j):
    """Weight of the slope at t[i - j] in a linear multistep step from t[i] to t[i + 1]: the integral over that step of
    the Lagrange polynomial through t[i], t[i-1], ..., t[i-order+1] that is 1 at t[i - j] and 0 at the others.
    Computed exactly (the integrand is a polynomial) in float64."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}: only {i + 1} previous slopes exist")
    # Work in tau - t[i] so the powers stay small; poly[k] is the coefficient of (tau - t[i])**k.
    origin = float(t[i])
    nodes = [float(t[i - k]) - origin for k in range(order)]
    poly = [1.0]
    for k, node in enumerate(nodes):
        if k == j:
            continue
        scale = nodes[j] - node
        shifted = [0.0] + poly  # multiply by (tau - node) / scale
        poly = [(shifted[m] - node * (poly[m] if m < len(poly) else 0.0)) / scale for m in range(len(shifted))]
    h = float(t[i + 1]) - origin
    return sum(coefficient * h ** (power + 1) / (power + 1) for power, coefficient in enumerate(poly))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth with variable steps) on the probability-flow ODE in sigma: the slope over each
    step is the exact integral of the polynomial through the last `order` slopes. Starts at order 1 and ramps up."""
    extra_args = {} if extra_args is None else extra_args
    sigma_list = _as_floats(sigmas)
    slopes = []  # most recent last
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma = sigma_list[i]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        slopes = (slopes + [to_d(x, sigma, denoised)])[-order:]
        current_order = len(slopes)
        for j in range(current_order):
            x = x + slopes[-1 - j] * linear_multistep_coeff(current_order, sigma_list, i, j)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022, arXiv:2206.00927): singlestep solvers in t = -log sigma, on the noise prediction
# eps = (x - D) / sigma. In these variables the ODE's linear part is solved exactly: x(t') = (sigma'/sigma) x + ...
# ----------------------------------------------------------------------------------------------------------------------

def _dpm_solver_1(x, t, t_next, eps):
    """DPM-Solver-1 (= DDIM): x_next = x - sigma(t_next) (e^h - 1) eps, h = t_next - t."""
    return x - math.exp(-t_next) * math.expm1(t_next - t) * eps


def _dpm_solver_2(x, t, t_next, eps, eps_fn, r1):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 4): one extra evaluation at t + r1 h. Returns (x_next, eps at that point)."""
    h = t_next - t
    s1 = t + r1 * h
    eps_1 = eps_fn(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)
    x_next = x - math.exp(-t_next) * math.expm1(h) * eps - math.exp(-t_next) / (2 * r1) * math.expm1(h) * (eps_1 - eps)
    return x_next, eps_1


def _dpm_solver_3(x, t, t_next, eps, eps_fn, r1=1 / 3, r2=2 / 3, eps_1=None):
    """DPM-Solver-3 (Lu et al. 2022, Alg. 5): evaluations at t + r1 h and t + r2 h (eps_1 may be passed in when the
    first one is already known)."""
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_1 is None:
        eps_1 = eps_fn(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)
    phi_2 = math.expm1(r2 * h) / (r2 * h) - 1
    u2 = x - math.exp(-s2) * math.expm1(r2 * h) * eps - math.exp(-s2) * (r2 / r1) * phi_2 * (eps_1 - eps)
    eps_2 = eps_fn(u2, s2)
    return (x - math.exp(-t_next) * math.expm1(h) * eps
            - math.exp(-t_next) / r2 * (math.expm1(h) / h - 1) * (eps_2 - eps))


def _noise_prediction(model, extra_args, progress):
    """eps(x, t) = (x - D(x; sigma)) / sigma at sigma = e^-t, ticking the progress bar once per model evaluation."""
    def eps(x, t):
        sigma = math.exp(-t)
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        progress.update()
        return (x - denoised) / sigma
    return eps


def _ancestral_target(t, t_next, t_end, eta):
    """For DPM-Solver with eta > 0: the time to solve to (t of sigma_down, not past t_end) and the noise to add."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_target = min(t_end, -math.log(sigma_down))
    return t_target, (math.exp(-2 * t_next) - math.exp(-2 * t_target)) ** 0.5


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, §3.4): n model evaluations spent on singlestep DPM-Solver-3 steps evenly spaced
    in t = -log sigma, finishing with a DPM-Solver-2/-1 step to use up the remainder. Ends at sigma_min (> 0)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sample_dpm_fast needs sigma_min, sigma_max > 0, got {float(sigma_min)}, {float(sigma_max)}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    t_start, t_end = -math.log(float(sigma_max)), -math.log(float(sigma_min))
    n_steps = n // 3 + 1
    ts = torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64).tolist()
    orders = [3] * (n_steps - 2) + [2, 1] if n % 3 == 0 else [3] * (n_steps - 1) + [n % 3]
    with tqdm(total=n, disable=disable) as progress:
        eps_fn = _noise_prediction(model, extra_args, progress)
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_target, noise_size = _ancestral_target(t, t_next, t_end, eta)
            eps = eps_fn(x, t)
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': math.exp(-t), 'sigma_hat': math.exp(-t),
                          'denoised': x - math.exp(-t) * eps})
            if order == 1:
                x = _dpm_solver_1(x, t, t_target, eps)
            elif order == 2:
                x, _ = _dpm_solver_2(x, t, t_target, eps, eps_fn, r1=1 / 2)
            else:
                x = _dpm_solver_3(x, t, t_target, eps, eps_fn)
            if noise_size:
                x = x + noise_sampler(math.exp(-t), math.exp(-t_next)) * (s_noise * noise_size)
    return x


class _PIDStepSizeController:
    """Step size control for the adaptive solver: h <- h * limiter(e_n^b1 e_{n-1}^b2 e_{n-2}^b3) with e = 1/error,
    the PID filter of Söderlind 2003 (as used for diffusion by Jolicoeur-Martineau et al. 2021)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors = None  # [current, previous accepted, the one before]

    def propose_step(self, error):
        """Scale h by the error of the last attempt; return whether that attempt is accepted."""
        inverse_error = 1 / (float(error) + self.eps)
        if self.inverse_errors is None:
            self.inverse_errors = [inverse_error] * 3
        self.inverse_errors[0] = inverse_error
        e0, e1, e2 = self.inverse_errors
        # Soft limiter: the factor stays in (1 - pi/2, 1 + pi/2).
        factor = 1 + math.atan(e0 ** self.b1 * e1 ** self.b2 * e2 ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [e0, e0, e1]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False):
    """Adaptive-step DPM-Solver-12 / -23 (Lu et al. 2022, §4.2): each attempt computes an order-1/2 (or 2/3) pair
    sharing model evaluations, estimates the local error from their difference, and a PID controller picks the next
    step. With return_info, also returns {'steps', 'nfe', 'n_accept', 'n_reject'}."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sample_dpm_adaptive needs sigma_min, sigma_max > 0, got {float(sigma_min)}, "
                         f"{float(sigma_max)}")
    if order not in {2, 3}:
        raise ValueError(f"sample_dpm_adaptive order must be 2 or 3, got {order}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    t_start, t_end = -math.log(float(sigma_max)), -math.log(float(sigma_min))
    controller = _PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
    s, x_prev = t_start, x
    with tqdm(disable=disable) as progress:
        eps_fn = _noise_prediction(model, extra_args, progress)
        while s < t_end - 1e-5:
            t = min(t_end, s + controller.h)
            t_target, noise_size = _ancestral_target(s, t, t_end, eta)
            eps = eps_fn(x, s)
            denoised = x - math.exp(-s) * eps
            if order == 2:
                x_low = _dpm_solver_1(x, s, t_target, eps)
                x_high, _ = _dpm_solver_2(x, s, t_target, eps, eps_fn, r1=1 / 2)
            else:
                x_low, eps_1 = _dpm_solver_2(x, s, t_target, eps, eps_fn, r1=1 / 3)
                x_high = _dpm_solver_3(x, s, t_target, eps, eps_fn, eps_1=eps_1)
            # Mixed absolute/relative tolerance per element, RMS over the sample (Hairer et al., §II.4).
            scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
            error = torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5
            if controller.propose_step(error):
                x_prev = x_low
                x = x_high
                if noise_size:
                    x = x + noise_sampler(math.exp(-s), math.exp(-t)) * (s_noise * noise_size)
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1
            if callback is not None:
                callback({'x': x, 'i': info['steps'] - 1, 'sigma': math.exp(-s), 'sigma_hat': math.exp(-s),
                          'denoised': denoised, 'error': error, 'h': controller.h, **info})
    return (x, info) if return_info else x


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095): solvers on the data prediction D in t = -log sigma, where the
# exact solution of the linear part is x(t') = (sigma'/sigma) x + (1 - sigma'/sigma) D  (for constant D).
# ----------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None):
    """DPM-Solver++(2S) (singlestep, midpoint in log sigma) down to sigma_down, then fresh noise up to sigma_next."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = (sigma_mid / sigma) * x + (1 - sigma_mid / sigma) * denoised
            denoised_mid = model(x_mid, _batch_sigma(x, sigma_mid), **extra_args)
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_mid
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


def _brownian_default(x, sigmas, noise_sampler):
    """SDE samplers default to Brownian-tree noise over the schedule's range (random seed, as k-diffusion)."""
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max())


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ SDE, singlestep second order: an ancestral sub-step to t + r h, then a step to t_next using the
    blend (1 - 1/(2r)) D(t) + 1/(2r) D(t + r h), each sub-step adding its share of Brownian noise."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    sigma_list = _as_floats(sigmas)
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        sigma_s = math.exp(-(t + r * (t_next - t)))
        # Sub-step to sigma_s.
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_s, eta)
        x_s = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
        x_s = x_s + noise_sampler(sigma, sigma_s) * (s_noise * sigma_up)
        denoised_s = model(x_s, _batch_sigma(x, sigma_s), **extra_args)
        # Full step from sigma with the blended data prediction.
        weight = 1 / (2 * r)
        denoised_blend = (1 - weight) * denoised + weight * denoised_s
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_blend
        x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): multistep second order; the data prediction over the step is
    extrapolated from the current and previous D. The first and the last (to sigma = 0) steps are first order."""
    extra_args = {} if extra_args is None else extra_args
    sigma_list = _as_floats(sigmas)
    old_denoised = None
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        if old_denoised is None or sigma_next == 0:
            denoised_d = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_last = math.log(sigma_list[i - 1] / sigma)
            half_over_r = h / (2 * h_last)
            denoised_d = (1 + half_over_r) * denoised - half_over_r * old_denoised
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, §5 / the SDE solver of their App. B): the exact linear part of the
    reverse SDE with noise fraction eta, plus a second-order correction from the previous D ('midpoint' or 'heun'
    form). The last step to sigma = 0 returns D."""
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    sigma_list = _as_floats(sigmas)
    old_denoised, h_last = None, None
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            h = None
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
            x = (sigma_next / sigma * math.exp(-eta_h)) * x + decay * denoised
            if old_denoised is not None:
                if solver_type == 'heun':
                    correction = (decay / (-h - eta_h) + 1) * (h / h_last)
                else:
                    correction = 0.5 * decay * (h / h_last)
                x = x + correction * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE: as the 2M SDE but extrapolating D with a quadratic through the last three data
    predictions (phi_2 / phi_3 exponential-integrator weights). The last step to sigma = 0 returns D."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    sigma_list = _as_floats(sigmas)
    denoised_1, denoised_2 = None, None  # D one and two steps back
    h_1, h_2 = None, None
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            h = None
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise_sampler(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Restart sampling (Xu et al. 2023, arXiv:2306.14878)
# ----------------------------------------------------------------------------------------------------------------------

def _karras_levels(n, sigma_min, sigma_max):
    """n Karras levels from sigma_max to sigma_min, without the final 0, as floats."""
    return get_sigmas_karras(n, sigma_min, sigma_max)[:-1].tolist()


def _nearest_index(levels, sigma):
    return min(range(len(levels)), key=lambda k: abs(levels[k] - sigma))


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1., restart_list=None,
                   noise_sampler=None):
    """Restart sampling: Heun steps down the schedule; on reaching a chosen noise level, jump back up to a higher one
    by adding fresh noise and descend again, `times` times. The forward noise contracts the errors accumulated so far.

    restart_list: {sigma_at: (n_levels, times, sigma_restart_to)}; each restart descends through n_levels Karras
    levels (n_levels - 1 Heun steps). None chooses A1111's default: for 20+ steps, replace the schedule by a Karras
    schedule over the same range with fewer levels and restart once from sigma ~0.1 up to ~2 with 10 levels
    (36+ steps: twice, with steps // 4 + 1 levels), so the total number of steps stays as requested.
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    levels = _as_floats(sigmas)
    n_steps = len(levels) - 1
    if restart_list is None:
        if n_steps >= 20:
            restart_steps, restart_times = (n_steps // 4, 2) if n_steps >= 36 else (9, 1)
            levels = _karras_levels(n_steps - restart_steps * restart_times, levels[-2], levels[0]) + [0.0]
            restart_list = {0.1: (restart_steps + 1, restart_times, 2.0)}
        else:
            restart_list = {}
    restarts = {_nearest_index(levels, sigma_at): value for sigma_at, value in restart_list.items()}

    # The whole path as (from, to) pairs: the schedule, with each restart's descents inserted after its level.
    step_pairs = []
    for i in range(len(levels) - 1):
        step_pairs.append((levels[i], levels[i + 1]))
        if i + 1 in restarts:
            n_levels, times, sigma_restart_to = restarts[i + 1]
            top = _nearest_index(levels, sigma_restart_to)
            if top < i + 1:
                restart_levels = _karras_levels(n_levels, levels[i + 1], levels[top])
                step_pairs += list(zip(restart_levels[:-1], restart_levels[1:])) * times

    sigma_reached = None
    for step, (sigma, sigma_next) in enumerate(tqdm(step_pairs, disable=disable)):
        if sigma_reached is not None and sigma_reached < sigma:
            # Restart: forward-diffuse from the level reached up to sigma.
            x = x + noise_sampler(sigma_reached, sigma) * (s_noise * (sigma ** 2 - sigma_reached ** 2) ** 0.5)
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        if callback is not None:
            callback({'x': x, 'i': step, 'sigma': sigma, 'sigma_hat': sigma, 'denoised': denoised})
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, model(x_euler, _batch_sigma(x, sigma_next), **extra_args))
            x = x + (d + d_next) / 2 * dt
        sigma_reached = sigma_next
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Samplers that come from timestep-based code (CompVis DDIM/PLMS, UniPC, LCM), written in sigma.
# For a discrete model with cumulative alphas abar, sigma = sqrt((1 - abar) / abar) and x = x_vp / sqrt(abar).
# ----------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0., s_noise=1.,
                noise_sampler=None):
    """DDIM (Song et al. 2021, eq. 12). Dividing its update by sqrt(abar_prev) gives, in sigma,
        x_next = D + sqrt(sigma_next**2 - sigma_up**2) * (x - D) / sigma + sigma_up * z,
        sigma_up = eta * sqrt(sigma_next**2 (sigma**2 - sigma_next**2) / sigma**2),
    which is exactly an ancestral Euler step; eta = 0 (the default) is the deterministic Euler method. Use it with
    the DDIM schedule (samplers.schedules.get_sigmas_ddim_uniform) to reproduce CompVis DDIM."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                                  noise_sampler=noise_sampler)


# Adams-Bashforth weights for equally spaced steps, newest slope first (orders 2, 3, 4).
_ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 (PNDM) as in CompVis' PLMSSampler. In sigma the DDIM
    transfer step is an Euler step and eps = (x - D) / sigma is its slope, so PLMS is: Euler steps whose slope is an
    Adams-Bashforth combination of the last 1-4 slopes, with the fixed weights of equally spaced steps (as the
    original, whatever the spacing). The first step is a Heun step (the original's "pseudo improved Euler")."""
    extra_args = {} if extra_args is None else extra_args
    sigma_list = _as_floats(sigmas)
    previous_slopes = []  # most recent first, at most 3
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if not previous_slopes:
            slope = d
            if sigma_next > 0:
                x_euler = x + d * dt
                slope = (d + to_d(x_euler, sigma_next, model(x_euler, _batch_sigma(x, sigma_next), **extra_args))) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(previous_slopes) + 1]
            slope = d * weights[0]
            for weight, previous in zip(weights[1:], previous_slopes):
                slope = slope.add(previous, alpha=weight)
        previous_slopes = [d] + previous_slopes[:2]
        x = x.add(slope, alpha=dt)
    return x


def _unipc_coefficients(lambdas, h, order, variant, full_system):
    """The B(h) and rho weights of UniPC (Zhao et al. 2023, Alg. 2/3, data-prediction form) for the points whose
    lambda = -log sigma are `lambdas` (the step's own start first, then older ones) and step size h.

    Returns (h_phi_1, B_h, rhos): rhos solve R rho = b on the (order - 1) x (order - 1) top-left block (predictor,
    full_system False) or the full order x order system (corrector)."""
    hh = -h  # data prediction integrates e^{-h}
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == 'bh1' else math.expm1(hh)
    # r_k = (lambda_{s_k} - lambda_s) / h for the older points, then 1 for the end of the step.
    rks = [(lam - lambdas[0]) / h for lam in lambdas[1:order]] + [1.0]
    # b_k = phi_{k+1}(hh) * k! / B(h), with h*phi_k from the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if full_system:
        if order == 1:
            return h_phi_1, B_h, [0.5]  # UniC-1
        size = order
    else:
        if order == 1:
            return h_phi_1, B_h, []  # UniP-1 uses no older points: the DPM-Solver++(1) / DDIM step
        if order == 2:
            return h_phi_1, B_h, [0.5]  # UniP-2: the paper's fixed rho = 1/2
        size = order - 1
    R = torch.tensor([[r ** power for r in rks[:size]] for power in range(size)], dtype=torch.float64)
    rhos = torch.linalg.solve(R, torch.tensor(b[:size], dtype=torch.float64))
    return h_phi_1, B_h, rhos.tolist()


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant='bh1',
                 lower_order_final=True):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): a multistep predictor (UniP) on the data prediction, and after each
    model evaluation a corrector (UniC) that reuses that evaluation, raising the order by one at no extra cost.
    variant: 'bh1' (B(h) = h, for few steps/unconditional) or 'bh2' (B(h) = e^h - 1). Multistep orders ramp up from 1;
    with lower_order_final the last steps use at most as many points as steps remain. A final step to sigma = 0 is
    the limit of the first-order step, x = D."""
    if variant not in {'bh1', 'bh2'}:
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    sigma_list = _as_floats(sigmas)
    n_steps = len(sigma_list) - 1
    history = []  # (lambda, D) of the points used so far, most recent first
    x_base, step_order = None, 0  # the last predictor's start point and order (for the corrector)
    for i in trange(n_steps, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        lam = -math.log(sigma)
        if history:
            # UniC: redo the last step from x_base with the new evaluation as an extra point.
            (lam_s, denoised_s), older = history[0], history[1:]
            h = lam - lam_s
            h_phi_1, B_h, rhos = _unipc_coefficients([lam_s] + [p[0] for p in older], h, step_order, variant, True)
            correction = rhos[-1] * (denoised - denoised_s)
            for rho, (lam_k, denoised_k) in zip(rhos[:-1], older):
                correction = correction + rho * (denoised_k - denoised_s) / ((lam_k - lam_s) / h)
            x = (sigma / math.exp(-lam_s)) * x_base - h_phi_1 * denoised_s - B_h * correction
        history = ([(lam, denoised)] + history)[:order]
        step_order = min(order, len(history), n_steps - i if lower_order_final else order)
        x_base = x
        if sigma_next == 0:
            x = denoised
            continue
        # UniP: multistep prediction from the `step_order` most recent points.
        h = -math.log(sigma_next) - lam
        h_phi_1, B_h, rhos = _unipc_coefficients([p[0] for p in history], h, step_order, variant, False)
        x = (sigma_next / sigma) * x - h_phi_1 * denoised
        for rho, (lam_k, denoised_k) in zip(rhos, history[1:step_order]):
            x = x - B_h * rho * (denoised_k - denoised) / ((lam_k - lam) / h)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1): jump to the model's x0 estimate, then
    re-noise it to the next level with fresh noise. Use with a consistency-distilled model (see LCMDenoiser)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    sigma_list = _as_floats(sigmas)
    for i in trange(len(sigma_list) - 1, disable=disable):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        denoised = model(x, _batch_sigma(x, sigma), **extra_args)
        _report(callback, x, i, sigmas, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next
    return x
