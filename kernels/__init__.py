"""Fused kernels for Stable Diffusion's hot spots, behind one dispatch point.

Models call only the functions re-exported here; each picks a Triton kernel when one applies (CUDA tensor, supported
shape and dtype, a one-time self-check against PyTorch passed on the first such input, and the kernel faster than
PyTorch on it) and otherwise falls back to plain PyTorch, so the models run unchanged on CPU, MPS or without Triton.
The backend can be forced with the environment variable LDM_KERNELS=auto|triton|torch (read at every call) or with
set_backend() / use_backend(); see kernels/dispatch.py. LDM_KERNELS_AUTOTUNE=0 makes the Triton kernels take the first
candidate of their autotune tables instead of compiling and timing them all for each new shape.

Commands: `python -m kernels.bench` times the kernels against PyTorch on a GPU; `python -m kernels.compile_check`
compiles every kernel for an NVIDIA architecture on any Linux machine, GPU or not, and reports register spills.
"""
from .dispatch import BACKENDS, ENV_VAR, attention, geglu, get_backend, group_norm, set_backend, use_backend

__all__ = ["BACKENDS", "ENV_VAR", "attention", "geglu", "get_backend", "group_norm", "set_backend", "use_backend"]
