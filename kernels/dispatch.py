"""The one dispatch point between the models and the kernels.

Each public function here has the same signature whatever backend runs it; the PyTorch code in this file is the
behaviour every backend must reproduce and what runs wherever the Triton kernels do not apply.

Backends, chosen per call from the environment variable LDM_KERNELS (read at every call, so it can be changed at any
time) unless set_backend() / use_backend() override it:
- "auto" (default): the Triton kernels for CUDA tensors they support (float16/bfloat16 attention on an Ampere or newer
  GPU; GroupNorm and GEGLU in float16, bfloat16 or float32) where they are correct and faster than PyTorch on that
  input (the self-check and race below), PyTorch for everything else (CPU, MPS, other dtypes). Triton is not even
  imported until a CUDA tensor arrives.
- "triton": always the Triton kernels, unchecked; inputs they do not take raise ValueError instead of silently falling
  back, which is what benchmarks and debugging want. CPU tensors run only under the Triton interpreter
  (TRITON_INTERPRET=1 set before the kernel modules are first imported), which is how the tests exercise the kernels
  without a GPU.
- "torch": always PyTorch. Attention goes through torch.nn.functional.scaled_dot_product_attention, whose own backend
  (flash, memory-efficient, cuDNN, math) can be pinned with torch.nn.attention.sdpa_kernel.
The Triton kernels autotune their tile sizes the first time they see a shape (seconds per shape while they compile);
LDM_KERNELS_AUTOTUNE=0 skips that and takes each table's first candidate (see kernels/triton_helpers.py).

Self-check under "auto": a kernel that compiles on one GPU and tests well in the interpreter can still be wrong on
another GPU, driver or Triton release, and "auto" is what users get without asking. So the first time a kernel meets a
(device, dtype, shape class) — the shape class being the sizes its autotuner keys on, i.e. what picks its compiled
tile configuration — it runs once on that very input beside the PyTorch path, and is used only if its output passes
the kernel tests' accuracy rule (tests/test_kernels.py): max abs error against a PyTorch reference one precision up
(float32 for float16/bfloat16 inputs, float64 for float32 ones) at most twice PyTorch's own in the input dtype, or two
ulps at the reference's largest magnitude. A kernel that fails to compile, raises or disagrees is replaced by PyTorch
for that key with one warning saying why.

Race: a kernel that passes is then timed against the PyTorch path on the same input (CUDA events, best of 3 blocks of
5 calls each) and kept only if it is faster. Measured on an H200 (docs/BENCHMARKS.md), PyTorch's fused attention
backends beat the Triton attention kernel at every SD shape and its native GroupNorm beats the fused GroupNorm+SiLU
at UNet sizes, while the fused kernel is 6.5× faster at the VAE's 512×512 GroupNorm: which path wins depends on the
GPU, the shape and the PyTorch release, so it is measured, not assumed. Losing the race is an ordinary outcome: no
warning, one INFO line on this module's logger with both times.

Verdicts are cached for the life of the process. Cost, once per key: one extra kernel call, two PyTorch calls of the
operation (input dtype and one precision up), a copy of its inputs and output in that precision, 15 timed calls of
each path and a few device-to-host syncs; a 512×512 SD1.5 UNet meets about 30 keys, all during its first step, so a
generation pays some milliseconds once, next to the seconds the kernels spend compiling then anyway. Only the forward
pass is checked and raced (the backward kernels run unchecked in training). "triton" skips both.

torch.compile traces through this module: the backend choice is plain Python over tensor metadata, and each Triton
kernel is a torch.library custom op (ldm_kernels::*_forward / *_backward, with fake implementations for tracing and
their autograd registered), one node in the compiled graph. What it cannot trace is a first import of a kernel module
or a first self-check (both run on real data), so a compiled caller makes one eager call at each new shape first
(sample/compiled.py does); after that the whole dispatch traces into one graph.
"""
import importlib
import logging
import os
import time
import warnings
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

# The kernel modules imported so far, by name. A cache hit is a dict lookup that torch.compile traces; importing is a
# side effect it cannot trace (a graph break), so compiled callers run one eager call first (sample/compiled.py).
_kernel_modules: dict[str, ModuleType] = {}

# Self-check verdicts under "auto": (kernel module, device, dtype, shape class) -> whether the kernel is used (it
# passed the accuracy check and won the race).
_self_checks: dict[tuple, bool] = {}

logger = logging.getLogger(__name__)


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


def _auto_runs_triton(device: torch.device) -> bool:
    """Whether "auto" offers inputs on this device to the Triton kernels at all (the tests fake this to exercise the
    self-check on the CPU under Triton's interpreter)."""
    return device.type == "cuda"


def _races(device: torch.device) -> bool:
    """Whether "auto" times a kernel that passed its self-check against PyTorch before using it: on CUDA, where both
    run compiled (the tests fake this to exercise the race on the CPU)."""
    return device.type == "cuda"


def _triton_kernels(module_name: str, device: torch.device,
                    unsupported_reason: Callable[[ModuleType], str | None]) -> ModuleType | None:
    """The kernel module `kernels.<module_name>` when the backend in force says to use it for these inputs, else None.

    unsupported_reason(module) says why the module's kernels cannot take the inputs (None when they can).
    """
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and not _auto_runs_triton(device)):
        return None
    try:
        module = _kernel_modules.get(module_name)
        if module is None:
            module = _kernel_modules[module_name] = importlib.import_module(f".{module_name}", __package__)
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
        return module if reason is None and not (module.INTERPRETED and device.type == "cuda") else None
    if reason is not None:
        raise ValueError(f"the triton kernel backend cannot run this call: {reason}")
    return module


def _reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """One precision above the inputs': float32 for float16/bfloat16, float64 for float32 (against a float32
    reference PyTorch's own float32 error would be zero, and the rule would demand bitwise agreement)."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def _within_kernel_test_tolerance(kernel_out: torch.Tensor, pytorch_out: torch.Tensor,
                                  reference: torch.Tensor) -> str | None:
    """None when the kernel's max abs error against the reference (one precision up) is at most twice PyTorch's own
    in the input dtype, or two ulps at the reference's largest magnitude (the rule of tests/test_kernels.py); else
    what was seen."""
    if kernel_out.shape != reference.shape:
        return f"output shape {tuple(kernel_out.shape)}, expected {tuple(reference.shape)}"
    kernel_error = (kernel_out.to(reference.dtype) - reference).abs().max()
    pytorch_error = (pytorch_out.to(reference.dtype) - reference).abs().max()
    two_ulps = 2 * torch.finfo(kernel_out.dtype).eps * reference.abs().max()
    # One device-to-host sync for the three numbers; a NaN error fails the comparison, as it should.
    kernel_error, pytorch_error, two_ulps = torch.stack([kernel_error, pytorch_error, two_ulps]).tolist()
    if kernel_error <= max(2 * pytorch_error, two_ulps):
        return None
    reference_name = str(reference.dtype).removeprefix("torch.")
    return (f"max abs error {kernel_error:.3g} against a {reference_name} reference, more than twice PyTorch's own "
            f"{pytorch_error:.3g} and two ulps ({two_ulps:.3g})")


def _milliseconds(function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], calls: int) -> float:
    """Wall time of `calls` back-to-back calls of function(*inputs), per call, in ms (CUDA events on a GPU)."""
    if inputs[0].is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            function(*inputs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    begin = time.perf_counter()
    for _ in range(calls):
        function(*inputs)
    return (time.perf_counter() - begin) * 1e3 / calls


def _race(kernel: Callable[..., torch.Tensor], pytorch: Callable[..., torch.Tensor],
          inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(kernel ms, PyTorch ms) per call on these inputs: the best of 3 blocks of 5 calls each, the two sides
    alternating so that clock and cache changes fall on both. Both were just called once (warm)."""
    kernel_ms, pytorch_ms = float("inf"), float("inf")
    for _ in range(3):
        kernel_ms = min(kernel_ms, _milliseconds(kernel, inputs, 5))
        pytorch_ms = min(pytorch_ms, _milliseconds(pytorch, inputs, 5))
    return kernel_ms, pytorch_ms


def _first_line(error: Exception) -> str:
    """The exception's type and first line: Triton's compile errors go on to quote the kernel source."""
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"


def _self_checked(module: ModuleType, shape_class: tuple, kernel: Callable[..., torch.Tensor],
                  pytorch: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether "auto" runs `kernel` on inputs of this device, dtype and shape class: on the first such call, the
    kernel and `pytorch` (the same operation) run on these very inputs, are compared and, on a GPU, raced (see the
    module docstring); the verdict is cached for the process. A failed check is reported once, as a warning."""
    first = inputs[0]
    key = (module.__name__, str(first.device), first.dtype, shape_class)
    verdict = _self_checks.get(key)
    if verdict is not None:
        return verdict
    if first.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # a CUDA graph being captured cannot sync to compare; PyTorch for this call, check later
    with torch.no_grad():
        try:
            kernel_out = kernel(*inputs)
        except Exception as error:  # compile errors, out-of-resources and launch failures have no common base class
            problem = f"it raised {_first_line(error)}"
        else:
            try:
                high = _reference_dtype(first.dtype)
                problem = _within_kernel_test_tolerance(kernel_out, pytorch(*inputs),
                                                        pytorch(*(tensor.to(high) for tensor in inputs)))
            except Exception as error:  # e.g. out of memory for the high-precision copy: unverified, so not used
                problem = f"the PyTorch reference to compare it with could not run ({_first_line(error)})"
        sizes = ", ".join(str(size) for size in shape_class)
        if problem is not None:
            _self_checks[key] = False
            warnings.warn(f"the Triton kernel {module.__name__} failed its one-time self-check on {first.device} "
                          f"{first.dtype} inputs (shape class {sizes}): {problem}. PyTorch runs these inputs instead "
                          f"for the rest of this process; set {ENV_VAR}=torch to skip the Triton kernels, or "
                          f"{ENV_VAR}=triton to use them unchecked.", RuntimeWarning, stacklevel=4)
            return False
        if not _races(first.device):
            _self_checks[key] = True
            return True
        kernel_ms, pytorch_ms = _race(kernel, pytorch, inputs)
    _self_checks[key] = kernel_ms < pytorch_ms
    logger.info("auto: %s on %s %s inputs (shape class %s): Triton %.3f ms, PyTorch %.3f ms per call; %s runs them",
                module.__name__, first.device, first.dtype, sizes, kernel_ms, pytorch_ms,
                "Triton" if _self_checks[key] else "PyTorch")
    return _self_checks[key]


def _checked_kernel(module: ModuleType, shape_class: tuple, kernel: Callable[..., torch.Tensor],
                    pytorch: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """kernel(*inputs), unless "auto" is in force and the kernel failed its self-check: then pytorch(*inputs)."""
    if get_backend() == "triton" or _self_checked(module, shape_class, kernel, pytorch, inputs):
        return kernel(*inputs)
    return pytorch(*inputs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> [B, H, Nq, D]; scale defaults to D^-0.5.

    Any strides are accepted, so [B, N, H, D] activations can be passed as .transpose(1, 2) views without copies.
    """
    def unsupported(module: ModuleType) -> str | None:
        reason = module.unsupported_reason(q, k, v)
        if (reason is None and get_backend() == "auto" and q.is_cuda
                and torch.cuda.get_device_capability(q.device) < (8, 0)):
            reason = "auto uses the Triton attention kernel on Ampere (sm80) or newer GPUs only"
        return reason

    def pytorch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    module = _triton_kernels("flash_attention", q.device, unsupported)
    if module is None:
        return pytorch(q, k, v)
    # Shape class: the flash kernels' autotune key (Nq, Nk, head dim).
    return _checked_kernel(module, (q.shape[2], k.shape[2], q.shape[3]),
                           lambda q, k, v: module.flash_attention(q, k, v, scale), pytorch, q, k, v)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over x: [B, C, *spatial], optionally followed by SiLU.

    Statistics are taken in float32 whatever x's dtype (as CompVis's GroupNorm32 does), because fp16 variance over
    large spatial groups overflows; the result is cast back to x's dtype.
    """
    def pytorch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
        if silu:
            y = F.silu(y)
        return y.to(x.dtype)

    module = _triton_kernels("fused_group_norm", x.device,
                             lambda module: module.unsupported_reason(x, num_groups, weight, bias))
    if module is None:
        return pytorch(x, weight, bias)
    # Shape class: what the fused kernels' autotuners key on (elements per group, per channel) and the SiLU switch.
    spatial = x[0, 0].numel()
    return _checked_kernel(module, (x.shape[1] // num_groups * spatial, spatial, silu),
                           lambda x, weight, bias: module.group_norm(x, num_groups, weight, bias, eps, silu),
                           pytorch, x, weight, bias)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020, eq. 5): h: [..., 2F] split into (value, gate) -> value * gelu(gate): [..., F]."""
    def pytorch(h: torch.Tensor) -> torch.Tensor:
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)

    module = _triton_kernels("fused_geglu", h.device, lambda module: module.unsupported_reason(h))
    if module is None:
        return pytorch(h)
    # Shape class: the GEGLU kernels' autotune key, the feature count F.
    return _checked_kernel(module, (h.shape[-1] // 2,), lambda h: module.geglu(h), pytorch, h)
