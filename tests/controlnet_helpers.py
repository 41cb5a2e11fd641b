"""Shared by the ControlNet generation and web API tests: a seeded random ControlNet for a model, saved to a folder,
and a synthetic control image."""
import numpy as np
import torch
from PIL import Image

from ldm.controlnet import from_unet, save_controlnet
from random_weights import randomize_weights


def random_controlnet(model, seed: int = 1):
    """A ControlNet for `model` (ldm.controlnet.from_unet) with every weight random, the zero convs included, so its
    residuals are large enough to change the image."""
    with torch.random.fork_rng(devices=[]):
        net = from_unet(model)
    return randomize_weights(net, seed=seed).eval()


def save_random_controlnet(model, folder, name: str = "random_cn", seed: int = 1) -> str:
    path = folder / f"{name}.safetensors"
    save_controlnet(random_controlnet(model, seed), path)
    return str(path)


def shapes_image(size: int = 64) -> Image.Image:
    """A red disc and a cyan square on near-black: flat regions with sharp edges, the kind of input canny and
    seg_color expect."""
    rows, cols = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 20, np.uint8)
    image[(rows - size * 0.4) ** 2 + (cols - size * 0.35) ** 2 < (size * 0.2) ** 2] = (240, 60, 60)
    image[int(size * 0.55):int(size * 0.85), int(size * 0.55):int(size * 0.85)] = (60, 200, 240)
    return Image.fromarray(image)
