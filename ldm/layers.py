"""Small building blocks shared by the UNet, the VAE and the SDXL conditioner."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose forward can fuse the SiLU that follows it in every SD ResBlock.

    Parameters keep nn.GroupNorm's names (`weight`, `bias`), so checkpoint keys are unchanged. The computation goes
    through `kernels.group_norm`, which takes statistics in float32 (CompVis's GroupNorm32) and runs the fused Triton
    kernel where one applies.
    """

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling followed by a 3×3 convolution (key `conv`), in the UNet and the VAE decoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C, 2H, 2W]. Nearest interpolation lacks a bf16 kernel on some backends and is exact
        # in fp32, so it runs there.
        return self.conv(F.interpolate(x.float(), scale_factor=2, mode="nearest").to(x.dtype))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, t: [B] -> [B, dim].

    Transformer positional encoding (Vaswani et al. 2017, §3.5) with frequencies max_period^(-i/half); CompVis puts the
    cosines first, then the sines, and that order is baked into every released checkpoint's `time_embed.0` weights.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity (Ho et al. 2020 / ADM init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
