"""CLIP score and the CLIP embeddings the metrics use: OpenAI's image preprocessing, image and text embeddings, cosine
scores and zero-shot logits over a model of ldm.clip_model (CLIP with both towers, its files and sizes).

CLIP score (Hessel et al. 2021, "CLIPScore"; in the form torchmetrics computes): 100 · cos(E_image, E_text) per
image-caption pair; the batch score is max(mean, 0).
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.clip_model import CLIP, IMAGE_MEAN, IMAGE_STD


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
