"""Step progress, live preview and interruption for a generate() call, observed at the UNet.

sample.generate.generate() has no per-step callback, so the web UI watches the one module every sampler must call:
a forward hook on the UNet (`model.unet`) for the duration of one call. Each UNet evaluation

  - first checks the job's interrupt / skip flags and raises out of generate() (which restores LoRA, tiling and VAE
    swaps on the way out, whatever the exception);
  - then turns the UNet's input and prediction into the denoised estimate x0 of the first image, for the preview:
    the UNet sees x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε, so x0 = (x_t − sqrt(1−ᾱ)·ε̂) / sqrt(ᾱ) for ε-prediction and
    x0 = sqrt(ᾱ)·x_t − sqrt(1−ᾱ)·v̂ for v-prediction (Salimans & Ho 2022, §4), ᾱ at the call's (fractional)
    timestep;
  - and measures progress by the timestep: a sampling pass runs from its first timestep t₀ down towards 0, so
    1 − t/t₀ is the fraction of the pass done, whatever the sampler's number of evaluations per step. Hires fix runs
    a second pass, recognised by the timestep jumping back up.
"""
import contextlib

import torch

from samplers import DiscreteSchedule

from .worker import JobControl

# A rise of the timestep by more than this starts the hires fix's second pass (samplers that add noise back, such
# as Restart, rise by less within one pass).
_NEW_PASS_RISE = 300.0


class UNetMonitor:
    """Reports one generate() call of `passes` sampling passes (2 with hires fix) to `control`."""

    def __init__(self, model, control: JobControl, passes: int = 1):
        self.control = control
        self.passes = passes
        self.out_channels = model.preset.unet.out_channels
        self.predicts_v = model.parameterization == "v"
        alphas_cumprod = model.alphas_cumprod.detach().double().cpu()
        self.schedule = DiscreteSchedule(((1 - alphas_cumprod) / alphas_cumprod).sqrt(), quantize=False)
        self.pass_index = 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.fraction = 0.0

    def _before(self, module, args, kwargs) -> None:
        self.control.check()

    def _after(self, module, args, kwargs, output) -> None:
        x_t = (args[0] if args else kwargs["x"])[:1, :self.out_channels].detach().float()
        t = float((args[1] if len(args) > 1 else kwargs["timesteps"]).reshape(-1)[0])
        if self.first_t is None:
            self.first_t = t
        elif self.pass_index + 1 < self.passes and t > self.last_t + _NEW_PASS_RISE:
            self.pass_index, self.first_t = self.pass_index + 1, t
        self.last_t = t
        within = 1 - t / self.first_t if self.first_t > 0 else 1.0
        self.fraction = max(self.fraction, (self.pass_index + within) / self.passes)
        sigma = self.schedule.t_to_sigma(torch.tensor(t, dtype=torch.float32).clamp(0, len(self.schedule.sigmas) - 1))
        alpha_bar = float(1 / (1 + sigma ** 2))
        prediction = output[:1].detach().float()
        if self.predicts_v:
            x0 = alpha_bar ** 0.5 * x_t - (1 - alpha_bar) ** 0.5 * prediction
        else:
            x0 = (x_t - (1 - alpha_bar) ** 0.5 * prediction) / alpha_bar ** 0.5
        self.control.report(self.fraction, x0)

    @contextlib.contextmanager
    def attached(self, unet: torch.nn.Module):
        handles = [unet.register_forward_pre_hook(self._before, with_kwargs=True),
                   unet.register_forward_hook(self._after, with_kwargs=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
