"""Checkpoints for generation: a loaded model with the name and hash its infotext records, the embedded default
model, and VAE override files."""
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.model import LatentDiffusion
from ldm.vae import AutoencoderKL

# Seed of the embedded default's random weights: the same weights, hence the same images, on every run.
DEFAULT_WEIGHTS_SEED = 0


@dataclass(eq=False)
class Checkpoint:
    """A model plus what A1111 writes about it: `name` ("Model: ...", the file name without extension) and `hash`
    ("Model hash: ...", 10 hex digits of the file's sha256; None for weights not read from a file). `notice` is a
    message a command shows the user about this model (e.g. that its weights are untrained), or None."""
    model: LatentDiffusion
    name: str
    hash: str | None = None
    path: str | None = None
    notice: str | None = None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a Stable Diffusion checkpoint file (any family) for generation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    model = ldm.load_model(path, device=device, dtype=dtype)
    return Checkpoint(model, Path(path).stem, ldm.model_hash(path), path)


def default_model(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Checkpoint:
    """The model used when none is given: the one place that decides what "the default model" is.

    There is no trained default yet, so this is the `tiny` preset with random weights drawn from a fixed seed
    (deterministic, and every layer non-zero so the prompt changes the image), 64×64 images in well under a second
    per step on a CPU.
    """
    with torch.random.fork_rng(devices=[]):  # building draws PyTorch's default init: keep the caller's RNG state
        model = ldm.create_model("tiny")
    randomize_weights(model, DEFAULT_WEIGHTS_SEED)  # on the CPU, so the weights do not depend on the device
    alphas_cumprod = model.alphas_cumprod
    model.to(device=device, dtype=dtype)
    model.alphas_cumprod = alphas_cumprod.to(model.device)  # the schedule stays float32
    return Checkpoint(model, "tiny-random", notice="no trained default model yet: using randomly initialised "
                                                   "'tiny' weights")


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from a seeded generator: matrices N(0, 1/fan_in) so activations keep their scale through
    the layers (LeCun et al. 1998), norm scales near 1, biases small. Unlike PyTorch's default initialisation this
    also fills the layers Stable Diffusion starts at zero (UNet output, attention projections), without which an
    untrained UNet predicts exactly zero noise and ignores the prompt."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            fan_in = parameter[0].numel()
            values = torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in)
        elif name.endswith("weight"):
            values = 1 + 0.1 * torch.randn(parameter.shape, generator=generator)
        else:
            values = 0.1 * torch.randn(parameter.shape, generator=generator)
        parameter.copy_(values)


def load_vae(path: str | os.PathLike, model: LatentDiffusion) -> AutoencoderKL:
    """A VAE file (A1111's "SD VAE": bare `encoder.*`/`decoder.*` keys, or under `first_stage_model.`) as an
    AutoencoderKL with the architecture, device and dtype of `model`'s own. Training-only keys (`loss.*`) are
    dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE file not found: {path}")
    state = read_state_dict(path)
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items() if not k.startswith("loss.")}
    vae = AutoencoderKL(**asdict(model.preset.vae))
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} is not a VAE for this model: {len(missing)} missing keys "
                              f"(e.g. {missing[:1]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:1]})")
    return vae.to(device=model.device, dtype=model.vae.dtype).eval()
