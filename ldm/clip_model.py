"""CLIP with both towers (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
§2.4) in OpenAI's / open_clip's key layout: the model, its sizes read off the tensors, and its files.

CLIP embeds an image and a text into one space; their cosine similarity says how well the image shows the text. The
model lives here, below every user of it: metrics (CLIP score, CLIP-feature distances: metrics.clip), training (method
"clip": train.methods.clip) and `ldm.assemble` (its text tower as an SD2-family text encoder).

The module tree is the checkpoint: OpenAI's released state dicts and open_clip's (which keep OpenAI's names) have the
text tower at the root (`token_embedding`, `positional_embedding`, `transformer.resblocks.N`, `ln_final`,
`text_projection`, `logit_scale`) and the image tower under `visual.` (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.N`, `ln_post`, `proj`). The text tower is `ldm.clip`'s
OpenCLIP text model (the same layout, the same causal blocks, the SD2 encoder's code); the image tower is the ViT of
Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words", eq. 1-4) with CLIP's extra LayerNorm before the blocks.
"""
import math
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from einops import rearrange
from torch import nn

from .checkpoint import CheckpointError, read_metadata, read_state_dict, save_state_dict
from .clip import ACTIVATIONS, OpenCLIPTextModel, OpenCLIPTransformer
from .tokenizer import CLIPTokenizer

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
