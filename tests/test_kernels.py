"""Tests for kernels/: Triton flash attention, fused GroupNorm(+SiLU) and GEGLU, the backend dispatch and the benchmark.

Running the kernels without a GPU: Triton's CPU interpreter. Triton 3.9 reads TRITON_INTERPRET when a kernel is
decorated with @triton.jit (triton.knobs.runtime.interpret, checked inside triton.jit), not when triton is imported, so
the variable must be set before kernels.flash_attention / fused_group_norm / fused_geglu are first imported. This
module sets it before importing them when no CUDA GPU is visible. When that is too late (another test module imported
the kernel modules compiled) or not wanted (on a GPU machine the CUDA tests need compiled kernels), the interpreter
tests skip here and run instead, all together, in a fresh process: test_interpreter_tests_pass_in_a_fresh_process.

Accuracy rule (from the flash-attn test suite): the kernel's max abs error against a high-precision reference computed
from the same low-precision inputs must be at most 2× the max abs error that PyTorch itself makes in that low-precision
dtype, for the output and for every gradient. The PyTorch low-precision baseline is the operation written as plain
PyTorch ops in the input dtype (attention: q kᵀ, softmax, P v, each rounded to fp16/bf16, which is flash-attn's
`attention_ref(upcast=False)`; GroupNorm: F.group_norm then F.silu; GEGLU: chunk, F.gelu, multiply). PyTorch's fused
SDPA is deliberately not the CPU baseline: measured on this CPU build, its math backend upcasts fp16/bf16 to fp32
internally (its error is the final rounding alone, ~half an ulp), and its CPU flash kernel is not documented to round P
as a GPU kernel must; our errors do track that kernel (≤1.25× at N ≥ 64 over every head dim, up to 1.8× at Nq = 1),
but a rule should not rest on an undocumented implementation. The reference is float64 on the CPU and for float32
inputs, float32 (no TF32) for fp16/bf16 inputs on the GPU: always well above the inputs' precision (a float32 reference
for float32 inputs would make PyTorch's own error zero; the first GPU run failed GroupNorm that way).
"""
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_KERNEL_MODULES = ("kernels.flash_attention", "kernels.fused_group_norm", "kernels.fused_geglu")
if not torch.cuda.is_available() and not any(name in sys.modules for name in _KERNEL_MODULES):
    os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402  (after TRITON_INTERPRET, see the module docstring)
from kernels import dispatch  # noqa: E402
from kernels import flash_attention as flash_module  # noqa: E402
from kernels import fused_geglu as geglu_module  # noqa: E402
from kernels import fused_group_norm as group_norm_module  # noqa: E402
from kernels import triton_helpers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = all(module.INTERPRETED for module in (flash_module, group_norm_module, geglu_module))
HAS_CUDA = torch.cuda.is_available()

interpreter_test = pytest.mark.skipif(
    not INTERPRETED, reason="the kernel modules in this process are compiled for the GPU; the interpreter tests run in "
                            "a fresh process instead (test_interpreter_tests_pass_in_a_fresh_process)")
requires_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRETED,
                                   reason="needs a CUDA GPU and compiled (not interpreted) kernels")


def _max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.to(reference.dtype) - reference).abs().max().item()


def assert_within_twice_pytorch_error(name: str, ours: torch.Tensor, pytorch: torch.Tensor, reference: torch.Tensor):
    """The flash-attn rule: our max abs error vs the reference is at most 2× PyTorch's own in the same dtype.

    Floor: two units in the last place at the reference's largest magnitude. Below that both errors are a rounding or
    two in a different order of operations and their ratio is noise; it matters for float32 inputs, where PyTorch's own
    error is itself a fraction of an ulp.
    """
    ours_error, pytorch_error = _max_error(ours, reference), _max_error(pytorch, reference)
    two_ulps = 2 * torch.finfo(ours.dtype).eps * reference.abs().max().item()
    assert ours_error <= max(2 * pytorch_error, two_ulps), (
        f"{name}: max abs error {ours_error:.3g} exceeds 2x PyTorch's own {ours.dtype} error {pytorch_error:.3g} "
        f"(and two ulps, {two_ulps:.3g})")


def _outputs_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. every input, on fresh leaf copies."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def _reference_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.device.type == "cpu" or tensor.dtype == torch.float32 else torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# Flash attention.
# ----------------------------------------------------------------------------------------------------------------------

def pytorch_attention_same_dtype(q, k, v, scale=None):
    """Attention as plain PyTorch ops in q's dtype, every intermediate rounded to fp16/bf16: the low-precision
    baseline."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


def _attention_inputs(batch, heads, n_q, n_k, head_dim, dtype, layout, device="cpu", seed=0):
    """q: [B, H, Nq, D], k, v: [B, H, Nk, D] and dO, either contiguous ("bhnd") or as transposed views of [B, N, H, D]
    memory ("bnhd"), which is how the models' projections lay them out."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def make(n):
        if layout == "bnhd":
            bnhd = torch.randn(batch, n, heads, head_dim, generator=generator, device=device, dtype=dtype)
            return bnhd.transpose(1, 2)
        return torch.randn(batch, heads, n, head_dim, generator=generator, device=device, dtype=dtype)

    return make(n_q), make(n_k), make(n_k), make(n_q)


def check_attention_against_pytorch(q, k, v, grad_out, scale=None):
    """Forward output and dq, dk, dv of flash_attention within 2× of PyTorch's same-dtype error."""
    high = _reference_dtype(q)
    reference = _outputs_and_grads(lambda *t: flash_module.attention_reference(*t, scale),
                                   [t.to(high) for t in (q, k, v)], grad_out.to(high))
    pytorch = _outputs_and_grads(lambda *t: pytorch_attention_same_dtype(*t, scale), [q, k, v], grad_out)
    ours = _outputs_and_grads(lambda *t: flash_module.flash_attention(*t, scale), [q, k, v], grad_out)
    for name, mine, theirs, ref in zip(("out", "dq", "dk", "dv"), ours, pytorch, reference):
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        assert_within_twice_pytorch_error(name, mine, theirs, ref)


# Every SD head dim, both dtypes, 77 text keys, queries and keys that are not multiples of the block size, both memory
# layouts and a non-default scale, spread over a few cases (the interpreter is slow); the full product is marked slow.
ATTENTION_CASES = [
    # head_dim, n_q, n_k, dtype, layout, scale
    (40, 128, 77, torch.bfloat16, "bhnd", None),   # SD1.5 cross-attention, level 1
    (40, 128, 128, torch.float16, "bnhd", None),   # SD1.5 self-attention, level 1
    (64, 100, 100, torch.bfloat16, "bnhd", 0.3),   # SD2 / SDXL heads, partial blocks
    (80, 128, 77, torch.float16, "bhnd", None),    # SD1.5 level 2
    (96, 77, 96, torch.bfloat16, "bhnd", None),
    (128, 100, 77, torch.float16, "bnhd", None),
    (160, 128, 77, torch.bfloat16, "bhnd", None),  # SD1.5 level 3
    (160, 100, 128, torch.float16, "bnhd", None),
]


@interpreter_test
@pytest.mark.parametrize("head_dim, n_q, n_k, dtype, layout, scale", ATTENTION_CASES)
def test_flash_attention_output_and_gradients_within_twice_pytorch_error(head_dim, n_q, n_k, dtype, layout, scale):
    q, k, v, grad_out = _attention_inputs(1, 2, n_q, n_k, head_dim, dtype, layout)
    check_attention_against_pytorch(q, k, v, grad_out, scale)


@interpreter_test
@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [40, 64, 80, 96, 128, 160])
@pytest.mark.parametrize("n_q, n_k", [(128, 128), (128, 77), (100, 100), (1, 77), (77, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_flash_attention_within_twice_pytorch_error_for_every_combination(head_dim, n_q, n_k, dtype, layout):
    q, k, v, grad_out = _attention_inputs(1, 2, n_q, n_k, head_dim, dtype, layout)
    check_attention_against_pytorch(q, k, v, grad_out)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_single_key_attention_copies_the_value_and_has_no_query_or_key_gradient(dtype):
    # One key: softmax is exactly 1, so out = v, dV = Σ_queries dO and dQ = dK = 0 (dS = P (dP − rowsum(dO·O)) = 0).
    # PyTorch gets exact zeros there, so the relative rule cannot apply; the kernel's float32 roundoff must stay tiny.
    q, k, v, grad_out = _attention_inputs(1, 2, 77, 1, 40, dtype, "bhnd")
    out, dq, dk, dv = _outputs_and_grads(flash_module.flash_attention, [q, k, v], grad_out)
    assert torch.equal(out, v.expand_as(out))
    assert dq.abs().max().item() < 1e-4 and dk.abs().max().item() < 1e-4
    torch.testing.assert_close(dv, grad_out.float().sum(dim=2, keepdim=True).to(dtype))  # default fp16/bf16 tolerances


@interpreter_test
def test_bnhd_views_give_bitwise_the_same_results_and_keep_their_layout():
    q, k, v, grad_out = _attention_inputs(2, 2, 64, 77, 40, torch.float16, "bnhd")
    strided = _outputs_and_grads(flash_module.flash_attention, [q, k, v], grad_out)
    contiguous = _outputs_and_grads(flash_module.flash_attention, [t.contiguous() for t in (q, k, v)],
                                    grad_out.contiguous())
    for name, a, b in zip(("out", "dq", "dk", "dv"), strided, contiguous):
        assert torch.equal(a, b), f"{name} differs between [B, N, H, D] views and contiguous [B, H, N, D]"
    out = flash_module.flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous(), "the output should keep q's [B, N, H, D] memory layout"


@interpreter_test
def test_split_query_loop_of_dk_dv_matches_pytorch_error_budget(monkeypatch):
    # Cross-attention on a GPU splits the dK/dV kernel's query loop and sums float32 partials; force that here.
    calls = []

    def two_splits(*args):
        calls.append(args)
        return 2

    monkeypatch.setattr(flash_module, "_dkdv_query_splits", two_splits)
    q, k, v, grad_out = _attention_inputs(1, 2, 128, 77, 40, torch.bfloat16, "bhnd", seed=1)
    check_attention_against_pytorch(q, k, v, grad_out)
    assert calls, "the backward pass did not ask for a query split"


@interpreter_test
def test_padding_keys_stay_harmless_when_every_score_is_very_negative():
    # All scores = -200 (natural units): LSE is about -196, so a padding key's unmasked weight exp(0 - LSE) would
    # overflow float32 and poison dQ with inf * 0 = NaN. 77 keys leave a partial key block.
    head_dim, n_k = 64, 77
    q = torch.full((1, 1, 16, head_dim), -5.0, dtype=torch.float16)
    k = torch.full((1, 1, n_k, head_dim), 5.0, dtype=torch.float16)
    v = torch.randn(1, 1, n_k, head_dim, generator=torch.Generator().manual_seed(0)).half()
    grad_out = torch.randn(1, 1, 16, head_dim, generator=torch.Generator().manual_seed(1)).half()
    check_attention_against_pytorch(q, k, v, grad_out)


def test_flash_attention_rejects_inputs_it_cannot_take_with_the_reason():
    q = torch.randn(1, 2, 8, 40)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        flash_module.flash_attention(q, q, q)
    wide = torch.randn(1, 2, 8, 320, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dims up to 256"):
        flash_module.flash_attention(wide, wide, wide)
    q16, k16 = q.half(), torch.randn(1, 2, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k, v: \[B, H, Nk, D\]"):
        flash_module.flash_attention(q16, k16, k16)


# ----------------------------------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU).
# ----------------------------------------------------------------------------------------------------------------------

def pytorch_group_norm_same_dtype(x, weight, bias, num_groups, silu, eps=1e-5):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def check_group_norm_against_pytorch(x, weight, bias, num_groups, silu, grad_out):
    high = _reference_dtype(x)
    reference = _outputs_and_grads(lambda x_, w, b: group_norm_module.group_norm_reference(x_, num_groups, w, b, 1e-5,
                                                                                             silu),
                                   [t.to(high) for t in (x, weight, bias)], grad_out.to(high))
    pytorch = _outputs_and_grads(lambda *t: pytorch_group_norm_same_dtype(*t, num_groups, silu), [x, weight, bias],
                                 grad_out)
    ours = _outputs_and_grads(lambda x_, w, b: group_norm_module.group_norm(x_, num_groups, w, b, 1e-5, silu),
                              [x, weight, bias], grad_out)
    for name, mine, theirs, ref in zip(("y", "dx", "dweight", "dbias"), ours, pytorch, reference):
        assert_within_twice_pytorch_error(name, mine, theirs, ref)


def _group_norm_inputs(shape, dtype, mean=0.5, std=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[1], generator=generator)).to(dtype)
    bias = (0.5 * torch.randn(shape[1], generator=generator)).to(dtype)
    grad_out = torch.randn(shape, generator=generator).to(dtype)
    return x, weight, bias, grad_out


@interpreter_test
@pytest.mark.parametrize("shape, num_groups, dtype, silu", [
    ((2, 12, 7, 9), 3, torch.bfloat16, True),   # odd spatial size, two samples
    ((1, 8, 20, 20), 4, torch.float16, True),   # several tiles per group, the last one partial
    ((1, 8, 20, 20), 4, torch.bfloat16, False),
    ((2, 6, 50), 3, torch.float32, True),       # 1-d spatial, float32 against a float64 reference
])
def test_group_norm_output_and_gradients_within_twice_pytorch_error(shape, num_groups, dtype, silu):
    x, weight, bias, grad_out = _group_norm_inputs(shape, dtype)
    check_group_norm_against_pytorch(x, weight, bias, num_groups, silu, grad_out)


@interpreter_test
def test_group_norm_split_statistics_add_up_to_the_whole_group(monkeypatch):
    # On a GPU the statistics of a large group are reduced in chunks by separate programs; force that here.
    monkeypatch.setattr(group_norm_module, "_stat_splits", lambda *args: 3)
    x, weight, bias, grad_out = _group_norm_inputs((1, 4, 40, 40), torch.bfloat16, seed=2)
    check_group_norm_against_pytorch(x, weight, bias, 2, True, grad_out)


@interpreter_test
# The padding lanes of a partial tile load x = 0, so z = (0 - 1000) · rstd · w + b and the interpreter's numpy sigmoid
# overflows exp(-z) to inf (giving the right limit, 0); those lanes are never stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_group_norm_variance_stays_accurate_when_the_mean_dwarfs_the_spread():
    # mean 1000, std 1: E[x²] − E[x]² in float32 would lose the variance to cancellation; the shifted sums keep it.
    x, weight, bias, grad_out = _group_norm_inputs((2, 4, 16, 16), torch.float32, mean=1000.0, std=1.0)
    check_group_norm_against_pytorch(x, weight, bias, 2, True, grad_out)


# ----------------------------------------------------------------------------------------------------------------------
# GEGLU.
# ----------------------------------------------------------------------------------------------------------------------

def pytorch_geglu_same_dtype(h):
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def check_geglu_against_pytorch(h, grad_out):
    high = _reference_dtype(h)
    (ref_y, ref_dh), (pt_y, pt_dh), (y, dh) = (
        _outputs_and_grads(geglu_module.geglu_reference, [h.to(high)], grad_out.to(high)),
        _outputs_and_grads(pytorch_geglu_same_dtype, [h], grad_out),
        _outputs_and_grads(geglu_module.geglu, [h], grad_out),
    )
    assert_within_twice_pytorch_error("y", y, pt_y, ref_y)
    assert_within_twice_pytorch_error("dh", dh, pt_dh, ref_dh)


@interpreter_test
@pytest.mark.parametrize("shape, dtype", [
    ((2, 3, 2 * 96), torch.bfloat16),
    ((3, 2 * 700), torch.float16),    # F = 700: two tiles, the last one partial
    ((2, 5, 2 * 40), torch.float32),
])
def test_geglu_output_and_gradient_within_twice_pytorch_error(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    h = (2 * torch.randn(shape, generator=generator)).to(dtype)
    grad_out = torch.randn(*shape[:-1], shape[-1] // 2, generator=generator).to(dtype)
    check_geglu_against_pytorch(h, grad_out)


@interpreter_test
def test_geglu_reads_row_strided_views_without_a_copy():
    # A [rows, 2F] slice of a wider buffer: rows are strided, features adjacent.
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(6, 2 * 64 + 10, generator=generator).to(torch.bfloat16)
    h = buffer[:, : 2 * 64]
    assert geglu_module.unsupported_reason(h) is None
    grad_out = torch.randn(6, 64, generator=generator).to(torch.bfloat16)
    check_geglu_against_pytorch(h, grad_out)


# ----------------------------------------------------------------------------------------------------------------------
# The kernels as torch.library custom ops (what lets torch.compile trace through the dispatch point).
# ----------------------------------------------------------------------------------------------------------------------

def _custom_op_cases():
    """(op, args) with tiny shapes, inputs requiring grad so opcheck also checks the registered autograd and traces the
    backward op through AOT autograd."""
    q, k, v, _ = _attention_inputs(1, 2, 5, 3, 8, torch.float16, "bnhd")
    x, weight, bias, _ = _group_norm_inputs((2, 4, 3, 3), torch.float32)
    h = torch.randn(2, 3, 2 * 16, generator=torch.Generator().manual_seed(0))
    return [
        ("flash_attention", flash_module.flash_attention_forward,
         tuple(t.detach().requires_grad_() for t in (q, k, v)) + (0.3,)),
        ("group_norm", group_norm_module.group_norm_forward,
         (x.requires_grad_(), 2, weight.requires_grad_(), bias.requires_grad_(), 1e-5, True)),
        ("geglu", geglu_module.geglu_forward, (h.requires_grad_(),)),
    ]


@interpreter_test
@pytest.mark.parametrize("case", range(3), ids=["flash_attention", "group_norm", "geglu"])
def test_kernels_pass_torch_library_opcheck_under_the_interpreter(case):
    # opcheck: the schema, the fake (meta) implementation against the real kernel's output metadata, the autograd
    # registration, and AOT dispatch with dynamic shapes, which is what torch.compile does with the op. The real
    # kernels run here, under Triton's CPU interpreter.
    _, op, args = _custom_op_cases()[case]
    torch.library.opcheck(op, args)


@interpreter_test
def test_torch_compile_traces_through_the_dispatch_point_into_the_custom_ops():
    # fullgraph=True fails on any graph break, so the backend choice in kernels.dispatch and the three kernels must
    # trace into one graph; aot_eager runs that graph's ops as they are (the kernels under the interpreter, here), so
    # the compiled function must give bitwise the eager outputs and gradients.
    q, k, v, grad_out = _attention_inputs(1, 2, 5, 3, 8, torch.float16, "bnhd")
    x, weight, bias, _ = _group_norm_inputs((1, 4, 2, 3), torch.float16)

    def block(q, k, v, x, weight, bias):
        attended = kernels.attention(q, k, v)  # [1, 2, 5, 8]
        gated = kernels.geglu(attended.contiguous())  # [1, 2, 5, 4]
        return gated.sum() + kernels.group_norm(x, 2, weight, bias, 1e-5, silu=True).float().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with kernels.use_backend("triton"):
        results = []
        for function in (block, compiled):
            inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, x, weight, bias)]
            out = function(*inputs)
            results.append([out.detach(), *torch.autograd.grad(out, inputs)])
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_backend_override():
    """Each dispatch test starts and ends with no set_backend override."""
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def _spy(monkeypatch, module, function_name):
    """Count calls to module.function_name while still running it."""
    calls = []
    original = getattr(module, function_name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, spy)
    return calls


def _dispatch_calls():
    """(public function, kernel module, kernel function name, inputs) for each dispatched op, on small fp16 CPU data."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 16, 40, generator=generator).half()
    x = torch.randn(1, 4, 4, 4, generator=generator).half()
    weight, bias = torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)
    h = torch.randn(3, 2 * 16, generator=generator).half()
    return [
        (lambda: kernels.attention(q, q, q), flash_module, "flash_attention"),
        (lambda: kernels.group_norm(x, 2, weight, bias, 1e-5, silu=True), group_norm_module, "group_norm"),
        (lambda: kernels.geglu(h), geglu_module, "geglu"),
    ]


@interpreter_test
@pytest.mark.usefixtures("no_backend_override")
@pytest.mark.parametrize("op_index", range(3), ids=["attention", "group_norm", "geglu"])
def test_environment_variable_picks_the_backend_at_every_call(monkeypatch, op_index):
    call, module, function_name = _dispatch_calls()[op_index]
    calls = _spy(monkeypatch, module, function_name)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    triton_result = call()
    assert len(calls) == 1
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    torch_result = call()
    monkeypatch.setenv(kernels.ENV_VAR, "auto")  # CPU tensors: auto means PyTorch
    auto_result = call()
    assert len(calls) == 1, "the torch and auto backends must not call the Triton kernel on CPU tensors"
    assert torch.equal(torch_result, auto_result)
    torch.testing.assert_close(triton_result, torch_result, atol=2e-2, rtol=2e-2)


@interpreter_test
@pytest.mark.usefixtures("no_backend_override")
def test_set_backend_overrides_the_environment_and_use_backend_restores_it(monkeypatch):
    call, module, function_name = _dispatch_calls()[0]
    calls = _spy(monkeypatch, module, function_name)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    kernels.set_backend("triton")
    call()
    assert len(calls) == 1 and kernels.get_backend() == "triton"
    with kernels.use_backend("torch"):
        call()
        assert kernels.get_backend() == "torch"
    assert len(calls) == 1
    assert kernels.get_backend() == "triton", "use_backend must restore the previous override"
    kernels.set_backend(None)
    assert kernels.get_backend() == "torch", "set_backend(None) must hand control back to the environment variable"


def test_importing_the_kernel_modules_keeps_the_public_functions_callable():
    # Importing a submodule binds it as an attribute of its package: a kernel module named like a public function
    # (kernels/group_norm.py) would replace kernels.group_norm with a module the first time the dispatch imported it.
    assert kernels.attention is dispatch.attention
    assert kernels.group_norm is dispatch.group_norm
    assert kernels.geglu is dispatch.geglu


@pytest.mark.usefixtures("no_backend_override")
def test_unknown_backend_names_are_rejected_with_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.set_backend("cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=f"{kernels.ENV_VAR}.*'fast'"):
        kernels.attention(q, q, q)


@interpreter_test
@pytest.mark.usefixtures("no_backend_override")
def test_forced_triton_raises_instead_of_falling_back(monkeypatch):
    q32 = torch.randn(1, 2, 8, 40)
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="float16 or bfloat16"):
        kernels.attention(q32, q32, q32)
    # Compiled (not interpreted) kernels cannot take CPU tensors; the error says how to run them on the CPU.
    monkeypatch.setattr(flash_module, "INTERPRETED", False)
    q16 = q32.half()
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.attention(q16, q16, q16)


# Self-check under "auto" (kernels/dispatch.py): on a GPU, the first call per (kernel, device, dtype, shape class) runs
# the kernel beside PyTorch and keeps it only if it passes this file's accuracy rule. Without a GPU the device test is
# faked, so "auto" hands CPU tensors to the interpreted kernels, and broken kernels are faked by monkeypatching.

def assert_all_equal_the_pytorch_path(call, results):
    """Every one of `results` (outputs of call() under "auto") equals call() under the "torch" backend bitwise."""
    with kernels.use_backend("torch"):
        expected = call()
    assert all(torch.equal(result, expected) for result in results)


@pytest.fixture
def auto_as_on_a_gpu(monkeypatch, no_backend_override):
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_auto_runs_triton", lambda device: True)
    monkeypatch.setattr(dispatch, "_self_checks", {})


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
@pytest.mark.parametrize("op_index", range(3), ids=["attention", "group_norm", "geglu"])
def test_auto_checks_a_kernel_once_per_shape_class_then_runs_it(monkeypatch, op_index):
    call, module, function_name = _dispatch_calls()[op_index]
    calls = _spy(monkeypatch, module, function_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing kernel warns about nothing
        first, second = call(), call()
    assert len(calls) == 3, "the first call runs the kernel twice (self-check, then the result), later calls once"
    assert list(dispatch._self_checks.values()) == [True]
    with kernels.use_backend("triton"):
        assert torch.equal(first, call()) and torch.equal(second, first)


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
def test_auto_checks_again_for_a_new_shape_class_but_not_a_new_batch_size(monkeypatch):
    calls = _spy(monkeypatch, flash_module, "flash_attention")
    generator = torch.Generator().manual_seed(0)
    for batch, n_q in [(1, 16), (2, 16), (1, 24)]:
        q = torch.randn(batch, 2, n_q, 40, generator=generator).half()
        kernels.attention(q, q, q)
    assert len(calls) == 2 + 1 + 2
    assert sorted(key[-1] for key in dispatch._self_checks) == [(16, 16, 40), (24, 24, 40)]


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
@pytest.mark.parametrize("op_index", range(3), ids=["attention", "group_norm", "geglu"])
def test_auto_keeps_pytorch_where_it_wins_the_race_without_a_warning(monkeypatch, caplog, op_index):
    # Raced for real: on the CPU the interpreted kernel is orders of magnitude slower than PyTorch.
    monkeypatch.setattr(dispatch, "_races", lambda device: True)
    call, module, function_name = _dispatch_calls()[op_index]
    calls = _spy(monkeypatch, module, function_name)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="kernels.dispatch"):
        warnings.simplefilter("error")  # losing the race is not a problem to warn about
        results = [call() for _ in range(3)]
    assert len(calls) == 1 + 15, "the self-check call and the race's 3 x 5, then PyTorch without asking again"
    assert list(dispatch._self_checks.values()) == [False]
    [record] = caplog.records
    assert re.fullmatch(rf"auto: {module.__name__} on cpu torch.float16 inputs \(shape class .*\): Triton [0-9.]+ ms, "
                        r"PyTorch [0-9.]+ ms per call; PyTorch runs them", record.getMessage()), record.getMessage()
    assert_all_equal_the_pytorch_path(call, results)


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
def test_auto_runs_the_kernel_where_it_wins_the_race(monkeypatch):
    monkeypatch.setattr(dispatch, "_races", lambda device: True)
    monkeypatch.setattr(dispatch, "_race", lambda kernel, pytorch, inputs: (0.5, 0.6))
    call, module, function_name = _dispatch_calls()[2]
    calls = _spy(monkeypatch, module, function_name)
    first, second = call(), call()
    assert len(calls) == 3 and list(dispatch._self_checks.values()) == [True]
    with kernels.use_backend("triton"):
        assert torch.equal(first, call()) and torch.equal(second, first)


def test_race_times_both_sides_best_of_three_blocks(monkeypatch):
    durations = {"kernel": iter([3.0, 1.0, 2.0]), "pytorch": iter([4.0, 5.0, 0.5])}
    calls = []

    def timed(function, inputs, count):
        calls.append((function(), count))
        return next(durations[function()])

    monkeypatch.setattr(dispatch, "_milliseconds", timed)
    assert dispatch._race(lambda: "kernel", lambda: "pytorch", ()) == (1.0, 0.5)
    assert calls == [("kernel", 5), ("pytorch", 5)] * 3, "alternating blocks of 5 calls"


def _raise_compile_error(*args, **kwargs):
    raise RuntimeError("PassManager::run failed\n<the kernel source Triton quotes>")


def _off_by_a_twentieth(original):
    return lambda *args, **kwargs: original(*args, **kwargs) + 0.05


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
@pytest.mark.parametrize("op_index", range(3), ids=["attention", "group_norm", "geglu"])
@pytest.mark.parametrize("failure, message", [
    ("raises", r"raised RuntimeError: PassManager::run failed\. PyTorch runs"),
    ("wrong", r"max abs error 0\.05\d* against a float32 reference, more than twice PyTorch's own"),
])
def test_auto_falls_back_to_pytorch_with_one_warning_when_the_kernel_fails(monkeypatch, op_index, failure, message):
    call, module, function_name = _dispatch_calls()[op_index]
    broken = _raise_compile_error if failure == "raises" else _off_by_a_twentieth(getattr(module, function_name))
    monkeypatch.setattr(module, function_name, broken)
    calls = _spy(monkeypatch, module, function_name)
    with pytest.warns(RuntimeWarning) as record:
        results = [call() for _ in range(3)]
    assert len(record) == 1 and len(calls) == 1, "one self-check, one warning, then PyTorch without asking again"
    assert re.search(message, str(record[0].message)), str(record[0].message)
    assert f"{kernels.ENV_VAR}=torch" in str(record[0].message) and "torch.float16" in str(record[0].message)
    assert record[0].filename == __file__, "the warning points at the caller of the kernel function"
    assert_all_equal_the_pytorch_path(call, results)


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
def test_auto_does_not_use_a_kernel_it_could_not_verify(monkeypatch):
    sdpa = F.scaled_dot_product_attention

    def sdpa_out_of_memory_in_float32(q, k, v, **kwargs):
        if q.dtype == torch.float32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.16 GiB")
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_out_of_memory_in_float32)
    call, module, function_name = _dispatch_calls()[0]
    with pytest.warns(RuntimeWarning, match=r"the PyTorch reference to compare it with could not run "
                                            r"\(OutOfMemoryError: CUDA out of memory"):
        result = call()
    assert dispatch._self_checks and not any(dispatch._self_checks.values())
    with kernels.use_backend("torch"):
        assert torch.equal(result, call())


@interpreter_test
@pytest.mark.usefixtures("auto_as_on_a_gpu")
def test_forced_triton_runs_the_kernel_unchecked(monkeypatch):
    call, module, function_name = _dispatch_calls()[2]
    monkeypatch.setattr(module, function_name, _off_by_a_twentieth(getattr(module, function_name)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with kernels.use_backend("triton"):
            wrong = call()
        with kernels.use_backend("torch"):
            right = call()
    torch.testing.assert_close(wrong, right + 0.05, atol=2e-3, rtol=0)
    assert dispatch._self_checks == {}


def test_self_check_tolerance_is_twice_pytorch_error_or_two_ulps():
    # Values exactly representable in float16, so the errors below are exact: PyTorch's error is 2^-8.
    reference = torch.tensor([1.0, -2.0, 0.5])
    pytorch = (reference + torch.tensor([0.0, 2 ** -8, 0.0])).half()
    within = dispatch._within_kernel_test_tolerance
    assert within((reference + torch.tensor([0, 0, 2 ** -7])).half(), pytorch, reference) is None
    failed = within((reference + torch.tensor([0, 0, 2 ** -7 + 2 ** -9])).half(), pytorch, reference)
    assert failed.startswith("max abs error 0.00977 against a float32 reference"), failed
    assert within(torch.tensor([1.0, -2.0, float("nan")]).half(), pytorch, reference) is not None
    assert "output shape (2,)" in within(reference[:2].half(), pytorch, reference)
    # PyTorch exact (float32 GroupNorm): two float32 ulps at the largest magnitude, 2 * 2^-23 * 2, are the allowance.
    assert within(reference + torch.tensor([0, 2 ** -21, 0]), reference, reference) is None
    assert within(reference + torch.tensor([0, 2 ** -20, 0]), reference, reference) is not None


# ----------------------------------------------------------------------------------------------------------------------
# Autotune tables and pruning (plain Python: nothing is compiled or launched).
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_attention_candidates_follow_the_table_of_the_head_dim_class(kind):
    configs = flash_module._table_configs(kind)
    for head_dim, table_row in [(40, 64), (64, 64), (80, 128), (96, 128), (128, 128), (160, 256)]:
        kept = flash_module.kept_configs(configs, kind, 4096, 4096, head_dim)
        assert [flash_module._entry(config) for config in kept] == flash_module._TABLES[kind][table_row]
    # Tiles taller than the next power of two of Nq (BLOCK_M) or Nk (BLOCK_N) only compute padding.
    small = flash_module.kept_configs(configs, kind, 64, 40, 64)
    expected = [entry for entry in flash_module._TABLES[kind][64] if entry[0] <= 64 and entry[1] <= 64]
    assert [flash_module._entry(config) for config in small] == expected
    # When every tile is too tall, the candidate with the smallest tiles remains.
    tiny = flash_module.kept_configs(configs, kind, 1, 2, 64)
    smallest = min(flash_module._TABLES[kind][64], key=lambda entry: entry[0] * entry[1])
    assert [flash_module._entry(config) for config in tiny] == [smallest]


def test_autotune_switch_keeps_only_the_first_streaming_candidate(monkeypatch):
    configs = group_norm_module._CONFIGS
    monkeypatch.setenv("LDM_KERNELS_AUTOTUNE", "1")
    assert triton_helpers.streaming_candidates(configs, 1 << 20, compiled=True) == configs
    assert all(c.kwargs["BLOCK"] <= 512 for c in triton_helpers.streaming_candidates(configs, 300, compiled=True))
    monkeypatch.setenv("LDM_KERNELS_AUTOTUNE", "0")
    assert triton_helpers.streaming_candidates(configs, 1 << 20, compiled=True) == configs[:1]
    shortest = triton_helpers.streaming_candidates(configs, 1 << 20, compiled=False)
    assert len(shortest) == 1 and shortest[0].kwargs["BLOCK"] == min(c.kwargs["BLOCK"] for c in configs)


# ----------------------------------------------------------------------------------------------------------------------
# Compiling for NVIDIA GPUs without one: Triton's NVIDIA backend and ptxas run on the CPU
# (python -m kernels.compile_check).
# ----------------------------------------------------------------------------------------------------------------------

def _run_compile_check(*arguments: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "kernels.compile_check", *arguments], cwd=REPO_ROOT,
                          env=environment, capture_output=True, text=True, timeout=3000)


def test_attention_kernels_compile_for_hopper_without_spills():
    # The interpreter never runs Triton's GPU code generator, whose rules (constexpr-only globals, dot shapes, register
    # and shared-memory limits) it does not check. D = 80 exercises the masked head dim, the two shapes the masked and
    # unmasked sequence paths; the slow tests below cover every kernel, head dim, dtype and candidate.
    result = _run_compile_check("--arch", "90", "--head-dims", "80", "--only", "attention", "--dtypes", "bf16",
                                "--fail-on-spills")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_first_candidates_of_every_kernel_compile_without_spills(arch):
    result = _run_compile_check("--arch", arch, "--configs", "first", "--fail-on-spills")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_autotune_candidate_compiles(arch):
    # float16 only: bfloat16 takes the same code paths, and every candidate is ~170 compiles per arch.
    result = _run_compile_check("--arch", arch, "--configs", "all", "--dtypes", "fp16")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark command and the interpreter-in-a-subprocess fallback.
# ----------------------------------------------------------------------------------------------------------------------

def test_benchmark_without_a_cuda_gpu_exits_2_with_one_clear_line():
    result = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA GPU" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests already run in this process")
def test_interpreter_tests_pass_in_a_fresh_process():
    environment = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The compile and benchmark tests do not depend on the interpreter and already ran in this process.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow and not cuda",
         "-k", "not compile and not benchmark", str(Path(__file__).resolve())],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: the same rules at Stable Diffusion's full shapes (batch 2 = classifier-free guidance pair). Autotuning is off
# (each table's first candidate), so a fresh machine compiles one config per kernel and shape class, not all of them;
# python -m kernels.bench exercises the autotuner.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def first_candidate_on_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda"):
        monkeypatch.setenv("LDM_KERNELS_AUTOTUNE", "0")

SD_ATTENTION_SHAPES = [
    # heads, n_q, n_k, head_dim
    (8, 4096, 4096, 40),   # SD1.5 64×64 latents, self-attention
    (8, 4096, 77, 40),     # SD1.5 cross-attention
    (8, 1024, 1024, 80),   # SD1.5 32×32
    (8, 256, 77, 160),     # SD1.5 16×16 cross-attention
    (10, 4096, 4096, 64),  # SDXL 64×64 self-attention
    (10, 4096, 77, 64),    # SDXL cross-attention
    (5, 9216, 77, 64),     # SD2 768px, 96×96 cross-attention
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("heads, n_q, n_k, head_dim", SD_ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_cuda_flash_attention_within_twice_pytorch_error_at_sd_shapes(heads, n_q, n_k, head_dim, dtype, layout):
    q, k, v, grad_out = _attention_inputs(2, heads, n_q, n_k, head_dim, dtype, layout, device="cuda")
    check_attention_against_pytorch(q, k, v, grad_out)


# Measured on an H200 (Triton 3.6, docs/BENCHMARKS.md): in float32 the fused GroupNorm+SiLU's max error was 2.1x
# PyTorch's at (2, 320, 64, 64) and (1, 256, 256, 256) (3.4e-6 against 1.6e-6, a float64 reference), within the rule at
# (2, 1280, 8, 8); the CPU interpreter, which computes exactly in numpy, passes all three. The likely cause is the GPU's
# approximate exp in tl.sigmoid and approximate 1/sqrt in float32, which half-precision outputs round away. Under auto
# the self-check sends such inputs to PyTorch (with a warning); an XPASS here says a change has closed the gap.
FLOAT32_ON_THE_GPU = pytest.param(torch.float32, marks=pytest.mark.xfail(
    reason="float32 error measured at 2.1x PyTorch's on an H200 (approximate exp and rsqrt on the GPU)", strict=False))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 256, 256, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, FLOAT32_ON_THE_GPU])
def test_cuda_group_norm_silu_within_twice_pytorch_error_at_sd_shapes(shape, dtype):
    x, weight, bias, grad_out = (t.cuda() for t in _group_norm_inputs(shape, dtype))
    check_group_norm_against_pytorch(x, weight, bias, 32, True, grad_out)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 4096, 2 * 2560)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_geglu_within_twice_pytorch_error_at_sd_shapes(shape, dtype):
    h = (2 * torch.randn(shape, device="cuda")).to(dtype)
    grad_out = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").to(dtype)
    check_geglu_against_pytorch(h, grad_out)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.usefixtures("no_backend_override")
def test_cuda_auto_backend_runs_the_triton_kernels_that_win_the_race(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_self_checks", {})
    monkeypatch.setattr(dispatch, "_race", lambda kernel, pytorch, inputs: (0.5, 0.6))
    q = torch.randn(2, 8, 256, 40, device="cuda", dtype=torch.float16)
    x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.float16)
    weight, bias = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    h = torch.randn(2, 16, 128, device="cuda", dtype=torch.float16)
    for call, module, name in [(lambda: kernels.attention(q, q, q), flash_module, "flash_attention"),
                               (lambda: kernels.group_norm(x, 32, weight, bias, 1e-5, True), group_norm_module,
                                "group_norm"),
                               (lambda: kernels.geglu(h), geglu_module, "geglu")]:
        calls = _spy(monkeypatch, module, name)
        call()
        assert calls, f"auto did not use the Triton {name} on CUDA"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.usefixtures("no_backend_override")
def test_cuda_auto_race_picks_the_faster_path_where_the_margin_is_wide(monkeypatch):
    """Measured on an H200 (docs/BENCHMARKS.md, first tile configurations): SD1.5's 64x64 cross-attention runs 6x
    faster through PyTorch's SDPA than through the Triton kernel, and the fused GroupNorm+SiLU 6.5x faster than
    PyTorch's at the VAE's 512x512. Margins that wide must decide the race the same way on any recent GPU."""
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_self_checks", {})
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 4096, 40, generator=g, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 8, 77, 40, generator=g, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 128, 512, 512, generator=g, device="cuda", dtype=torch.float16)
    weight, bias = torch.ones(128, device="cuda"), torch.zeros(128, device="cuda")
    kernels.attention(q, k, k)
    kernels.group_norm(x, 32, weight, bias, 1e-6, True)
    verdicts = {key[0]: used for key, used in dispatch._self_checks.items()}
    assert verdicts == {"kernels.flash_attention": False, "kernels.fused_group_norm": True}



@pytest.mark.cuda
@requires_cuda
@pytest.mark.usefixtures("no_backend_override")
def test_cuda_sd15_unet_with_triton_kernels_matches_the_pytorch_path():
    """The whole SD1.5 UNet (64×64 latents, fp16, random weights) through the Triton kernels equals the SDPA path
    within fp16 round-off accumulated over the network."""
    import ldm
    from random_weights import randomize_weights
    model = ldm.create_model("sd15")
    unet = randomize_weights(model.unet).to("cuda", torch.float16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).to("cuda", torch.float16)
    context = torch.randn(2, 77, 768, generator=g).to("cuda", torch.float16)
    t = torch.tensor([10.0, 900.0], device="cuda")
    with torch.no_grad():
        with kernels.use_backend("torch"):
            reference = unet(x, t, context).float()
        with kernels.use_backend("triton"):
            fused = unet(x, t, context).float()
    relative = (fused - reference).norm() / reference.norm()
    assert relative < 5e-3, f"relative L2 difference {relative:.2e}"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.usefixtures("no_backend_override")
def test_cuda_auto_self_check_accepts_every_kernel_the_sd15_unet_calls(monkeypatch):
    """On a real GPU, auto's self-check passes every (kernel, dtype, shape class) an SD1.5 UNet forward meets, without
    a warning (whether each then wins its race against PyTorch is a matter of speed, not of correctness)."""
    import ldm
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_self_checks", {})
    unet = ldm.create_model("sd15", device="cuda", dtype=torch.float16).unet
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 77, 768, generator=g, device="cuda", dtype=torch.float16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed self-check fails here, with its reason
        unet(x, torch.tensor([10.0, 900.0], device="cuda"), context)
    assert {key[0] for key in dispatch._self_checks} == {"kernels.flash_attention", "kernels.fused_group_norm",
                                                         "kernels.fused_geglu"}
