"""Which upscaler architecture a state dict holds, read off its keys (like `ldm.detect` for SD checkpoints).

Each Architecture names the keys that identify its layout and a `build(state_dict) -> nn.Module` that reads widths,
depths and scale off the tensor shapes. The module must expose `scale` (an int) and map [B, C, H, W] images in
[0, 1] to [B, C, H·scale, W·scale]. Users add their own with `register_architecture`.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ldm.presets import key_prefixes

from .esrgan import build_old_esrgan, build_rrdbnet
from .srvgg import build_srvgg
from .swinir import build_swinir


@dataclass(frozen=True)
class Architecture:
    name: str  # shown in errors and as the listing's model_name
    required_keys: tuple[str, ...]  # all present: this architecture
    build: Callable[[dict[str, torch.Tensor]], nn.Module]
    supports_half: bool = True  # fp16 inference is accurate enough (on a GPU)


ARCHITECTURES: list[Architecture] = [
    Architecture("ESRGAN", ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"), build_old_esrgan),
    Architecture("RealESRGAN", ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight",
                                "conv_up1.weight", "conv_last.weight"), build_rrdbnet),
    Architecture("RealESRGAN compact", ("body.0.weight", "body.1.weight"), build_srvgg),
    # SwinIR's attention logits overflow fp16 (its own release runs it in fp32).
    Architecture("SwinIR", ("conv_first.weight", "layers.0.residual_group.blocks.0.attn.relative_position_index"),
                 build_swinir, supports_half=False),
]


def register_architecture(name: str, required_keys: tuple[str, ...] | list[str],
                          build: Callable[[dict[str, torch.Tensor]], nn.Module], *, supports_half: bool = True
                          ) -> Architecture:
    """Teach the upscaler loader a new file layout: a file whose keys include all of `required_keys` is built by
    `build(state_dict)` (a module with an int `scale`, [B, C, H, W] in [0, 1] -> [B, C, H·scale, W·scale]) and
    loaded strictly. Registered architectures are tried before the built-in ones."""
    if not required_keys or not all(isinstance(key, str) for key in required_keys):
        raise ValueError(f"architecture {name!r}: required_keys must be a non-empty list of key names")
    if any(existing.name == name for existing in ARCHITECTURES):
        raise ValueError(f"an upscaler architecture named {name!r} is already registered")
    architecture = Architecture(name, tuple(required_keys), build, supports_half)
    ARCHITECTURES.insert(0, architecture)
    return architecture


def unregister_architecture(name: str) -> None:
    ARCHITECTURES[:] = [architecture for architecture in ARCHITECTURES if architecture.name != name]


def detect_architecture(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """The architecture whose identifying keys the state dict holds; a ValueError naming what was found otherwise."""
    for architecture in ARCHITECTURES:
        if all(key in state_dict for key in architecture.required_keys):
            return architecture
    known = "; ".join(f"{a.name} ({', '.join(a.required_keys)})" for a in ARCHITECTURES)
    raise ValueError(f"not a known upscaler model: its key prefixes are {', '.join(key_prefixes(state_dict)[:12])}; "
                     f"known layouts (and the keys that identify them): {known}")


def build_model(state_dict: dict[str, torch.Tensor]) -> tuple[Architecture, nn.Module]:
    """The detected architecture and its module with the file's weights loaded strictly, in eval mode."""
    architecture = detect_architecture(state_dict)
    try:
        model = architecture.build(state_dict)
        model.load_state_dict(state_dict, strict=True)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"looks like {architecture.name} (has {', '.join(architecture.required_keys)}) but does "
                         f"not load as one: {error}") from error
    return architecture, model.eval().requires_grad_(False)
