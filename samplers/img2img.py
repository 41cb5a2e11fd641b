"""img2img and inpainting maths in sigma: where to start on the schedule, the starting latent, and the mask.

Mask convention here: mask = 1 where the image is regenerated, 0 where the original is kept (A1111's "nmask"), as a
tensor broadcastable to the latent, e.g. [B, 1, h, w].
"""

import torch
import torch.nn.functional as F
from torch import nn


def img2img_steps(steps, denoising_strength):
    """How many of a schedule's `steps` img2img runs, as A1111 does: t_enc + 1 with t_enc = int(min(strength, 0.999)
    * steps) (strength 0.75 with 20 steps runs 16; strength 0 still runs one)."""
    return int(min(denoising_strength, 0.999) * steps) + 1


def img2img_sigmas(sigmas, denoising_strength):
    """The tail of the schedule that img2img runs (img2img_steps of its steps): sigmas [steps + 1] -> the last
    img2img_steps + 1 of them."""
    steps = len(sigmas) - 1
    return sigmas[steps - img2img_steps(steps, denoising_strength):]


def initial_latent(init_latent, noise, sigma, noise_multiplier=1.0):
    """The img2img starting point: the encoded image noised to the first noise level, x = init + sigma * m * noise,
    where m is A1111's "noise multiplier for img2img" (values slightly above 1 add detail)."""
    return init_latent + noise * (noise_multiplier * float(sigma))


def apply_mask(x, init_latent, mask):
    """Keep the original where mask = 0: lerp(init_latent, x, mask)."""
    return torch.lerp(init_latent, x, mask)


class InpaintingDenoiser(nn.Module):
    """Inpainting with an ordinary (non-inpainting) model by blending at every model call:

    - before the call, the kept region of x is replaced by the original re-noised to the current level,
      init + sigma * noise, so the model sees a consistent image around the hole at every step;
    - after the call, the kept region of the denoised estimate is replaced by the original (A1111's blend), so every
      sampler's update moves that region along the original's trajectory.

    denoiser: D(x, sigma, **extra); init_latent: [B, C, h, w]; mask: 1 = regenerate (broadcastable);
    noise: the fixed noise tensor of the initial latent ([B, C, h, w]), so the re-noised original matches it.
    """

    def __init__(self, denoiser, init_latent, mask, noise):
        super().__init__()
        self.inner_model = denoiser
        self.init_latent, self.mask, self.noise = init_latent, mask, noise

    def forward(self, x, sigma, **extra):
        level = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
        x = apply_mask(x, self.init_latent + self.noise * level, self.mask)
        return apply_mask(self.inner_model(x, sigma, **extra), self.init_latent, self.mask)


def _gaussian_kernel(sigma):
    """1-D Gaussian of standard deviation sigma over 2 * int(2.5 sigma + 0.5) + 1 taps (A1111's kernel size),
    normalised to sum 1."""
    radius = int(2.5 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def blur_mask(mask, blur_x, blur_y=None):
    """A1111's "Mask blur": a separable Gaussian blur of standard deviation blur_x (horizontal) and blur_y (vertical,
    default blur_x), in pixels, with mirrored borders (edge pixel not repeated, as OpenCV's default). A1111 then
    rounds to 8 bits; this keeps full precision.

    mask: [..., H, W] float in [0, 1] -> same shape.
    """
    blur_y = blur_x if blur_y is None else blur_y
    shape = mask.shape
    image = mask.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    for sigma, dim in ((blur_x, -1), (blur_y, -2)):
        if sigma <= 0:
            continue
        kernel = _gaussian_kernel(sigma).to(image)
        radius = len(kernel) // 2
        if radius >= image.shape[dim]:
            raise ValueError(f"mask blur {sigma} needs a kernel radius of {radius} pixels, but the mask is only "
                             f"{image.shape[dim]} pixels along that axis; use a smaller blur")
        if dim == -1:
            image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode='reflect'), kernel.reshape(1, 1, 1, -1))
        else:
            image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode='reflect'), kernel.reshape(1, 1, -1, 1))
    return image.reshape(shape).to(mask.dtype)


def latent_mask(mask, latent_size, round_mask=True):
    """Pixel mask [B, 1, H, W] -> latent-resolution mask [B, 1, h, w] by area averaging (each latent pixel covers an
    8x8 block), rounded to {0, 1} by default as A1111 does for non-inpainting models ("mask_round")."""
    if mask.shape[-2] % latent_size[0] or mask.shape[-1] % latent_size[1]:
        raise ValueError(f"mask of size {tuple(mask.shape[-2:])} is not a multiple of the latent size "
                         f"{tuple(latent_size)}; resize the mask to the image size first")
    small = F.adaptive_avg_pool2d(mask.to(torch.float32), latent_size)
    return (small.round() if round_mask else small).to(mask.dtype)
