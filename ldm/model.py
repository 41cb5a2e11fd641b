"""`LatentDiffusion`: the container whose attribute paths are a Stable Diffusion checkpoint's top-level keys.

    model.diffusion_model.*           UNetModel
    first_stage_model.*               AutoencoderKL
    cond_stage_model.*                text encoder (SD1: CLIP-L, SD2: OpenCLIP-H)
    conditioner.embedders.0/1.*       SDXL: CLIP-L and OpenCLIP-bigG
    alphas_cumprod                    the discrete DDPM schedule ᾱ_t, t = 0..999

so `state_dict()` is the file and loading is a strict `load_state_dict`.
"""
from dataclasses import asdict

import torch
from torch import nn

from .clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from .layers import timestep_embedding
from .presets import Preset, TextEncoderConfig
from .schedule import scaled_linear_alphas_cumprod
from .unet import UNetModel
from .vae import AutoencoderKL


def preset_alphas_cumprod(preset: Preset) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 of the preset's "scaled linear" DDPM schedule, float32 [T]."""
    return scaled_linear_alphas_cumprod(preset.timesteps, preset.linear_start, preset.linear_end).float()


def make_text_encoder(config: TextEncoderConfig) -> nn.Module:
    common = dict(vocab_size=config.vocab_size, width=config.width, layers=config.layers, heads=config.heads,
                  context_length=config.context_length, layer=config.layer, final_norm=config.final_norm)
    if config.layout == "clip":
        return FrozenCLIPEmbedder(**common)
    return FrozenOpenCLIPEmbedder(**common, embed_dim=config.embed_dim, return_pooled=config.return_pooled)


# Width of each Fourier-embedded size/crop number in SDXL's vector conditioning.
SIZE_EMBED_DIM = 256


class SDXLConditioner(nn.Module):
    """SDXL's conditioning (Podell et al. 2023, §2.2): two text towers plus Fourier-embedded size/crop conditions.

    Only `embedders.0` (CLIP-L) and `embedders.1` (OpenCLIP-bigG) have weights; the size embedders of the original
    (`embedders.2..4`) are the parameter-free `timestep_embedding` applied in `vector`.
    context = concat(CLIP-L penultimate [B, 77, 768], bigG penultimate [B, 77, 1280]) -> [B, 77, 2048];
    y = concat(pooled bigG [B, 1280], emb(orig h, w), emb(crop top, left), emb(target h, w)) -> [B, 1280 + 6·256].
    """

    def __init__(self, clip_l: FrozenCLIPEmbedder, clip_g: FrozenOpenCLIPEmbedder):
        super().__init__()
        self.embedders = nn.ModuleList([clip_l, clip_g])

    def encode_tokens(self, tokens_l: torch.Tensor, tokens_g: torch.Tensor, clip_skip: int = 1):
        """tokens_*: [B, 77] (CLIP-L pads with EOS, bigG with 0) -> (context [B, 77, 2048], pooled [B, 1280])."""
        context_g, pooled = self.embedders[1].encode_tokens(tokens_g, clip_skip)
        context_l = self.embedders[0].encode_tokens(tokens_l, clip_skip)
        return torch.cat([context_l, context_g.to(context_l.dtype)], dim=-1), pooled

    @staticmethod
    def vector(pooled: torch.Tensor, original_size: tuple[int, int], crop_coords_top_left: tuple[int, int],
               target_size: tuple[int, int]) -> torch.Tensor:
        """The UNet's `y`: pooled [B, 1280] and the (h, w) / (top, left) / (h, w) micro-conditions in pixels."""
        sizes = torch.tensor([*original_size, *crop_coords_top_left, *target_size], device=pooled.device)
        emb = timestep_embedding(sizes, SIZE_EMBED_DIM).reshape(1, -1)  # [1, 6·256]
        return torch.cat([pooled, emb.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=-1)

    def forward(self, texts: list[str], original_size=(1024, 1024), crop_coords_top_left=(0, 0),
                target_size=(1024, 1024), clip_skip: int = 1) -> dict[str, torch.Tensor]:
        device = self.embedders[0].transformer.text_model.embeddings.token_embedding.weight.device
        context, pooled = self.encode_tokens(self.embedders[0].tokenizer(texts).to(device),
                                             self.embedders[1].tokenizer(texts).to(device), clip_skip)
        return {"context": context, "y": self.vector(pooled, original_size, crop_coords_top_left, target_size)}


class DiffusionWrapper(nn.Module):
    """Holds the UNet at `model.diffusion_model`, the path every original checkpoint uses."""

    def __init__(self, diffusion_model: UNetModel):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, timesteps, context, y=None, control=None):
        return self.diffusion_model(x, timesteps, context, y, control)


class LatentDiffusion(nn.Module):
    """A whole Stable Diffusion model built from a Preset (Rombach et al. 2022).

    The prediction type, family and default resolution live only in `preset`; `parameterization` and `is_sdxl` read
    it, so no second copy can disagree with it.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        self.preset = preset
        self.model = DiffusionWrapper(UNetModel(**asdict(preset.unet)))
        self.first_stage_model = AutoencoderKL(**asdict(preset.vae))
        encoders = [make_text_encoder(c) for c in preset.text]
        if self.is_sdxl:
            self.conditioner = SDXLConditioner(*encoders)
        else:
            (self.cond_stage_model,) = encoders
        self.scale_factor = preset.scale_factor
        self.register_buffer("alphas_cumprod", preset_alphas_cumprod(preset))

    @property
    def parameterization(self) -> str:
        """What the UNet predicts: "eps" (noise) or "v" (Salimans & Ho 2022, v = ᾱ½ ε − (1−ᾱ)½ x₀);
        `preset.prediction`, read-only (build the model from `dataclasses.replace(preset, prediction=...)`)."""
        return self.preset.prediction

    @property
    def is_sdxl(self) -> bool:
        """SDXL's two text towers sit under `conditioner` and its UNet takes the vector `y`; the one test for it."""
        return self.preset.family == "sdxl"

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.time_embed[0].weight.device

    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (a posterior sample × scale_factor)."""
        return self.first_stage_model.encode(images).sample(generator) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.first_stage_model.decode(latents / self.scale_factor)

    def encode_prompt(self, texts: list[str], clip_skip: int = 1, **size_conditions) -> dict[str, torch.Tensor]:
        """Prompts -> the UNet's conditioning: {"context": [B, 77, D]} (+ "y": [B, 2816] for SDXL, whose size
        conditions original_size / crop_coords_top_left / target_size may be given as keyword arguments)."""
        if self.is_sdxl:
            return self.conditioner(texts, clip_skip=clip_skip, **size_conditions)
        if size_conditions:
            raise ValueError(f"size conditions {sorted(size_conditions)} only apply to SDXL models")
        tokens = self.cond_stage_model.tokenizer(texts).to(self.device)
        return {"context": self.cond_stage_model.encode_tokens(tokens, clip_skip)}

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's raw prediction (ε or v, see `parameterization`) for latents x: [B, C, h, w] at timesteps t: [B];
        `control`: ControlNet residuals (ldm.controlnet) added to the UNet's skips and middle block."""
        return self.model(x, t, context, y, control)
