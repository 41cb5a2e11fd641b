"""CLIP with both towers, for CLIP score and CLIP-feature distances, in OpenAI's / open_clip's key layout.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", §2.4) embeds an
image and a text into one space; their cosine similarity says how well the image shows the text.

The module tree is the checkpoint: OpenAI's released state dicts and open_clip's (which keep OpenAI's names) have the
text tower at the root (`token_embedding`, `positional_embedding`, `transformer.resblocks.N`, `ln_final`,
`text_projection`, `logit_scale`) and the image tower under `visual.` (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N`, `ln_post`, `proj`). The text tower is `ldm.clip`'s
OpenCLIP text model (the same layout, the same causal blocks, the SD2 encoder's code); the image tower is the ViT of
Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words", eq. 1-4) with CLIP's extra LayerNorm before the blocks.

CLIP score (Hessel et al. 2021, "CLIPScore"; in the form torchmetrics computes): 100 · cos(E_image, E_text) per
image-caption pair; the batch score is max(mean, 0).
"""
import math
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from ldm.checkpoint import CheckpointError, read_metadata, read_state_dict, save_state_dict
from ldm.clip import ACTIVATIONS, OpenCLIPTextModel, OpenCLIPTransformer
from ldm.tokenizer import CLIPTokenizer

# Per-channel statistics OpenAI's preprocessing normalises with (their training images').
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Entries of OpenAI's TorchScript state dict that are hyper-parameters, not weights.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
# Metadata keys `save_clip` writes for what the weights cannot show; `load_clip` reads them back.
METADATA_ACTIVATION, METADATA_VISION_HEADS, METADATA_TEXT_HEADS = "clip.activation", "clip.vision_heads", \
    "clip.text_heads"


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    image_resolution: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int = 77
    vocab_size: int = 49408
    activation: str = "quick_gelu"  # OpenAI's models; open_clip's LAION-trained ones use "gelu"

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], activation: str = "quick_gelu",
                        vision_head_width: int = 64, text_head_width: int = 64) -> "CLIPConfig":
        """Read the sizes off the tensors, as OpenAI's `build_model` does.

        Head counts are not visible in weights: they are width / head width, 64 for OpenAI's models (open_clip's
        ViT-H/14 and bigG/14 image towers use 80 and 104). The activation is not visible either.
        """
        def count(pattern: str) -> int:
            return len({m.group(1) for key in state_dict if (m := re.fullmatch(pattern, key))})

        try:
            vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
            grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
            text_width = state_dict["ln_final.weight"].shape[0]
            return cls(embed_dim=state_dict["text_projection"].shape[1], image_resolution=patch_size * grid,
                       patch_size=patch_size, vision_width=vision_width,
                       vision_layers=count(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
                       vision_heads=vision_width // vision_head_width, text_width=text_width,
                       text_layers=count(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
                       text_heads=text_width // text_head_width,
                       context_length=state_dict["positional_embedding"].shape[0],
                       vocab_size=state_dict["token_embedding.weight"].shape[0], activation=activation)
        except KeyError as error:
            raise CheckpointError(f"not a CLIP state dict in OpenAI/open_clip layout: it has no {error} tensor "
                                  f"(keys start with {sorted(state_dict)[:4]})") from None


# Hyper-parameters of OpenAI's released models (Radford et al. 2021, tables 19-20).
PRESETS = {
    "ViT-B/32": CLIPConfig(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B/16": CLIPConfig(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-L/14": CLIPConfig(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L/14@336px": CLIPConfig(768, 336, 14, 1024, 24, 16, 768, 12, 12),
    # Not OpenAI's: a small CLIP for 64×64 images (8×8 patches), trained here on the shapes renders
    # (configs/tiny-shapes-clip.toml). Its text tower has the shipped shapes model's text size (width 80, 4 layers,
    # 20-wide heads) and exact GELU, so it is also an SD2-family (OpenCLIP layout) text encoder as it stands.
    "shapes-64": CLIPConfig(embed_dim=80, image_resolution=64, patch_size=8, vision_width=128, vision_layers=4,
                            vision_heads=4, text_width=80, text_layers=4, text_heads=4, activation="gelu"),
}


class VisionTransformer(nn.Module):
    """CLIP's image tower: patches -> [class token, patch tokens] + positions -> blocks -> class token -> projection."""

    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, embed_dim: int,
                 activation: str):
        super().__init__()
        grid = resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenCLIPTransformer(width, layers, heads, activation, causal=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, R, R] normalised with IMAGE_MEAN / IMAGE_STD -> image embeddings [B, embed_dim]."""
        patches = rearrange(self.conv1(pixels), "b w gh gw -> b (gh gw) w")  # [B, grid², W]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # [B, 1, W]
        x = self.ln_pre(torch.cat([cls, patches], dim=1) + self.positional_embedding)  # [B, grid² + 1, W]
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(OpenCLIPTextModel):
    """Both towers: the text tower's modules at the root (inherited), the image tower at `visual`."""

    def __init__(self, config: CLIPConfig):
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation {config.activation!r} is not one of {sorted(ACTIVATIONS)}")
        super().__init__(config.vocab_size, config.text_width, config.text_layers, config.text_heads,
                         config.embed_dim, config.context_length, config.activation)
        self.config = config
        self.visual = VisionTransformer(config.image_resolution, config.patch_size, config.vision_width,
                                        config.vision_layers, config.vision_heads, config.embed_dim, config.activation)

    @cached_property
    def tokenizer(self) -> CLIPTokenizer:
        # OpenAI's `clip.tokenize` pads with 0; with causal attention the padding never reaches the EOS token anyway.
        return CLIPTokenizer(pad_token_id=0, context_length=self.config.context_length)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, N] (BOS ... EOS, padded) -> text embeddings [B, embed_dim]: the final state at EOS, projected."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [B, N, W]
        for block in self.transformer.resblocks:
            x = block(x)
        eos = tokens.argmax(dim=-1)  # EOS (49407) is the largest id in each row
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), eos]) @ self.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, R, R] from `preprocess` -> image embeddings [B, embed_dim]."""
        return self.visual(pixels)

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype


def load_clip(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              activation: str | None = None, vision_head_width: int | None = None,
              text_head_width: int | None = None) -> CLIP:
    """CLIP from a .safetensors/.pt/.bin state dict in OpenAI/open_clip layout (not a TorchScript archive), in eval
    mode. The sizes are read from the tensors; the activation and head layout, which no tensor shows, come from the
    arguments when given, else from the metadata `save_clip` writes, else OpenAI's conventions (quick_gelu, 64-wide
    heads; see `CLIPConfig.from_state_dict`)."""
    source = os.fspath(path)
    state_dict = read_state_dict(source, device=device or "cpu", dtype=dtype)
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    metadata = read_metadata(source)
    try:
        config = CLIPConfig.from_state_dict(state_dict, activation or metadata.get(METADATA_ACTIVATION, "quick_gelu"),
                                            vision_head_width or 64, text_head_width or 64)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    if vision_head_width is None and METADATA_VISION_HEADS in metadata:
        config = replace(config, vision_heads=int(metadata[METADATA_VISION_HEADS]))
    if text_head_width is None and METADATA_TEXT_HEADS in metadata:
        config = replace(config, text_heads=int(metadata[METADATA_TEXT_HEADS]))
    with torch.device("meta"):
        model = CLIP(config)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match a CLIP of {config}: {len(missing)} missing key(s) "
                              f"{missing[:6]}, {len(unexpected)} unexpected key(s) {unexpected[:6]}")
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit a CLIP of {config}: {error}") from None
    return model.eval().requires_grad_(False)


def save_clip(model: CLIP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write `model` as an OpenAI-layout .safetensors file (atomically), in `dtype` if given, with its activation
    and head counts in the metadata so that `load_clip` rebuilds exactly this model. The text tower's keys (those
    without `visual.`) are also an OpenCLIP text encoder's (`ldm.clip.OpenCLIPTextModel`)."""
    config = model.config
    state_dict = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                  for k, v in model.state_dict().items()}
    save_state_dict(state_dict, path, metadata={METADATA_ACTIVATION: config.activation,
                                                METADATA_VISION_HEADS: str(config.vision_heads),
                                                METADATA_TEXT_HEADS: str(config.text_heads)})


def _to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W] in [0, 1]; got shape {tuple(image.shape)}")
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def preprocess(images, resolution: int) -> torch.Tensor:
    """OpenAI CLIP's image preprocessing -> [N, 3, R, R] float32, normalised.

    `images`: PIL images, or tensors [3, H, W] / a batch [N, 3, H, W] in [0, 1] (quantised to 8 bits first). As OpenAI's
    `clip.load` transform: bicubic PIL resize of the shorter side to R (the longer side truncated), a centre crop of
    R x R, then per-channel normalisation with IMAGE_MEAN / IMAGE_STD.
    """
    batch = []
    for image in images:
        image = _to_pil(image)
        width, height = image.size
        scale = resolution / min(width, height)
        size = (resolution, int(height * scale)) if width <= height else (int(width * scale), resolution)
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
        left, top = int(round((size[0] - resolution) / 2)), int(round((size[1] - resolution) / 2))
        image = image.crop((left, top, left + resolution, top + resolution))
        batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    pixels = torch.stack(batch)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def image_embeddings(model: CLIP, images) -> torch.Tensor:
    """CLIP image embeddings (not normalised) of images as `preprocess` takes them -> [N, embed_dim] float32 (CPU)."""
    pixels = preprocess(images, model.config.image_resolution).to(model.device, model.dtype)
    return model.encode_image(pixels).float().cpu()


@torch.no_grad()
def text_embeddings(model: CLIP, texts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (not normalised) -> [N, embed_dim] float32 (CPU)."""
    return model.encode_text(model.tokenizer(texts).to(model.device)).float().cpu()


def cosine_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """100 · cos of each row pair of image [N, E] and text [N, E] embeddings -> [N] (Hessel et al.'s CLIP-S scale)."""
    return 100 * (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(dim=-1)


def zero_shot_logits(model: CLIP, image_features: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot classifier (Radford et al. 2021, §3.1.2): logit_scale · cos(image, class prompt) for image
    embeddings [N, E] and class-prompt embeddings [C, E] -> logits [N, C]; their softmax is p(y|x). logit_scale is
    the model's learnt inverse temperature exp(`logit_scale`)."""
    scale = model.logit_scale.detach().float().exp().cpu()
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).T


def clip_similarities(model: CLIP, images, prompts: list[str]) -> torch.Tensor:
    """100 · cos(image embedding, prompt embedding) for each pair; images as `preprocess` takes them -> [N] float32."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image; got {len(images)} images and {len(prompts)} prompts")
    return cosine_scores(image_embeddings(model, images), text_embeddings(model, prompts))


def clip_score(images, prompts: list[str], model: CLIP) -> float:
    """CLIP score of images (tensors [N, 3, H, W] in [0, 1] or PIL images) against their prompts: max(mean, 0) of
    100 · cos, torchmetrics' `clip_score`. Hessel et al. clip each pair at 0 before averaging; the two agree whenever
    no pair has a negative cosine, as for any real image and caption."""
    return max(clip_similarities(model, images, prompts).mean().item(), 0.0)
