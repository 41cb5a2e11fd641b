"""Flash attention, forward and backward, in Triton, for the attention shapes of Stable Diffusion.

Algorithm: FlashAttention-2 (Tri Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", Algorithm 1 for the forward pass, Algorithm 2 for the backward pass). The forward pass walks over key
blocks with an online softmax (running row maximum m and running denominator l, rescaling the output accumulator when m
grows) and never materialises the [Nq, Nk] score matrix; it saves only the per-row log-sum-exp L. The backward pass
recomputes P = exp(S - L) block by block from L, with D = rowsum(dO * O) precomputed so that dS = P * (dP - D).

Why our own kernel: Stable Diffusion 1.x uses head dims 40, 80 and 160, which are not powers of two, and its
cross-attention has 77 keys. Here the head dim is padded to the next power of two (BLOCK_D) only inside the kernel,
by masked loads that read zeros past D, so no padded copy of q, k, v ever exists in memory; key and query counts that
are not multiples of the block size are masked the same way.

Conventions used throughout:
- q: [B, H, Nq, D], k, v: [B, H, Nk, D], any strides ([B, N, H, D] memory seen through .transpose(1, 2) costs no
  copy).
- Scores are kept in base-2 units: S2 = (q kᵀ) * scale * log2(e), so every exponential is an exp2 (one instruction on
  the GPU). The saved log-sum-exp is in the same units: LSE2 = m2 + log2(l) = LSE * log2(e), one float per query row.

File layout (as in the Triton fused-attention tutorial): reference implementation, autotune table, jit kernels,
custom ops with their autograd, public function.
"""
import math
from functools import partial

import torch
import triton
import triton.language as tl

from .triton_helpers import autotune_enabled, cast, dot, launch_device

# Triton decides at @triton.jit time whether a kernel is compiled for the GPU or run by its CPU interpreter
# (TRITON_INTERPRET=1), so the kernels in this module keep the mode that was active when it was imported.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LOG2_E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------------
# Reference implementation: what the kernels compute, in plain PyTorch (float32 or wider inside, result in q's dtype).
# ----------------------------------------------------------------------------------------------------------------------

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v computed in at least float32; q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> [B, H, Nq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) * scale  # [B, H, Nq, Nk]
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.to(compute)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Autotune table: for each kernel and head-dim class (BLOCK_D = 64, 128 or 256), a short list of candidate
# (BLOCK_M, BLOCK_N, num_warps, num_stages), best guess first. The forward and dQ kernels keep a [BLOCK_M, BLOCK_D]
# accumulator and stream key blocks of BLOCK_N rows; the dK/dV kernel keeps two [BLOCK_N, BLOCK_D] accumulators and
# streams query blocks of BLOCK_M rows, so wider heads need shorter tiles. The lists are short on purpose: every
# candidate is compiled the first time a shape is seen, and each compile takes seconds.
# `python -m kernels.compile_check` compiles them for sm_80 and sm_90 without a GPU: all compile, and each list's first
# candidate (the one taken without autotuning) spills no registers on either; some later ones spill on sm_80 only,
# where the autotuner's timing drops them. The order is a guess until GPU timings are recorded. The autotuner is keyed
# on (Nq, Nk, head dim) and the dtypes.
# ----------------------------------------------------------------------------------------------------------------------

_TABLES = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2)],
        128: [(64, 64, 8, 3), (64, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
    },
    "dkdv": {
        64: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
        128: [(64, 32, 8, 3), (32, 32, 4, 3), (32, 32, 8, 3)],
        256: [(32, 32, 8, 2), (32, 32, 8, 3)],
    },
}


def _table_configs(kind: str) -> list[triton.Config]:
    """Every candidate of one kernel, over all head-dim classes, as the autotuner's config list."""
    entries = dict.fromkeys(entry for entries in _TABLES[kind].values() for entry in entries)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in entries]


def _entry(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _head_dim_class(head_dim: int) -> int:
    return max(64, triton.next_power_of_2(head_dim))


# Query rows per split of the dK/dV kernel's query loop must be a whole number of its query blocks.
_DKDV_MAX_BLOCK_M = max(m for entries in _TABLES["dkdv"].values() for m, _, _, _ in entries)


def kept_configs(configs: list[triton.Config], kind: str, n_q: int, n_k: int, head_dim: int) -> list[triton.Config]:
    """The candidates of kernel `kind` ("fwd", "dq" or "dkdv") for one shape, in table order; never none.

    Only the head-dim class's own entries are kept, minus tiles taller than the next power of two of their dimension
    (Nq for BLOCK_M, Nk for BLOCK_N), which only compute padding; if that drops them all, the entry with the smallest
    tiles stays.
    """
    entries = _TABLES[kind][_head_dim_class(head_dim)]
    by_entry = {_entry(config): config for config in configs}
    m_limit, n_limit = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_k))
    kept = [by_entry[entry] for entry in entries if entry[0] <= m_limit and entry[1] <= n_limit]
    return kept or [by_entry[min(entries, key=lambda entry: entry[0] * entry[1])]]


def _prune(configs, named_args, kind: str, **kernel_kwargs):
    """Autotuner hook: the kept candidates, or only the first when timing is off or impossible.

    The interpreter cannot time anything: it gets the candidate with the smallest tiles (more blocks per test shape, so
    every mask and loop edge is exercised). With LDM_KERNELS_AUTOTUNE=0 (see triton_helpers.autotune_enabled) the
    table's first candidate is taken without timing. Either way the autotuner remembers its choice per shape for the
    life of the process.
    """
    args = {**named_args, **kernel_kwargs}
    if INTERPRETED or not args["Q"].is_cuda:
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))]
    kept = kept_configs(configs, kind, args["N_Q"], args["N_K"], args["HEAD_DIM"])
    return kept if autotune_enabled() else kept[:1]


_TUNING_KEY = ["N_Q", "N_K", "HEAD_DIM"]
# A partial last block (77 keys, 100 queries) needs bounds masks; full blocks skip them.
_EVEN_BLOCKS = {
    "EVEN_M": lambda args: args["N_Q"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["N_K"] % args["BLOCK_N"] == 0,
}


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr):
    """Load a [len(rows), BLOCK_D] tile, reading zeros for rows >= n_rows and for the padding columns D..BLOCK_D."""
    if EVEN_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, tile, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_ROWS: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """Store the valid part of a [len(rows), BLOCK_D] tile, cast to the destination's element type."""
    tile = cast(tile, ptrs.dtype.element_ty, INTERPRETED_BF16)
    if EVEN_ROWS:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, tile)
        else:
            tl.store(ptrs, tile, mask=offs_d[None, :] < HEAD_DIM)
    else:
        if HEAD_DIM == BLOCK_D:
            tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.autotune(configs=_table_configs("fwd"), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": partial(_prune, kind="fwd")})
@triton.heuristics(_EVEN_BLOCKS)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    N_HEADS, N_Q, N_K, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """FlashAttention-2 Algorithm 1: program (i, b*H + h) computes output rows [i*BLOCK_M, (i+1)*BLOCK_M) of head
    (b, h)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // N_HEADS).to(tl.int64)
    head = (batch_head % N_HEADS).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    O += batch * stride_ob + head * stride_oh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, offs_m, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_M)  # [BLOCK_M, BLOCK_D]

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # m_i, base-2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)                # l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)           # unnormalised O_i
    for start_n in range(0, N_K, BLOCK_N):
        offs_kv = start_n + offs_n
        k = _load_tile(K + offs_kv[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_kv, N_K, offs_d,
                       HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
        scores = dot(q, tl.trans(k), INTERPRETED_BF16) * qk_scale_log2  # S2: [BLOCK_M, BLOCK_N]
        if not EVEN_N:
            scores = tl.where(offs_kv[None, :] < N_K, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)  # rescales what was accumulated under the old maximum
        row_sum = row_sum * correction + tl.sum(p, 1)
        v = _load_tile(V + offs_kv[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_kv, N_K, offs_d,
                       HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
        acc = acc * correction[:, None] + dot(cast(p, v.dtype, INTERPRETED_BF16), v, INTERPRETED_BF16)
        row_max = new_max

    # The division by l happens once, after the loop (FlashAttention-2's change to Algorithm 1 of FlashAttention).
    acc = acc / row_sum[:, None]
    _store_tile(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc, offs_m, N_Q, offs_d,
                HEAD_DIM, BLOCK_D, EVEN_M, INTERPRETED_BF16)
    lse_ptrs = LSE2 + batch_head.to(tl.int64) * N_Q + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, row_max + tl.log2(row_sum))
    else:
        tl.store(lse_ptrs, row_max + tl.log2(row_sum), mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    N_HEADS, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """D = rowsum(dO * O) in float32: [B*H, Nq] (FlashAttention-2 Algorithm 2, line 4)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // N_HEADS).to(tl.int64)
    head = (batch_head % N_HEADS).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                   offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, False)
    do = _load_tile(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_don
                    + offs_d[None, :] * stride_dod, offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + batch_head.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.autotune(configs=_table_configs("dkdv"), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": partial(_prune, kind="dkdv")})
@triton.heuristics(_EVEN_BLOCKS)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE2, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N_HEADS, N_Q, N_K, ROWS_PER_SPLIT, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """dK, dV for one key block (FlashAttention-2 Algorithm 2: outer loop over key blocks, inner over query blocks).

    Program (j, b*H + h, s) owns keys [j*BLOCK_N, (j+1)*BLOCK_N) and walks query rows
    [s*ROWS_PER_SPLIT, (s+1)*ROWS_PER_SPLIT). With one split it writes dK, dV directly; with several (cross-attention
    has only one or two key blocks per head, too few programs to fill a GPU) each split writes its float32 partial sum
    to slice s of DK/DV, and the host adds the slices. Everything is computed transposed ([keys, queries]) so that the
    accumulators stay in rows of the key block.
    """
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    split = tl.program_id(2)
    batch = (batch_head // N_HEADS).to(tl.int64)
    head = (batch_head % N_HEADS).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    DK += split.to(tl.int64) * stride_dks + batch * stride_dkb + head * stride_dkh
    DV += split.to(tl.int64) * stride_dvs + batch * stride_dvb + head * stride_dvh
    LSE2 += batch_head.to(tl.int64) * N_Q
    DELTA += batch_head.to(tl.int64) * N_Q

    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, N_K, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, N_K, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    first_row = split * ROWS_PER_SPLIT
    end_row = tl.minimum(first_row + ROWS_PER_SPLIT, N_Q)
    for start_m in range(first_row, end_row, BLOCK_M):
        offs_q = start_m + offs_m
        q = _load_tile(Q + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd, offs_q, N_Q, offs_d,
                       HEAD_DIM, BLOCK_D, EVEN_M)  # [BLOCK_M, BLOCK_D]
        do = _load_tile(DO + offs_q[:, None] * stride_don + offs_d[None, :] * stride_dod, offs_q, N_Q, offs_d,
                        HEAD_DIM, BLOCK_D, EVEN_M)  # [BLOCK_M, BLOCK_D]
        if EVEN_M:
            lse = tl.load(LSE2 + offs_q)
            delta = tl.load(DELTA + offs_q)
        else:
            # An infinite LSE makes P exactly zero for the padding rows past Nq, so they add nothing to dK or dV.
            lse = tl.load(LSE2 + offs_q, mask=offs_q < N_Q, other=float("inf"))
            delta = tl.load(DELTA + offs_q, mask=offs_q < N_Q, other=0.0)
        scores_t = dot(k, tl.trans(q), INTERPRETED_BF16) * qk_scale_log2  # S2ᵀ: [BLOCK_N, BLOCK_M]
        if not EVEN_N:
            # Padding keys' rows are never stored, but keep them finite: exp2(0 - LSE2) can overflow.
            scores_t = tl.where(offs_n[:, None] < N_K, scores_t, float("-inf"))
        p_t = tl.exp2(scores_t - lse[None, :])  # Pᵀ
        # dV += Pᵀ dO
        dv += dot(cast(p_t, do.dtype, INTERPRETED_BF16), do, INTERPRETED_BF16)
        # dSᵀ = Pᵀ ∘ (dPᵀ − D) with dPᵀ = V dOᵀ
        ds_t = p_t * (dot(v, tl.trans(do), INTERPRETED_BF16) - delta[None, :])
        # dK += dSᵀ Q (times scale, applied once at the end)
        dk += dot(cast(ds_t, q.dtype, INTERPRETED_BF16), q, INTERPRETED_BF16)

    # Rows of the key block past Nk hold garbage gradients of zero-padded keys; the masked store drops them.
    _store_tile(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk * scale, offs_n, N_K, offs_d,
                HEAD_DIM, BLOCK_D, EVEN_N, INTERPRETED_BF16)
    _store_tile(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv, offs_n, N_K, offs_d,
                HEAD_DIM, BLOCK_D, EVEN_N, INTERPRETED_BF16)


@triton.autotune(configs=_table_configs("dq"), key=_TUNING_KEY,
                 prune_configs_by={"early_config_prune": partial(_prune, kind="dq")})
@triton.heuristics(_EVEN_BLOCKS)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE2, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    N_HEADS, N_Q, N_K, scale, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    """dQ for one query block, looping over key blocks (FlashAttention-2's separate dQ pass: no atomics needed)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // N_HEADS).to(tl.int64)
    head = (batch_head % N_HEADS).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    DQ += batch * stride_dqb + head * stride_dqh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, offs_m, N_Q, offs_d,
                   HEAD_DIM, BLOCK_D, EVEN_M)  # [BLOCK_M, BLOCK_D]
    do = _load_tile(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, offs_m, N_Q, offs_d,
                    HEAD_DIM, BLOCK_D, EVEN_M)  # [BLOCK_M, BLOCK_D]
    if EVEN_M:
        lse = tl.load(LSE2 + batch_head.to(tl.int64) * N_Q + offs_m)
        delta = tl.load(DELTA + batch_head.to(tl.int64) * N_Q + offs_m)
    else:
        lse = tl.load(LSE2 + batch_head.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=float("inf"))
        delta = tl.load(DELTA + batch_head.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_kv = start_n + offs_n
        k = _load_tile(K + offs_kv[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_kv, N_K, offs_d,
                       HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
        v = _load_tile(V + offs_kv[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_kv, N_K, offs_d,
                       HEAD_DIM, BLOCK_D, EVEN_N)  # [BLOCK_N, BLOCK_D]
        scores = dot(q, tl.trans(k), INTERPRETED_BF16) * qk_scale_log2  # S2: [BLOCK_M, BLOCK_N]
        if not EVEN_N:
            # Padding keys must get P = 0 exactly: exp2(0 - LSE2) could overflow when every real score is very negative.
            scores = tl.where(offs_kv[None, :] < N_K, scores, float("-inf"))
        p = tl.exp2(scores - lse[:, None])
        # dS = P ∘ (dP − D) with dP = dO Vᵀ
        ds = p * (dot(do, tl.trans(v), INTERPRETED_BF16) - delta[:, None])
        # dQ += dS K (times scale, applied once at the end)
        dq += dot(cast(ds, k.dtype, INTERPRETED_BF16), k, INTERPRETED_BF16)
    _store_tile(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq * scale, offs_m, N_Q, offs_d,
                HEAD_DIM, BLOCK_D, EVEN_M, INTERPRETED_BF16)


# ----------------------------------------------------------------------------------------------------------------------
# Host side: launches and the custom ops.
# ----------------------------------------------------------------------------------------------------------------------

def _dkdv_query_splits(n_q: int, n_k: int, batch_heads: int, device: torch.device) -> int:
    """How many slices to cut the dK/dV kernel's query loop into.

    Self-attention has Nk/BLOCK_N key blocks per head, plenty of programs. Cross-attention over 77 text tokens has one
    or two, so B*H programs would each walk all 4096 queries while most of the GPU idles; splitting the query loop
    gives every multiprocessor about two programs, at the cost of float32 partial sums of dK/dV (77 rows each).
    """
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch_heads * triton.cdiv(n_k, 128)
    wanted = triton.cdiv(2 * multiprocessors, programs)
    # Each slice keeps at least 512 query rows so the partial sums stay a small fraction of the work.
    return max(1, min(wanted, n_q // 512))


def _preprocess_rows(block_d: int) -> int:
    """Query rows per program of the D = rowsum(dO * O) kernel: its two [rows, BLOCK_D] float32 tiles must fit in
    registers without spilling (checked with python -m kernels.compile_check)."""
    return max(16, 2048 // block_d)


def _forward(q, k, v, scale):
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    out = torch.empty_like(q)  # keeps q's memory layout, e.g. [B, N, H, D] seen as [B, H, N, D]
    lse2 = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse2,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_q, n_k, scale * LOG2_E,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        INTERPRETED_BF16=INTERPRETED and q.dtype == torch.bfloat16,
    )
    return out, lse2


def _backward(q, k, v, out, lse2, grad_out, scale):
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    interpreted_bf16 = INTERPRETED and q.dtype == torch.bfloat16

    delta = torch.empty_like(lse2)  # [B, H, Nq] float32
    rows = _preprocess_rows(block_d)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, rows), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=rows,
    )

    splits = _dkdv_query_splits(n_q, n_k, batch * heads, q.device)
    rows_per_split = _DKDV_MAX_BLOCK_M * triton.cdiv(triton.cdiv(n_q, _DKDV_MAX_BLOCK_M), splits)
    splits = triton.cdiv(n_q, rows_per_split)
    if splits == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_out, dv_out = dk.unsqueeze(0), dv.unsqueeze(0)  # [1, B, H, Nk, D] views: the split stride is never used
    else:
        dk_out = torch.empty((splits, *k.shape), device=k.device, dtype=torch.float32)
        dv_out = torch.empty((splits, *v.shape), device=v.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * heads, splits)
    _attn_bwd_dkdv_kernel[grid](
        q, k, v, grad_out, dk_out, dv_out, lse2, delta,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk_out.stride(), *dv_out.stride(),
        heads, n_q, n_k, rows_per_split, scale, scale * LOG2_E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, INTERPRETED_BF16=interpreted_bf16,
    )
    if splits > 1:  # copied into k's and v's layouts, which the custom op's fake implementation promises
        dk = torch.empty_like(k).copy_(dk_out.sum(0))
        dv = torch.empty_like(v).copy_(dv_out.sum(0))

    dq = torch.empty_like(q)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)
    _attn_bwd_dq_kernel[grid](
        q, k, v, grad_out, dq, lse2, delta,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        heads, n_q, n_k, scale, scale * LOG2_E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, INTERPRETED_BF16=interpreted_bf16,
    )
    return dq, dk, dv


# The kernels are torch.library custom ops so that torch.compile traces through them (one opaque node each in the graph,
# shapes from the fake implementations) instead of breaking the graph at the Triton launch; autograd is registered on
# the op, so the same op serves training. The PyTorch reference (dispatch.attention's fallback) is what they compute.

@torch.library.custom_op("ldm_kernels::flash_attention_forward", mutates_args=())
def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O [B, H, Nq, D] in q's layout, LSE2 [B, H, Nq] float32: the base-2 log-sum-exp the backward pass needs)."""
    with launch_device(q):
        return _forward(q, k, v, scale)


@flash_attention_forward.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ldm_kernels::flash_attention_backward", mutates_args=())
def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse2: torch.Tensor, grad_out: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), each in the layout of q, k, v."""
    with launch_device(q):
        return _backward(q, k, v, out, lse2, grad_out, scale)


@flash_attention_backward.register_fake
def _(q, k, v, out, lse2, grad_out, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.scale = scale


def _flash_attention_grads(ctx, grad_out, grad_lse2):
    # grad_lse2 is None or zero: LSE2 is an internal output that only the backward pass reads.
    q, k, v, out, lse2 = ctx.saved_tensors
    return (*flash_attention_backward(q, k, v, out, lse2, grad_out, ctx.scale), None)


flash_attention_forward.register_autograd(_flash_attention_grads, setup_context=_save_for_backward)


# ----------------------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------------------

def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flash_attention cannot take these inputs (dtype, rank, shapes, devices), or None when it can."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"flash attention takes float16 or bfloat16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                "cast them (e.g. under torch.autocast) or use the torch backend")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"flash attention takes 4-d [B, H, N, D] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, " \
               f"{tuple(v.shape)}"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"flash attention needs q: [B, H, Nq, D] and k, v: [B, H, Nk, D], got {tuple(q.shape)}, " \
               f"{tuple(k.shape)}, {tuple(v.shape)}"
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        return f"flash attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[3]}"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return f"flash attention needs at least one query and one key, got Nq={q.shape[2]}, Nk={k.shape[2]}"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with q: [B, H, Nq, D], k, v: [B, H, Nk, D] -> [B, H, Nq, D] (in q's memory layout).

    float16/bfloat16 inputs with float32 accumulation; scale defaults to D^-0.5; differentiable in q, k and v.
    Raises ValueError for inputs the kernel does not take (see unsupported_reason).
    """
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(reason)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention scale must be finite, got {scale}")
    return flash_attention_forward(q, k, v, scale)[0]
