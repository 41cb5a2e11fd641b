"""The discrete DDPM noise schedule of Stable Diffusion, which the model owns as its `alphas_cumprod` buffer.

Samplers never compute it: the denoiser wrappers receive ᾱ as data (`model.alphas_cumprod`).
"""
import torch


def scaled_linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) of the "scaled linear" schedule (the latent-diffusion configs' `linear_start/end`):
    β evenly spaced in √β from beta_start to beta_end, then squared (Rombach et al. 2022; Ho et al. 2020, eq. 4).
    float64 [num_timesteps]."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)
