"""Reading images and streaming them through a feature network in batches, with a progress bar.

Which files of a folder are images, and the prompt of an image file, are `sample.imagefiles`' to say.

An extractor is a callable taking a batch of images (a list of [3, H, W] tensors in [0, 1], sizes may differ) and
returning named numpy arrays with one row per image. `extract` runs one over any iterable of such batches (a folder,
or batches produced by a generator) and concatenates the rows; the networks run on the GPU when one is given.
"""
import os
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.clip_model import CLIP

from .clip import preprocess
from .inception import FIDInceptionV3
from .resize import inception_input

Extractor = Callable[[list[torch.Tensor]], dict[str, np.ndarray]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as an RGB tensor [3, H, W] in [0, 1] (palette, grey and alpha images are converted to RGB)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def extract(extractor: Extractor, batches: Iterable[list[torch.Tensor]], total: int | None = None,
            description: str = "features") -> dict[str, np.ndarray]:
    """Run `extractor` over every batch and concatenate its outputs; progress (images) goes to stderr."""
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, desc=description, unit="img", leave=False) as progress:
        for batch in batches:
            for name, rows in extractor(batch).items():
                parts.setdefault(name, []).append(rows)
            progress.update(len(batch))
    if not parts:
        raise ValueError(f"no images to compute {description} from")
    return {name: np.concatenate(rows) for name, rows in parts.items()}


def sharded_batches(compute: Callable[[list], dict[str, np.ndarray]], items: list, batch_size: int, ranks,
                    description: str) -> dict[str, np.ndarray]:
    """`compute` over `items` in batches of `batch_size`, its rows concatenated in item order, with the batches dealt
    round-robin over the processes of a torchrun launch (`ranks`: sample.sharded.Ranks; batch j to rank j mod N).
    Each item is computed in the very batch one process would put it in, so every rank gets the one-process rows."""
    batches = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    mine = batches[ranks.rank::ranks.size]
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=sum(map(len, mine)), desc=description, unit="img", leave=False) as progress:
        for batch in mine:
            for name, rows in compute(batch).items():
                parts.setdefault(name, []).append(rows)
            progress.update(len(batch))
    gathered = ranks.gather(parts)  # rank r holds the rows of batches r, r + N, ... in that order
    if not batches:
        raise ValueError(f"no images to compute {description} from")
    return {name: np.concatenate([gathered[j % ranks.size][name][j // ranks.size] for j in range(len(batches))])
            for name in gathered[0]}


class InceptionExtractor:
    """FID Inception features: {"pool": [N, 2048] (FID, KID), "logits": [N, 1008] (IS)}, float64."""

    def __init__(self, model: FIDInceptionV3, convention: str = "clean", device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)
        self.convention = convention

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        features, logits = self.model(inception_input(images, self.convention, self.device))
        return {"pool": features.double().cpu().numpy(), "logits": logits.double().cpu().numpy()}


class CLIPImageExtractor:
    """CLIP image embeddings {"clip": [N, embed_dim]}, float64 (for a Fréchet distance in CLIP space)."""

    def __init__(self, model: CLIP, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        pixels = preprocess(images, self.model.config.image_resolution).to(self.device, self.model.dtype)
        return {"clip": self.model.encode_image(pixels).double().cpu().numpy()}

