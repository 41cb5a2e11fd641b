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
