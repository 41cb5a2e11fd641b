"""Helpers shared by the kernel modules: the autotuning switch, the device to launch on, and @triton.jit helpers that
keep bfloat16 exact under the CPU interpreter.

Triton's interpreter (TRITON_INTERPRET=1, how the tests run the kernels without a GPU) stores bfloat16 as raw uint16,
and two of its operations then differ from the GPU: `tl.dot` multiplies the bit patterns (triton-lang/triton#11584), and
float32 -> bfloat16 casts truncate instead of rounding to nearest even. Each kernel takes a constexpr INTERPRETED_BF16,
set by the host only for bfloat16 data under the interpreter, and routes its dots and down-casts through these helpers,
which then compute exactly what a GPU computes. Compiled for a GPU, the flag is False and the helpers are plain
`tl.dot` and `.to`.
"""
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl


AUTOTUNE_ENV_VAR = "LDM_KERNELS_AUTOTUNE"


def autotune_enabled() -> bool:
    """False when LDM_KERNELS_AUTOTUNE=0 (read at every call): the kernels then take the first candidate of their
    autotune table instead of compiling and timing them all, which costs seconds per candidate the first time a shape
    is seen. For tests, and when first-call latency matters more than the last few percent of speed."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() != "0"


def streaming_candidates(configs: list[triton.Config], length: int, compiled: bool) -> list[triton.Config]:
    """Prune for the streaming kernels (GroupNorm, GEGLU), whose configs differ only in tile length BLOCK and warps.

    Tiles longer than the next power of two of `length` (the dimension the kernel walks) are dropped, keeping table
    order; without timing (LDM_KERNELS_AUTOTUNE=0) only the first remains. Kernels that are not `compiled` (run by the
    interpreter, which cannot time anything) get the shortest tile, so test shapes span several tiles.
    """
    shortest = min(configs, key=lambda config: (config.kwargs["BLOCK"], config.num_warps))
    if not compiled:
        return [shortest]
    limit = max(shortest.kwargs["BLOCK"], triton.next_power_of_2(length))
    kept = [config for config in configs if config.kwargs["BLOCK"] <= limit]
    return kept if autotune_enabled() else kept[:1]


def launch_device(tensor: torch.Tensor):
    """Context in which to launch kernels on `tensor`: Triton launches on the current CUDA device, so make it the
    tensor's (nothing to do for CPU tensors, which only the interpreter runs)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


@triton.jit
def dot(a, b, INTERPRETED_BF16: tl.constexpr):
    """a @ b with float32 accumulation. Widening bfloat16 operands to float32 first is exact, so the product equals the
    GPU's tensor-core product of the same bfloat16 operands."""
    if INTERPRETED_BF16:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b)
    return product


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """x.to(dtype), rounding float32 -> bfloat16 to nearest even (as the GPU does) also under the interpreter.

    The software rounding adds 0x7FFF plus the lowest kept bit to the float32 bit pattern and keeps the top 16 bits:
    halfway cases round to the even neighbour, carries propagate into the exponent.
    """
    if INTERPRETED_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        converted = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        converted = x.to(dtype)
    return converted
