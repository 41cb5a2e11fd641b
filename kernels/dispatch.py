"""The one dispatch point between the models and the kernels.

Each public function here has the same signature whatever backend runs it; the Triton kernels are plugged in behind these
functions, and the PyTorch fallback below is the behaviour every backend must reproduce.
"""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> [B, H, Nq, D]; scale defaults to D^-0.5."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over x: [B, C, *spatial], optionally followed by SiLU.

    Statistics are taken in float32 whatever x's dtype (as CompVis's GroupNorm32 does), because fp16 variance over
    large spatial groups overflows; the result is cast back to x's dtype.
    """
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020, eq. 5): h: [..., 2F] split into (value, gate) -> value * gelu(gate): [..., F]."""
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)
