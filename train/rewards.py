"""Differentiable rewards for reward-guided latent consistency distillation (method lcm with lcm_reward).

RG-LCD (Li et al. 2024, "Reward Guided Latent Consistency Distillation", eq. 7) adds −β·R(D(f_θ(z_t, t)), c) to the
consistency loss: the student's one-step estimate of the image, decoded by the frozen autoencoder D, is scored
against its caption c by a differentiable reward model R, and the student climbs the reward's gradient while the
consistency loss keeps it on the teacher's trajectories. A consistency student cannot be better than the teacher's
probability-flow ODE it follows; the reward is what lets it be (here: the colour binding of two-object prompts).

REWARDS maps the config's `lcm_reward` name to a builder `(config, device) -> reward`, where
`reward(images [B, 3, H, W] in [-1, 1], captions: list[str]) -> [B]` (higher is better) must be differentiable in
the images and keep its own weights frozen. Add an entry to train with your own reward (an aesthetic predictor, a
detector) without editing this file; `lcm_reward_model` names the file a builder reads.
"""
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.clip_model import IMAGE_MEAN, IMAGE_STD, load_clip
from .config import ConfigError, TrainConfig

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]


def clip_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Decoded images [B, 3, H, W] in [-1, 1] -> CLIP's normalised input [B, 3, R, R], differentiably: bicubic
    (antialiased) resize of the shorter side to R and a centre crop, as OpenAI's preprocessing does with PIL."""
    pixels = ((images.float() + 1) / 2).clamp(0, 1)
    height, width = pixels.shape[-2:]
    if min(height, width) != resolution:
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (pixels.shape[-2] - resolution) // 2, (pixels.shape[-1] - resolution) // 2
    pixels = pixels[..., top:top + resolution, left:left + resolution]
    mean = torch.tensor(IMAGE_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def clip_reward(config: TrainConfig, device: torch.device) -> Reward:
    """cos(E_image, E_text) of a CLIP file (lcm_reward_model; e.g. the shapes CLIP of configs/tiny-shapes-clip.toml,
    whose hard negatives teach it colour binding): CLIPScore (Hessel et al. 2021) without its 100× scale and clip
    at 0, one of the rewards RG-LCD uses."""
    path = config.lcm_reward_model
    if not path or not Path(path).is_file():
        raise ConfigError(f"lcm_reward = 'clip' reads a CLIP file from lcm_reward_model; "
                          f"{'none given' if not path else f'{path} does not exist'}")
    try:
        clip = load_clip(path, device=device, dtype=torch.float32).requires_grad_(False)
    except ValueError as error:  # CheckpointError included: a file that is no CLIP
        raise ConfigError(f"lcm_reward_model: {error}") from None

    def reward(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            text = F.normalize(clip.encode_text(clip.tokenizer(captions).to(device)).float(), dim=-1)
        image = F.normalize(clip.encode_image(clip_pixels(images, clip.config.image_resolution)).float(), dim=-1)
        return (image * text).sum(dim=-1)

    return reward


REWARDS: dict[str, Callable[[TrainConfig, torch.device], Reward]] = {"clip": clip_reward}
