"""Preview images (`preview_images`, or their latents `preview_latents`): a small txt2img loop for validation images,
DreamBooth class images and the forgetting monitor's base generations, built from the `samplers` functions.

Euler on the probability-flow ODE over a Karras schedule, with classifier-free guidance. Its noise comes from its own
seeded generator and it draws nothing from torch's global RNG, so calling it mid-training leaves the training's random
streams (and so exact resume) untouched.
"""
import numpy as np
import torch
from PIL import Image

from samplers.sampling import sample_euler
from samplers.schedules import get_sigmas_karras
from samplers.wrappers import CFGDenoiser, model_denoiser


@torch.no_grad()
def preview_latents(model, conditioner, prompts: list[str], width: int, height: int, steps: int = 20,
                    cfg_scale: float = 7.0, seed: int = 0) -> torch.Tensor:
    """Sampled latents [B, C, height / f, width / f] for `prompts`; `conditioner(captions) -> {"context", "y"?}` (see
    train.embedding.Conditioner)."""
    # Previews snap noise levels to training timesteps (quantize), as the trainer always has.
    denoiser = model_denoiser(model, quantize=True).to(model.device)
    guided = CFGDenoiser(denoiser)
    sigmas = get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item(), device=model.device)
    factor = model.first_stage_model.downscale
    channels = model.preset.unet.out_channels
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), channels, height // factor, width // factor), generator=generator)
    x = x.to(device=model.device, dtype=model.dtype) * sigmas[0]
    cond, uncond = conditioner(prompts), conditioner([""] * len(prompts))
    return sample_euler(guided, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "cond_scale": cfg_scale},
                        disable=True)


@torch.no_grad()
def decode_images(model, latents: torch.Tensor) -> list[Image.Image]:
    """Latents [B, C, h, w] (scaled, as sampled) -> RGB images."""
    images = model.decode_latents(latents.to(model.device, model.dtype)).float().clamp(-1, 1)  # [B, 3, H, W]
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def preview_images(model, conditioner, prompts: list[str], width: int, height: int, steps: int = 20,
                   cfg_scale: float = 7.0, seed: int = 0) -> list[Image.Image]:
    """Images for `prompts` (`preview_latents`, decoded)."""
    return decode_images(model, preview_latents(model, conditioner, prompts, width, height, steps, cfg_scale, seed))
