"""Fused kernels for Stable Diffusion's hot spots, behind one dispatch point.

Models call only the functions re-exported here; each picks a Triton kernel when one applies (CUDA tensor, supported
shape and dtype) and otherwise falls back to plain PyTorch, so the models run unchanged on CPU, MPS or without Triton.
"""
from .dispatch import attention, geglu, group_norm

__all__ = ["attention", "geglu", "group_norm"]
