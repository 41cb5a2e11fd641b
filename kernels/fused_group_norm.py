"""Fused GroupNorm (+ optional SiLU), forward and backward, in Triton.

GroupNorm (Wu & He, 2018): for x: [B, C, *spatial] split into G groups of C/G channels, each (sample, group) is
normalised by its own mean and variance over C/G * prod(spatial) elements, then scaled and shifted per channel:
    y = SiLU(x̂ · w_c + b_c),  x̂ = (x − μ_bg) · rstd_bg,  rstd = 1 / sqrt(σ² + eps).
Every ResBlock of the Stable Diffusion UNet and VAE applies it followed by SiLU; PyTorch runs that as a float32 copy,
the norm, the activation and a cast back, several passes over memory. Here it is two passes (statistics, then
normalise + affine + SiLU + cast) and the statistics are float32 whatever the input dtype (as CompVis's GroupNorm32
does).

Statistics: the SD groups are large (10 channels × 4096 pixels in the UNet, up to 16 × 262144 in the VAE), and one
program per group would leave most of a GPU idle, so each group is cut into `splits` chunks reduced by separate
programs.
Their partial sums must add up exactly, so they are taken around a common shift K = the group's first element (the
"shifted data" variance algorithm, Chan, Golub & LeVeque 1983): var = E[(x−K)²] − E[x−K]², which stays accurate when the
mean is large compared with the spread (plain E[x²] − E[x]² in float32 would cancel catastrophically).

Backward (x̂ recomputed from the saved mean and rstd; dz = dy · SiLU'(z) with z = x̂ · w + b):
    dw_c = Σ_{b, spatial} dz · x̂,   db_c = Σ_{b, spatial} dz,
    dx = rstd · (dz · w_c − mean_group(dz · w) − x̂ · mean_group(dz · w · x̂)).
A first kernel reduces Σ dz · x̂ and Σ dz per (sample, channel); the second turns them into the two group means and
writes dx.

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


# ----------------------------------------------------------------------------------------------------------------------
# Reference implementation.
# ----------------------------------------------------------------------------------------------------------------------

def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         silu: bool = False) -> torch.Tensor:
    """GroupNorm (then SiLU) of x: [B, C, *spatial] computed in at least float32, returned in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(x.to(compute), num_groups, weight.to(compute), bias.to(compute), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Autotune table: these kernels stream memory, so only the tile length and warp count are tuned, keyed on the length of
# the dimension they walk (pruned by triton_helpers.streaming_candidates).
# ----------------------------------------------------------------------------------------------------------------------

# (BLOCK, num_warps), best guess first.
_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
            for block, warps in ((1024, 4), (2048, 8), (512, 4), (1024, 8), (512, 8))]
# Statistics chunks are a whole number of the largest tile, so every config walks the same chunks.
_MAX_BLOCK = max(config.kwargs["BLOCK"] for config in _CONFIGS)


def _autotune(length_arg: str):
    """Autotune over _CONFIGS keyed on the kernel argument `length_arg`: the length of the dimension the kernel
    walks."""
    def prune(configs, named_args, **kernel_kwargs):
        compiled = not INTERPRETED and named_args["X"].is_cuda
        return streaming_candidates(configs, named_args[length_arg], compiled)

    return triton.autotune(configs=_CONFIGS, key=[length_arg], prune_configs_by={"early_config_prune": prune})


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels. X is viewed as [B*G, GROUP_SIZE] (a contiguous NC* tensor keeps each group's channels adjacent), or as
# [B*C, SPATIAL] rows when reducing per channel.
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _silu_and_grad(z):
    """(SiLU(z), SiLU'(z)) with SiLU(z) = z · σ(z) and SiLU'(z) = σ(z) · (1 + z · (1 − σ(z)))."""
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _group_stats(SUM, SUMSQ, X, group, GROUP_SIZE, SPLITS, BLOCK_SPLITS: tl.constexpr):
    """(mean, variance) of one group from the `SPLITS` partial sums of its elements shifted by its first element."""
    offs = tl.arange(0, BLOCK_SPLITS)
    part_sum = tl.load(SUM + group * SPLITS + offs, mask=offs < SPLITS, other=0.0)
    part_sumsq = tl.load(SUMSQ + group * SPLITS + offs, mask=offs < SPLITS, other=0.0)
    shift = tl.load(X + group * GROUP_SIZE).to(tl.float32)
    shifted_mean = tl.sum(part_sum, 0) / GROUP_SIZE
    variance = tl.maximum(tl.sum(part_sumsq, 0) / GROUP_SIZE - shifted_mean * shifted_mean, 0.0)
    return shift + shifted_mean, variance


@_autotune("GROUP_SIZE")
@triton.jit
def _group_norm_stats_kernel(X, SUM, SUMSQ, GROUP_SIZE, CHUNK, SPLITS, BLOCK: tl.constexpr):
    """Program (s, b*G + g): Σ(x − K) and Σ(x − K)² over chunk s of group (b, g), K = the group's first element."""
    split = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    X += group * GROUP_SIZE
    shift = tl.load(X).to(tl.float32)
    acc_sum = tl.zeros([BLOCK], tl.float32)    # one running sum per lane, added up once at the end
    acc_sumsq = tl.zeros([BLOCK], tl.float32)
    chunk_start = split * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, GROUP_SIZE)
    for start in range(chunk_start, chunk_end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < chunk_end
        centred = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        acc_sum += centred
        acc_sumsq += centred * centred
    tl.store(SUM + group * SPLITS + split, tl.sum(acc_sum, 0))
    tl.store(SUMSQ + group * SPLITS + split, tl.sum(acc_sumsq, 0))


@_autotune("GROUP_SIZE")
@triton.jit
def _group_norm_fwd_kernel(
    X, Y, W, B, SUM, SUMSQ, MEAN, RSTD,
    GROUP_SIZE, SPATIAL, CHANNELS_PER_GROUP, NUM_GROUPS, SPLITS, eps,
    SILU: tl.constexpr, BLOCK_SPLITS: tl.constexpr, INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, b*G + g): y = [SiLU](x̂ · w + b) for elements [i*BLOCK, (i+1)*BLOCK) of group (b, g).

    Block 0 of each group also stores the group's mean and rstd for the backward pass.
    """
    block = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    mean, variance = _group_stats(SUM, SUMSQ, X, group, GROUP_SIZE, SPLITS, BLOCK_SPLITS)
    rstd = 1.0 / tl.sqrt(variance + eps)
    if block == 0:
        tl.store(MEAN + group, mean)
        tl.store(RSTD + group, rstd)

    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    channel = (group % NUM_GROUPS) * CHANNELS_PER_GROUP + offs // SPATIAL
    w = tl.load(W + channel, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + channel, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + group * GROUP_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y, _ = _silu_and_grad(y)
    tl.store(Y + group * GROUP_SIZE + offs, cast(y, Y.dtype.element_ty, INTERPRETED_BF16), mask=mask)


@_autotune("SPATIAL")
@triton.jit
def _group_norm_bwd_reduce_kernel(
    X, DY, W, B, MEAN, RSTD, SUM_DZ_XHAT, SUM_DZ,
    SPATIAL, CHANNELS, CHANNELS_PER_GROUP,
    SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b*C + c): Σ dz · x̂ and Σ dz over the spatial positions of channel c of sample b."""
    row = tl.program_id(0).to(tl.int64)  # b * C + c
    channel = row % CHANNELS
    group = row // CHANNELS_PER_GROUP    # b * G + c // (C/G), as C = G * C/G
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    w = tl.load(W + channel).to(tl.float32)
    b = tl.load(B + channel).to(tl.float32)
    acc_dz_xhat = tl.zeros([BLOCK], tl.float32)
    acc_dz = tl.zeros([BLOCK], tl.float32)
    for start in range(0, SPATIAL, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < SPATIAL
        x = tl.load(X + row * SPATIAL + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + row * SPATIAL + offs, mask=mask, other=0.0).to(tl.float32)  # masked lanes: dz = 0
        x_hat = (x - mean) * rstd
        if SILU:
            _, silu_grad = _silu_and_grad(x_hat * w + b)
            dz = dz * silu_grad
        acc_dz_xhat += dz * x_hat
        acc_dz += dz
    tl.store(SUM_DZ_XHAT + row, tl.sum(acc_dz_xhat, 0))
    tl.store(SUM_DZ + row, tl.sum(acc_dz, 0))


@_autotune("GROUP_SIZE")
@triton.jit
def _group_norm_bwd_dx_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SUM_DZ_XHAT, SUM_DZ,
    GROUP_SIZE, SPATIAL, CHANNELS_PER_GROUP, NUM_GROUPS,
    SILU: tl.constexpr, BLOCK_CPG: tl.constexpr, INTERPRETED_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, b*G + g): dx for elements [i*BLOCK, (i+1)*BLOCK) of group (b, g)."""
    block = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    first_channel = (group % NUM_GROUPS) * CHANNELS_PER_GROUP
    # Group means of dz·w·x̂ and dz·w from the per-channel sums of this sample's channels in the group.
    offs_c = tl.arange(0, BLOCK_CPG)
    mask_c = offs_c < CHANNELS_PER_GROUP
    w_group = tl.load(W + first_channel + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    sums_row = group * CHANNELS_PER_GROUP + offs_c  # (b*G + g)*C/G + j == b*C + first_channel + j
    mean_dxhat_xhat = tl.sum(w_group * tl.load(SUM_DZ_XHAT + sums_row, mask=mask_c, other=0.0), 0) / GROUP_SIZE
    mean_dxhat = tl.sum(w_group * tl.load(SUM_DZ + sums_row, mask=mask_c, other=0.0), 0) / GROUP_SIZE

    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < GROUP_SIZE
    channel = first_channel + offs // SPATIAL
    w = tl.load(W + channel, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + channel, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + group * GROUP_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + group * GROUP_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    if SILU:
        _, silu_grad = _silu_and_grad(x_hat * w + b)
        dz = dz * silu_grad
    dx = rstd * (dz * w - mean_dxhat - x_hat * mean_dxhat_xhat)
    tl.store(DX + group * GROUP_SIZE + offs, cast(dx, DX.dtype.element_ty, INTERPRETED_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------------------
# Host side: the custom ops and their autograd.
# ----------------------------------------------------------------------------------------------------------------------

def _stat_splits(groups: int, group_size: int, device: torch.device) -> int:
    """Chunks per group for the statistics pass: enough programs for about four per multiprocessor, each chunk at least
    four of the largest tiles long (below that, launching programs costs more than the reads they spread)."""
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * multiprocessors, groups), group_size // (4 * _MAX_BLOCK)))


def _forward(x, num_groups, weight, bias, eps, silu):
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    channels_per_group = channels // num_groups
    group_size = channels_per_group * spatial
    groups = batch * num_groups

    splits = _stat_splits(groups, group_size, x.device)
    chunk = _MAX_BLOCK * triton.cdiv(triton.cdiv(group_size, _MAX_BLOCK), splits)
    splits = triton.cdiv(group_size, chunk)
    part_sum = torch.empty((groups, splits), device=x.device, dtype=torch.float32)
    part_sumsq = torch.empty_like(part_sum)
    _group_norm_stats_kernel[(splits, groups)](x, part_sum, part_sumsq, group_size, chunk, splits)

    y = torch.empty_like(x)
    mean = torch.empty(groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = lambda meta: (triton.cdiv(group_size, meta["BLOCK"]), groups)
    _group_norm_fwd_kernel[grid](
        x, y, weight, bias, part_sum, part_sumsq, mean, rstd,
        group_size, spatial, channels_per_group, num_groups, splits, eps,
        SILU=silu, BLOCK_SPLITS=triton.next_power_of_2(splits),
        INTERPRETED_BF16=INTERPRETED and x.dtype == torch.bfloat16,
    )
    return y, mean, rstd


def _backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    grad_y = grad_y.contiguous()  # the kernels index dy with x's contiguous layout
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    channels_per_group = channels // num_groups
    group_size = channels_per_group * spatial

    sum_dz_xhat = torch.empty(batch * channels, device=x.device, dtype=torch.float32)
    sum_dz = torch.empty_like(sum_dz_xhat)
    _group_norm_bwd_reduce_kernel[(batch * channels,)](
        x, grad_y, weight, bias, mean, rstd, sum_dz_xhat, sum_dz, spatial, channels, channels_per_group, SILU=silu,
    )
    grad_x = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(group_size, meta["BLOCK"]), batch * num_groups)
    _group_norm_bwd_dx_kernel[grid](
        x, grad_y, grad_x, weight, bias, mean, rstd, sum_dz_xhat, sum_dz,
        group_size, spatial, channels_per_group, num_groups,
        SILU=silu, BLOCK_CPG=triton.next_power_of_2(channels_per_group),
        INTERPRETED_BF16=INTERPRETED and x.dtype == torch.bfloat16,
    )
    grad_weight = sum_dz_xhat.view(batch, channels).sum(0).to(weight.dtype)
    grad_bias = sum_dz.view(batch, channels).sum(0).to(bias.dtype)
    return grad_x, grad_weight, grad_bias


# Custom ops, so that torch.compile traces through the kernels (see flash_attention.py); group_norm_reference is what
# they compute.

@torch.library.custom_op("ldm_kernels::group_norm_forward", mutates_args=())
def group_norm_forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y like x, the float32 mean [B*G] and 1/std [B*G] of each group, which the backward pass reads)."""
    with launch_device(x):
        return _forward(x, num_groups, weight, bias, eps, silu)


@group_norm_forward.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    groups = x.shape[0] * num_groups
    return torch.empty_like(x), x.new_empty(groups, dtype=torch.float32), x.new_empty(groups, dtype=torch.float32)


@torch.library.custom_op("ldm_kernels::group_norm_backward", mutates_args=())
def group_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                        silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dweight, dL/dbias)."""
    with launch_device(x):
        return _backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu)


@group_norm_backward.register_fake
def _(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _save_for_backward(ctx, inputs, output):
    x, num_groups, weight, bias, _, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _group_norm_grads(ctx, grad_y, grad_mean, grad_rstd):
    # grad_mean / grad_rstd are None or zero: the statistics are internal outputs only the backward pass reads.
    x, weight, bias, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = group_norm_backward(grad_y, x, weight, bias, mean, rstd, ctx.num_groups,
                                                         ctx.silu)
    return grad_x, None, grad_weight, grad_bias, None, None


group_norm_forward.register_autograd(_group_norm_grads, setup_context=_save_for_backward)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------------------

def unsupported_reason(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    """Why group_norm cannot take these inputs, or None when it can."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"fused GroupNorm takes float16, bfloat16 or float32 input, got {x.dtype}"
    if x.dim() < 2 or x.numel() == 0:
        return f"fused GroupNorm takes a non-empty [B, C, *spatial] tensor, got shape {tuple(x.shape)}"
    if not x.is_contiguous():
        return "fused GroupNorm needs a contiguous [B, C, *spatial] input (channels-last is not supported); " \
               "call .contiguous() or use the torch backend"
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        return f"{channels} channels cannot be split into {num_groups} groups"
    if weight is None or bias is None or weight.shape != (channels,) or bias.shape != (channels,):
        return f"fused GroupNorm needs weight and bias of shape ({channels},), got " \
               f"{None if weight is None else tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
    if not (weight.is_contiguous() and bias.is_contiguous()):
        return "fused GroupNorm needs contiguous weight and bias"
    if not (x.device == weight.device == bias.device):
        return f"x, weight, bias are on different devices: {x.device}, {weight.device}, {bias.device}"
    return None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm (then SiLU when silu=True) of x: [B, C, *spatial] -> same shape and dtype; float32 statistics.

    Differentiable in x, weight and bias. Raises ValueError for inputs the kernels do not take (see unsupported_reason).
    """
    reason = unsupported_reason(x, num_groups, weight, bias)
    if reason is not None:
        raise ValueError(reason)
    return group_norm_forward(x, num_groups, weight, bias, float(eps), bool(silu))[0]
