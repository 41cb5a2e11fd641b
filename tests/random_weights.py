"""Seeded random weights for the tests and the benchmarks: every layer non-zero, so a parity test proves something."""
import math

import torch


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter from a seeded generator and return the model: matrices N(0, 1/fan_in) so activations keep
    their scale through deep stacks (LeCun et al. 1998), norm scales near 1, biases small. Unlike PyTorch's default
    initialisation this also fills the layers Stable Diffusion starts at zero (UNet output, attention projections),
    without which an untrained UNet predicts exactly zero noise and ignores the prompt — and a parity test on zero
    weights would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            std = 1 / math.sqrt(parameter[0].numel())
            values = torch.randn(parameter.shape, generator=generator) * std
        elif name.endswith("weight"):
            values = 1 + 0.1 * torch.randn(parameter.shape, generator=generator)
        else:
            values = 0.1 * torch.randn(parameter.shape, generator=generator)
        parameter.copy_(values)
    return model


def random_clip_file(path, vision_heads: int = 1, text_heads: int = 1):
    """A seeded random small CLIP (embedding 32, 32-pixel images in 8-pixel patches, towers of width 64 and one layer)
    written to `path` as a bare state dict, as OpenAI's files come (no metadata, so a reader assumes or is told the
    head widths); returns the model."""
    from ldm.checkpoint import save_state_dict
    from ldm.clip_model import CLIP, CLIPConfig
    config = CLIPConfig(embed_dim=32, image_resolution=32, patch_size=8, vision_width=64, vision_layers=1,
                        vision_heads=vision_heads, text_width=64, text_layers=1, text_heads=text_heads)
    model = randomize_weights(CLIP(config)).eval()
    save_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model
