"""The one dispatch point between the models and the kernels.

Each public function here has the same signature whatever backend runs it; the PyTorch code in this file is the
behaviour every backend must reproduce and what runs wherever the Triton kernels do not apply.

Backends, chosen per call from the environment variable LDM_KERNELS (read at every call, so it can be changed at any
time) unless set_backend() / use_backend() override it:
- "auto" (default): the Triton kernels for CUDA tensors they support (float16/bfloat16 attention on an Ampere or newer
  GPU; GroupNorm and GEGLU in float16, bfloat16 or float32), PyTorch for everything else (CPU, MPS, other dtypes).
  Triton is not even imported until a CUDA tensor arrives.
- "triton": always the Triton kernels; inputs they do not take raise ValueError instead of silently falling back, which
  is what benchmarks and debugging want. CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 set
  before the kernel modules are first imported), which is how the tests exercise the kernels without a GPU.
- "torch": always PyTorch. Attention goes through torch.nn.functional.scaled_dot_product_attention, whose own backend
  (flash, memory-efficient, cuDNN, math) can be pinned with torch.nn.attention.sdpa_kernel.
The Triton kernels autotune their tile sizes the first time they see a shape (seconds per shape while they compile);
LDM_KERNELS_AUTOTUNE=0 skips that and takes each table's first candidate (see kernels/triton_helpers.py).
"""
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F

ENV_VAR = "LDM_KERNELS"
BACKENDS = ("auto", "triton", "torch")

# Set by set_backend / use_backend; None defers to the environment variable. Process-wide (not per thread), so a
# backend chosen at start-up also holds in worker threads.
_backend_override: str | None = None


def _validated(name: str, source: str) -> str:
    normalised = name.strip().lower()
    if normalised not in BACKENDS:
        raise ValueError(f"{source} is {name!r}; choose one of {', '.join(BACKENDS)}")
    return normalised


def set_backend(name: str | None) -> None:
    """Force a backend ("auto", "triton" or "torch") for every later call; None returns control to LDM_KERNELS."""
    global _backend_override
    _backend_override = None if name is None else _validated(name, "the kernel backend")


def get_backend() -> str:
    """The backend in force: the set_backend() override if any, else LDM_KERNELS, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    return _validated(os.environ.get(ENV_VAR, "auto"), f"the environment variable {ENV_VAR}")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run a block with a backend forced (None: defer to LDM_KERNELS), restoring the previous override afterwards."""
    global _backend_override
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def _triton_kernels(module_name: str, device: torch.device,
                    unsupported_reason: Callable[[ModuleType], str | None]) -> ModuleType | None:
    """The kernel module `kernels.<module_name>` when the backend in force says to use it for these inputs, else None.

    unsupported_reason(module) says why the module's kernels cannot take the inputs (None when they can).
    """
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return None
    try:
        module = importlib.import_module(f".{module_name}", __package__)
    except ImportError as error:
        if backend == "auto":
            return None
        raise RuntimeError(f"the triton kernel backend was requested but Triton cannot be imported ({error}); "
                           f"install triton or set {ENV_VAR}=auto") from error
    reason = unsupported_reason(module)
    if reason is None and device.type != "cuda" and not module.INTERPRETED:
        reason = (f"the Triton kernels need CUDA tensors, got {device.type} ones; to run them on the CPU, set "
                  "TRITON_INTERPRET=1 before the kernels are first imported (Triton's interpreter)")
    if backend == "auto":
        # An interpreted kernel on a GPU would be correct but orders of magnitude slower than PyTorch.
        return module if reason is None and not module.INTERPRETED else None
    if reason is not None:
        raise ValueError(f"the triton kernel backend cannot run this call: {reason}")
    return module


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> [B, H, Nq, D]; scale defaults to D^-0.5.

    Any strides are accepted, so [B, N, H, D] activations can be passed as .transpose(1, 2) views without copies.
    """
    def unsupported(module: ModuleType) -> str | None:
        reason = module.unsupported_reason(q, k, v)
        if reason is None and get_backend() == "auto" and torch.cuda.get_device_capability(q.device) < (8, 0):
            reason = "auto uses the Triton attention kernel on Ampere (sm80) or newer GPUs only"
        return reason

    kernels = _triton_kernels("flash_attention", q.device, unsupported)
    if kernels is not None:
        return kernels.flash_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over x: [B, C, *spatial], optionally followed by SiLU.

    Statistics are taken in float32 whatever x's dtype (as CompVis's GroupNorm32 does), because fp16 variance over
    large spatial groups overflows; the result is cast back to x's dtype.
    """
    kernels = _triton_kernels("fused_group_norm", x.device,
                              lambda module: module.unsupported_reason(x, num_groups, weight, bias))
    if kernels is not None:
        return kernels.group_norm(x, num_groups, weight, bias, eps, silu)
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020, eq. 5): h: [..., 2F] split into (value, gate) -> value * gelu(gate): [..., F]."""
    kernels = _triton_kernels("fused_geglu", h.device, lambda module: module.unsupported_reason(h))
    if kernels is not None:
        return kernels.geglu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)
