"""The training losses: noise prediction on the discrete DDPM forward process, and the VAE's reconstruction + KL.

Forward process (Ho et al. 2020, eq. 4) on the model's schedule ᾱ_t, t = 0..999:
    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε,  ε ~ N(0, I)
Targets: ε, or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4), per `model.parameterization`.
Per-sample weight, with SNR_t = ᾱ_t / (1 − ᾱ_t):
    min-SNR-γ (Hang et al. 2023, eq. 10):  ε target: min(SNR, γ) / SNR;  v target: min(SNR, γ) / (SNR + 1)
    (the second is the first rewritten for the v loss, whose MSE equals (SNR + 1) times the x_0 error).
Noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): ε += offset · n with n ~ N(0, I) of shape [B, C, 1, 1],
which lets the model change an image's mean brightness.
"""
import torch
from torch import nn

from samplers.wrappers import rescale_zero_terminal_snr
from .config import RECONSTRUCTION_LOSSES


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Loss weight per sample, snr_t: [B] -> [B]; gamma = 0 means no weighting (all ones)."""
    if not gamma:
        return torch.ones_like(snr_t)
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1) if prediction == "v" else clipped / snr_t


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: rescale sqrt(ᾱ) so the last timestep is (almost) pure noise; the first is unchanged.

    The last ᾱ is set to the small positive value A1111 and the samplers use instead of exactly 0 (sigma stays finite).
    The paper pairs this with v-prediction: at zero SNR an ε-model sees no signal at all at t = 999.
    """
    return rescale_zero_terminal_snr(alphas_cumprod.double()).float()


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) for x0, noise: [B, C, h, w] at integer timesteps [B]."""
    abar = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype)[:, None, None, None]  # [B, 1, 1, 1]
    signal, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = signal * x0 + sigma * noise
    target = signal * noise - sigma * x0 if prediction == "v" else noise
    return x_t, target


class DiffusionObjective(nn.Module):
    """Per-sample noise-prediction loss of a LatentDiffusion model.

    Holds every module with trainable weights (the model, a LoRA network, textual-inversion vectors) so that one
    DistributedDataParallel wrapper sees them all. `conditioner(captions, sizes) -> {"context", "y"?}` turns captions
    into the UNet's conditioning (it may apply textual-inversion vectors); it runs with gradients only when the text
    side is trained.
    """

    def __init__(self, model, conditioner, extra: nn.Module | None = None, min_snr_gamma: float = 0.0,
                 text_trained: bool = False):
        super().__init__()
        self.model = model
        self.conditioner = conditioner
        self.extra = extra  # LoRA network or embeddings: registered here so DDP syncs their gradients
        self.min_snr_gamma = min_snr_gamma
        self.text_trained = text_trained

    def forward(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: dict | None = None,
                captions: list[str] | None = None, original_sizes=None, crops=None, target_sizes=None,
                **inputs) -> torch.Tensor:
        """latents, noise: [B, C, h, w]; timesteps: [B] int; either cond {"context": [B, 77, D], "y"?} or the
        captions (with SDXL's per-sample size conditions) to encode here; `inputs`: a method's further model inputs
        (Method.model_inputs, e.g. ControlNet's hint) -> loss [B]."""
        model = self.model
        if cond is None:
            with torch.set_grad_enabled(self.text_trained and torch.is_grad_enabled()):
                cond = self.conditioner(captions, original_sizes, crops, target_sizes)
        x_t, target = noisy_latents(latents, noise, timesteps, model.alphas_cumprod, model.parameterization)
        prediction = self.predict(x_t, timesteps, cond, **inputs)
        mse = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
        weight = min_snr_weight(snr(model.alphas_cumprod.to(latents.device)[timesteps].double()).float(),
                                self.min_snr_gamma, model.parameterization)
        return mse * weight

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The UNet's prediction (ε or v) for x_t: [B, C, h, w]."""
        return self.model.apply_model(x_t, timesteps, cond["context"], cond.get("y"))


class ControlNetObjective(DiffusionObjective):
    """The noise-prediction loss of the frozen model driven by the trained ControlNet (`extra`) through the control
    image `hint`: [B, 3, H, W] in [0, 1] (Zhang et al. 2023, eq. 2)."""

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict, hint: torch.Tensor) -> torch.Tensor:
        control = self.extra(x_t, hint, timesteps, cond["context"], cond.get("y"))
        return self.model.apply_model(x_t, timesteps, cond["context"], cond.get("y"), control=control)


class VAEObjective(nn.Module):
    """The autoencoder's loss per sample: reconstruction (L1 or MSE) + kl_weight · KL(q(z|x) ‖ N(0, I)).

    CompVis sums both terms over elements (LDM's `LPIPSWithDiscriminator` without its perceptual and adversarial
    parts, with L1 reconstruction); here both sums are divided by the image's element count, which keeps their
    ratio, so kl_weight means the same as CompVis's `kl_weight` (1e-6 for SD's VAE) while the loss stays O(1) for any
    image size.

    MSE is offered because L1's gradient has the same magnitude for every pixel whatever its error: on images that
    are mostly flat background (the shapes domain) the median-seeking L1 solution lets small coloured regions drift
    to grey, while MSE's gradient grows with the error and makes the hue of those few pixels count
    (docs/SHAPES.md measures the difference).
    """

    def __init__(self, model, kl_weight: float, reconstruction_loss: str = "l1"):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            allowed = " or ".join(repr(name) for name in RECONSTRUCTION_LOSSES)
            raise ValueError(f"reconstruction_loss must be {allowed}, got {reconstruction_loss!r}")
        self.model = model
        self.kl_weight = kl_weight
        self.reconstruction_loss = reconstruction_loss

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W] in [-1, 1]; noise: [B, z, H/f, W/f] for the posterior sample -> loss [B]."""
        vae = self.model.first_stage_model
        moments = vae.quant_conv(vae.encoder(pixels))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + (0.5 * logvar).exp() * noise
        reconstruction = vae.decoder(vae.post_quant_conv(z))
        elements = pixels[0].numel()
        error = pixels.float() - reconstruction.float()
        error = error.abs() if self.reconstruction_loss == "l1" else error.square()
        rec = error.sum(dim=(1, 2, 3)) / elements
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(dim=(1, 2, 3)) / elements
        return rec + self.kl_weight * kl
