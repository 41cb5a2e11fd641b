"""Models for generation: a loaded model with the name and hash its infotext records, the embedded default
model, and VAE override files."""
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import CheckpointError, read_metadata, read_state_dict
from ldm.model import LatentDiffusion
from ldm.vae import AutoencoderKL

# The embedded default model (docs/SHAPES.md), shipped inside the ldm package.
DEFAULT_MODEL = Path(ldm.__file__).parent / "data" / "tiny-shapes.safetensors"


@dataclass(eq=False)
class LoadedModel:
    """A model plus what A1111 writes about it: `name` ("Model: ...", the file name without extension, or the name
    a training run stored in the file's "ldm.name" metadata) and `hash`
    ("Model hash: ...", 10 hex digits of the file's sha256; None for weights not read from a file)."""
    model: LatentDiffusion
    name: str
    hash: str | None = None
    path: str | None = None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a Stable Diffusion checkpoint file (any family) for generation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    model = ldm.load_model(path, device=device, dtype=dtype)
    name = read_metadata(path).get("ldm.name") or Path(path).stem
    return LoadedModel(model, name, ldm.model_hash(path), path)


def default_model(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """The model used when none is given: the one place that decides what "the default model" is.

    It is the embedded tiny-shapes model, a Stable Diffusion 1.x-style model in miniature trained from scratch on the
    synthetic shapes domain (train.shapes): 64×64 images of one or two coloured shapes ("a red circle", "a small blue
    square on the left", "a green triangle above a yellow star"). The file is fp16; on a CPU it is loaded in fp32
    unless `dtype` says otherwise, because PyTorch's CPU kernels are slow or missing in fp16.
    """
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"the embedded default model {DEFAULT_MODEL} is missing; reinstall the package "
                                "(pip install -e .) or give a model file")
    if dtype is None and torch.device(device or "cpu").type == "cpu":
        dtype = torch.float32
    return load_checkpoint(DEFAULT_MODEL, device, dtype)


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
