"""Model wrappers that turn a discrete-time UNet into the denoiser D(x, sigma) the samplers expect, and classifier-free
guidance on top of it.

A DDPM-style model is trained on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for t = 0..999. Dividing by sqrt(abar_t)
gives the sigma form the samplers use, x = x0 + sigma eps with sigma_t = sqrt((1 - abar_t) / abar_t), so the model sees
x_t = c_in x with c_in = 1 / sqrt(sigma**2 + 1) (Karras et al. 2022, Table 1, "VP" column).
"""

import torch
from torch import nn


# abar at the last timestep after the zero-terminal-SNR rescale. The rescale makes it exactly 0 (sigma = infinity);
# A1111 and ComfyUI replace it by this value (sigma_max ~ 4500) so the noise levels stay finite. We do the same.
ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1: shift and scale
    sqrt(abar) so that it is 0 at the last timestep (pure noise, zero SNR) and unchanged at the first. The last value
    is then set to ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD to keep sigma finite. Returns a new tensor."""
    sqrt_abar = alphas_cumprod.double().sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    rescaled = ((sqrt_abar - last) * (first / (first - last))) ** 2
    rescaled[-1] = ZERO_TERMINAL_SNR_LAST_ALPHA_CUMPROD
    return rescaled.to(alphas_cumprod.dtype)


def _expand(sigma, x):
    """sigma [B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


class DiscreteSchedule(nn.Module):
    """The map between a model's 1000 training timesteps and their noise levels.

    sigmas: ascending table [T] (t = 0 is the least noisy). sigma_to_t interpolates linearly in log sigma between
    neighbouring entries, or with quantize=True snaps to the nearest timestep (what the model saw in training).
    """

    def __init__(self, sigmas, quantize):
        super().__init__()
        log_sigmas = sigmas.double().log()
        self.register_buffer('sigmas', sigmas.float(), persistent=False)
        self.register_buffer('log_sigmas', log_sigmas.float(), persistent=False)
        # Nearest timestep = number of midpoints (in log sigma) between neighbouring entries that lie below.
        self.register_buffer('log_sigma_midpoints', ((log_sigmas[1:] + log_sigmas[:-1]) / 2).float(),
                             persistent=False)
        self.quantize = quantize

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def sigma_to_t(self, sigma, quantize=None):
        """Timestep(s) of noise level(s) sigma (any shape), clamped to [0, T - 1]; float32 (integral if quantised)."""
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.float().log()
        if quantize:
            return torch.searchsorted(self.log_sigma_midpoints, log_sigma.contiguous()).float()
        # Index of the last table entry <= log_sigma, kept inside the table so there is always a right neighbour.
        low = torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1), right=True) - 1
        low = low.clamp(0, len(self.log_sigmas) - 2)
        low_value, high_value = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((low_value - log_sigma.reshape(-1)) / (low_value - high_value)).clamp(0, 1)
        return (low + weight).reshape(sigma.shape)

    def t_to_sigma(self, t):
        """Noise level(s) at (fractional) timestep(s) t, log-linear between table entries."""
        t = t.float()
        low, high = t.floor().long(), t.ceil().long()
        return torch.lerp(self.log_sigmas[low], self.log_sigmas[high], t.frac()).exp()


class DiscreteEpsDenoiser(DiscreteSchedule):
    """D(x, sigma) for a model that predicts the noise eps: D = x - sigma * unet_fn(c_in x, t).

    unet_fn(x_t, t, **extra) -> eps, with x_t: [B, C, H, W] and t: float timesteps [B]; alphas_cumprod: [T].
    forward(x, sigma, **extra): x [B, C, H, W] at noise levels sigma [B] -> denoised [B, C, H, W].
    """

    def __init__(self, unet_fn, alphas_cumprod, quantize=True):
        alphas_cumprod = alphas_cumprod.double()
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt(), quantize)
        self.inner_model = unet_fn

    def forward(self, x, sigma, **extra):
        c_in = _expand(torch.rsqrt(sigma * sigma + 1), x)
        eps = self.inner_model(x * c_in, self.sigma_to_t(sigma), **extra)
        return x - eps * _expand(sigma, x)


class DiscreteVDenoiser(DiscreteSchedule):
    """D(x, sigma) for a v-prediction model (Salimans & Ho 2022; SD 2.x 768-v): with x_t = c_in x,
    v = sqrt(abar) eps - sqrt(1 - abar) x0, so D = c_skip x + c_out v with c_skip = 1 / (sigma**2 + 1),
    c_out = -sigma / sqrt(sigma**2 + 1).

    unet_fn(x_t, t, **extra) -> v; otherwise as DiscreteEpsDenoiser.
    """

    def __init__(self, unet_fn, alphas_cumprod, quantize=True):
        alphas_cumprod = alphas_cumprod.double()
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt(), quantize)
        self.inner_model = unet_fn

    def forward(self, x, sigma, **extra):
        c_in = _expand((sigma ** 2 + 1) ** -0.5, x)
        v = self.inner_model(x * c_in, self.sigma_to_t(sigma), **extra)
        return x * c_in ** 2 - v * (_expand(sigma, x) * c_in)


def model_denoiser(model, quantize=False):
    """The denoiser D(x, sigma, context=..., y=None, concat=None) of a loaded latent-diffusion model: the one place
    that picks the eps or v wrapper from what the model predicts.

    model: anything with `parameterization` ("eps" or "v"), `alphas_cumprod` [T], `dtype` and
        `apply_model(x_t, t, context, y)` (ldm.LatentDiffusion; samplers does not import ldm).
    context: [B, L, D] text conditioning; y: SDXL's [B, adm_in_channels] vector; concat: [B, 5, h, w], the mask and
        masked-image latent that 9-channel inpainting UNets take beside x. Any other keyword tensor goes to
        `apply_model` as is (e.g. ControlNet hints: sample.controlnet.ControlledModel). The UNet runs in the model's
        dtype; D is float32.
    quantize: snap noise levels to the nearest training timestep. A1111 runs k-diffusion without it (the default
        here), so fractional timesteps reach the UNet.
    """
    wrappers = {'eps': DiscreteEpsDenoiser, 'v': DiscreteVDenoiser}
    if model.parameterization not in wrappers:
        raise ValueError(f"the model predicts {model.parameterization!r}; model_denoiser knows 'eps' and 'v'")

    def unet(x, t, context, y=None, concat=None, **model_inputs):
        # x: [B, 4, h, w] (+ concat [B, 5, h, w] for inpainting models), t: [B] fractional timesteps
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)
        dtype = model.dtype
        return model.apply_model(x.to(dtype), t, context.to(dtype), None if y is None else y.to(dtype),
                                 **model_inputs).float()

    return wrappers[model.parameterization](unet, model.alphas_cumprod, quantize=quantize)


class LCMDenoiser(nn.Module):
    """The consistency-model output of a Latent Consistency Model (Luo et al. 2023, eq. 9; Song et al. 2023, §3):
    D_lcm = c_skip(t) x_t + c_out(t) D with c_skip = s**2 / ((10 t)**2 + s**2), c_out = 10 t / sqrt((10 t)**2 + s**2),
    s = 0.5, where x_t = x / sqrt(sigma**2 + 1) is the model's input (as diffusers' LCMScheduler). The boundary
    condition makes D_lcm = x_t at t = 0; for t >= 19 it changes D by < 1e-5.

    denoiser: a DiscreteEpsDenoiser / DiscreteVDenoiser of the distilled model.
    """

    def __init__(self, denoiser, timestep_scaling=10.0, sigma_data=0.5):
        super().__init__()
        self.denoiser = denoiser
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    # The schedule is the wrapped model's, so schedules can be built from either.
    sigmas = property(lambda self: self.denoiser.sigmas)
    sigma_min = property(lambda self: self.denoiser.sigma_min)
    sigma_max = property(lambda self: self.denoiser.sigma_max)
    sigma_to_t = property(lambda self: self.denoiser.sigma_to_t)
    t_to_sigma = property(lambda self: self.denoiser.t_to_sigma)

    def forward(self, x, sigma, **extra):
        scaled_t = _expand(self.denoiser.sigma_to_t(sigma, quantize=True) * self.timestep_scaling, x)
        c_skip = self.sigma_data ** 2 / (scaled_t ** 2 + self.sigma_data ** 2)
        c_out = scaled_t / (scaled_t ** 2 + self.sigma_data ** 2) ** 0.5
        x_t = x * _expand((sigma ** 2 + 1) ** -0.5, x)
        return c_skip * x_t + c_out * self.denoiser(x, sigma, **extra)


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------------

def _as_kwargs(cond):
    """A conditioning is a tensor (passed to the model as `context`, SD1/SD2) or a dict of keyword tensors (SDXL:
    {'context': ..., 'y': ...}; inpainting models add their image conditioning here)."""
    return dict(cond) if isinstance(cond, dict) else {'context': cond}


def _can_batch(cond_kwargs, uncond_kwargs):
    """Both conditionings can go through the model in one batch: same keys, all tensors, same shapes per key."""
    return cond_kwargs.keys() == uncond_kwargs.keys() and all(
        isinstance(cond_kwargs[k], torch.Tensor) and isinstance(uncond_kwargs[k], torch.Tensor)
        and cond_kwargs[k].shape[1:] == uncond_kwargs[k].shape[1:] for k in cond_kwargs)


def prompt_schedule(entries, sigmas):
    """Per-step conditioning for prompt editing ([from:to:when] in A1111 prompts), as a function of the noise level.

    entries: [(end_at_step, cond), ...] sorted by step, as A1111's prompt parser produces them: cond is used for the
    steps i <= end_at_step, the last entry for all later steps. sigmas: the schedule [n + 1] being sampled.
    The step of a model call is read from its noise level: step i covers sigmas[i] >= sigma > sigmas[i + 1], so
    the extra evaluations of second-order samplers inside a step (and the sigma_hat of churn) stay in that step.
    Returns cond_at(sigma [B]) -> cond, to pass to CFGDenoiser as `cond` or `uncond`.
    """
    if not entries:
        raise ValueError("prompt_schedule needs at least one (end_at_step, cond) entry")
    levels = [float(s) for s in sigmas[1:]]

    def cond_at(sigma):
        level = float(sigma.reshape(-1)[0])
        # Count the schedule levels below step i's start that are still >= sigma (1e-5 relative slack absorbs the
        # float round-off of samplers that recompute sigma, e.g. exp(-t)).
        step = sum(1 for s in levels if s >= level * (1 - 1e-5))
        for end_at_step, cond in entries:
            if step <= end_at_step:
                return cond
        return entries[-1][1]

    return cond_at


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + cond_scale (D_cond - D_uncond).

    forward(x, sigma, cond, uncond, cond_scale, guidance_rescale=0.0): x [B, ...], sigma [B]; cond / uncond: a tensor
    (given to the model as `context`), a dict of keyword tensors, or a function of sigma returning either (see
    prompt_schedule). Pass them through the samplers' extra_args. Cond and uncond go through the model as one batch
    of 2B (cond first) when their tensors have matching shapes, else as two calls; with cond_scale == 1 the uncond
    pass is skipped. guidance_rescale (phi, Lin et al. 2023 §3.4) rescales the guided noise prediction to the
    standard deviation of the conditional one and mixes: eps = phi * eps_rescaled + (1 - phi) * eps_cfg (computed on
    eps = (x - D) / sigma, as diffusers does).
    """

    def __init__(self, denoiser):
        super().__init__()
        self.inner_model = denoiser

    def forward(self, x, sigma, cond, uncond, cond_scale, guidance_rescale=0.0):
        cond = cond(sigma) if callable(cond) else cond
        cond_kwargs = _as_kwargs(cond)
        if cond_scale == 1:
            return self.inner_model(x, sigma, **cond_kwargs)
        uncond_kwargs = _as_kwargs(uncond(sigma) if callable(uncond) else uncond)
        if _can_batch(cond_kwargs, uncond_kwargs):
            both = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                    **{k: torch.cat([cond_kwargs[k], uncond_kwargs[k]]) for k in cond_kwargs})
            denoised_cond, denoised_uncond = both.chunk(2)
        else:
            denoised_cond = self.inner_model(x, sigma, **cond_kwargs)
            denoised_uncond = self.inner_model(x, sigma, **uncond_kwargs)
        denoised = denoised_uncond + (denoised_cond - denoised_uncond) * cond_scale
        if guidance_rescale:
            # eps is proportional to x - D at fixed sigma, so the std ratio can be taken on x - D directly.
            dims = list(range(1, x.ndim))
            ratio = (x - denoised_cond).std(dim=dims, keepdim=True) / (x - denoised).std(dim=dims, keepdim=True)
            denoised = x - (x - denoised) * (1 + guidance_rescale * (ratio - 1))
        return denoised


class GuidanceIntervalDenoiser(CFGDenoiser):
    """Classifier-free guidance applied only at noise levels sigma_lo <= sigma <= sigma_hi, the plain conditional
    denoiser elsewhere (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models", §3: guidance at high noise levels pulls samples towards a few modes,
    at low ones it does little, so both ends go without it). Outside the interval the unconditional pass is skipped.

    forward(x, sigma, cond, uncond, cond_scale, guidance_rescale=0.0): as CFGDenoiser; x [B, ...], sigma [B], each
    image judged by its own sigma.
    """

    def __init__(self, denoiser, sigma_lo, sigma_hi):
        super().__init__(denoiser)
        if not 0 <= sigma_lo <= sigma_hi:
            raise ValueError(f"the guidance interval needs 0 <= sigma_lo <= sigma_hi, got [{sigma_lo}, {sigma_hi}]")
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)

    def forward(self, x, sigma, cond, uncond, cond_scale, guidance_rescale=0.0):
        guided = (sigma >= self.sigma_lo) & (sigma <= self.sigma_hi)  # [B]
        if guided.all():
            return super().forward(x, sigma, cond, uncond, cond_scale, guidance_rescale)
        conditional = super().forward(x, sigma, cond, uncond, 1.0)
        if not guided.any():
            return conditional
        return torch.where(_expand(guided, x), super().forward(x, sigma, cond, uncond, cond_scale, guidance_rescale),
                           conditional)


def guidance_interval(sigma_lo, sigma_hi):
    """A `guidance` for sample.generate: denoiser -> GuidanceIntervalDenoiser(denoiser, sigma_lo, sigma_hi)."""
    def guided(denoiser):
        return GuidanceIntervalDenoiser(denoiser, sigma_lo, sigma_hi)
    return guided
