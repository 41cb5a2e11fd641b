"""Fused GEGLU, forward and backward, in Triton.

GEGLU (Shazeer, 2020, "GLU Variants Improve Transformer", eq. 5) is the gated feed-forward of Stable Diffusion's
transformer blocks: the projection h = x W: [..., 2F] is split into (value, gate) and the block output is
value * GELU(gate), with the exact (erf) GELU, GELU(g) = g · Φ(g), Φ(g) = (1 + erf(g / √2)) / 2.

PyTorch runs this as a chunk, a GELU and a multiply, writing the [..., F] GELU result to memory in between. The kernel
reads h once and writes the output once, computing in float32 and rounding once to h's dtype. The backward reads h and
the output gradient once and writes dh:
    d value = dy · GELU(gate),   d gate = dy · value · GELU'(gate),   GELU'(g) = Φ(g) + g · φ(g),
with φ(g) = exp(−g² / 2) / √(2π) the normal density.

File layout: reference implementation, autotune table, jit kernels, custom ops with their autograd, public function.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_helpers import cast, launch_device, streaming_candidates

# Triton decides at @triton.jit time whether kernels are compiled or interpreted (TRITON_INTERPRET=1); this records
# the mode the kernels of this module were built in.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SQRT_HALF = tl.constexpr(0.7071067811865476)     # 1 / √2 (a constexpr: jit code may only read constexpr globals)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / √(2π)


# ----------------------------------------------------------------------------------------------------------------------
# Reference implementation.
# ----------------------------------------------------------------------------------------------------------------------

def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """h: [..., 2F] -> value * GELU(gate): [..., F], with (value, gate) = h.chunk(2, -1), in at least float32."""
    value, gate = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(h.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Autotune table: an elementwise kernel, so only the tile length along F and the warp count are tuned, keyed on F.
# ----------------------------------------------------------------------------------------------------------------------

# (BLOCK, num_warps), best guess first.
_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
            for block, warps in ((1024, 4), (2048, 8), (512, 4), (1024, 8), (512, 8))]


def _prune(configs, named_args, **kernel_kwargs):
    return streaming_candidates(configs, named_args["FEATURES"], compiled=not INTERPRETED and named_args["H"].is_cuda)


_AUTOTUNE = dict(configs=_CONFIGS, key=["FEATURES"], prune_configs_by={"early_config_prune": _prune})


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels: program (r, j) handles features [j*BLOCK, (j+1)*BLOCK) of row r; h rows are [value | gate].
# ----------------------------------------------------------------------------------------------------------------------

@triton.autotune(**_AUTOTUNE)
@triton.jit
def _geglu_fwd_kernel(H, Y, stride_h_row, stride_y_row, FEATURES,
                      INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < FEATURES
    value = tl.load(H + row * stride_h_row + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(H + row * stride_h_row + FEATURES + offs, mask=mask, other=0.0).to(tl.float32)
    y = value * gate * 0.5 * (1.0 + tl.erf(gate * SQRT_HALF))
    tl.store(Y + row * stride_y_row + offs, cast(y, Y.dtype.element_ty, INTERPRETED_BF16), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _geglu_bwd_kernel(H, DY, DH, stride_h_row, stride_dy_row, stride_dh_row, FEATURES,
                      INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < FEATURES
    value = tl.load(H + row * stride_h_row + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(H + row * stride_h_row + FEATURES + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy_row + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(gate * SQRT_HALF))               # Φ(gate)
    pdf = tl.exp(-0.5 * gate * gate) * INV_SQRT_2PI            # φ(gate)
    d_value = dy * gate * cdf
    d_gate = dy * value * (cdf + gate * pdf)
    out_dtype = DH.dtype.element_ty
    tl.store(DH + row * stride_dh_row + offs, cast(d_value, out_dtype, INTERPRETED_BF16), mask=mask)
    tl.store(DH + row * stride_dh_row + FEATURES + offs, cast(d_gate, out_dtype, INTERPRETED_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Host side: the custom ops and their autograd.
# ----------------------------------------------------------------------------------------------------------------------

def _rows_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """[..., W] viewed as [R, W] rows with adjacent elements, or None when that needs a copy."""
    if tensor.stride(-1) != 1:
        return None
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:  # the leading dims do not flatten without a copy
        return None


# Custom ops, so that torch.compile traces through the kernels (see flash_attention.py); geglu_reference is what they
# compute.

@torch.library.custom_op("ldm_kernels::geglu_forward", mutates_args=())
def geglu_forward(h: torch.Tensor) -> torch.Tensor:
    """h: [..., 2F] -> value * gelu(gate): [..., F], contiguous."""
    rows = _rows_view(h)  # [R, 2F]
    features = rows.shape[1] // 2
    y = torch.empty((rows.shape[0], features), device=h.device, dtype=h.dtype)
    with launch_device(h):
        grid = lambda meta: (rows.shape[0], triton.cdiv(features, meta["BLOCK"]))
        _geglu_fwd_kernel[grid](rows, y, rows.stride(0), y.stride(0), features,
                                INTERPRETED_BF16=INTERPRETED and h.dtype == torch.bfloat16)
    return y.view(*h.shape[:-1], features)


@geglu_forward.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("ldm_kernels::geglu_backward", mutates_args=())
def geglu_backward(h: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """dL/dh: [..., 2F], contiguous, from h and dL/dy: [..., F] (the output is recomputed from h, not saved)."""
    rows = _rows_view(h)
    grad_rows = grad_y.reshape(rows.shape[0], -1).contiguous()  # [R, F]; the kernel reads dy with unit stride
    features = rows.shape[1] // 2
    grad_h = torch.empty(rows.shape, device=h.device, dtype=h.dtype)  # [R, 2F], contiguous
    with launch_device(h):
        grid = lambda meta: (rows.shape[0], triton.cdiv(features, meta["BLOCK"]))
        _geglu_bwd_kernel[grid](rows, grad_rows, grad_h, rows.stride(0), grad_rows.stride(0), grad_h.stride(0),
                                features, INTERPRETED_BF16=INTERPRETED and h.dtype == torch.bfloat16)
    return grad_h.view(h.shape)


@geglu_backward.register_fake
def _(h, grad_y):
    return h.new_empty(h.shape)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_grad(ctx, grad_y):
    (h,) = ctx.saved_tensors
    return geglu_backward(h, grad_y)


geglu_forward.register_autograd(_geglu_grad, setup_context=_save_input)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------------------

def unsupported_reason(h: torch.Tensor) -> str | None:
    """Why geglu cannot take this input, or None when it can."""
    if h.dtype not in SUPPORTED_DTYPES:
        return f"fused GEGLU takes float16, bfloat16 or float32 input, got {h.dtype}"
    if h.dim() == 0 or h.shape[-1] % 2 or h.numel() == 0:
        return f"fused GEGLU takes a non-empty [..., 2F] tensor with an even last dim, got shape {tuple(h.shape)}"
    if _rows_view(h) is None:
        return "fused GEGLU needs h viewable as [rows, 2F] with adjacent features; call .contiguous() or use the " \
               "torch backend"
    return None


def geglu(h: torch.Tensor) -> torch.Tensor:
    """value * GELU(gate) for h: [..., 2F] -> [..., F] with (value, gate) = h.chunk(2, -1); differentiable in h.

    Raises ValueError for inputs the kernels do not take (see unsupported_reason).
    """
    reason = unsupported_reason(h)
    if reason is not None:
        raise ValueError(reason)
    return geglu_forward(h)
