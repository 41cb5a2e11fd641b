"""python -m kernels.bench: time the Triton kernels against PyTorch on Stable Diffusion's shapes, in one run.

Attention: TFLOP/s of the forward pass and of forward+backward at the SD1.5 / SD2 / SDXL self- and cross-attention
shapes, for our flash attention kernel and for each backend of torch's scaled_dot_product_attention (flash,
memory-efficient, cuDNN, math), all on the same inputs in the same process, with ours / best-SDPA ratios. FLOPs follow
the FlashAttention-2 paper's convention: forward 4·B·H·Nq·Nk·D (two matmuls), backward 2.5× forward.
Fused GroupNorm+SiLU and GEGLU: milliseconds against the PyTorch path of kernels.dispatch, and the speed-up.

Before timing, every kernel output is compared with PyTorch (max abs difference printed), so a fast wrong kernel shows.
The first run on a machine compiles and times every autotune candidate of each kernel for each new shape, which takes
minutes (Triton caches the binaries on disk for later runs); LDM_KERNELS_AUTOTUNE=0 times only each table's first
candidate.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Attention shapes at batch 1 (heads, query tokens, key tokens, head dim); the batch is a command-line option (2 = the
# classifier-free-guidance pair). Cross-attention always has 77 text tokens.
ATTENTION_SHAPES = {
    # SD1.5 at 512×512 (64×64 latents): 8 heads, widths 320/640/1280 -> head dims 40/80/160.
    "sd15": [("64x64 self", 8, 4096, 4096, 40), ("64x64 cross", 8, 4096, 77, 40),
             ("32x32 self", 8, 1024, 1024, 80), ("32x32 cross", 8, 1024, 77, 80),
             ("16x16 self", 8, 256, 256, 160), ("16x16 cross", 8, 256, 77, 160),
             ("8x8 self", 8, 64, 64, 160)],
    # SD2 at 768×768 (96×96 latents): 64-wide heads, 5/10/20 of them.
    "sd2": [("96x96 self", 5, 9216, 9216, 64), ("96x96 cross", 5, 9216, 77, 64),
            ("48x48 self", 10, 2304, 2304, 64), ("48x48 cross", 10, 2304, 77, 64),
            ("24x24 self", 20, 576, 576, 64)],
    # SDXL at 1024×1024 (128×128 latents): attention only at 64×64 (10 heads) and 32×32 (20 heads), 64 wide.
    "sdxl": [("64x64 self", 10, 4096, 4096, 64), ("64x64 cross", 10, 4096, 77, 64),
             ("32x32 self", 20, 1024, 1024, 64), ("32x32 cross", 20, 1024, 77, 64)],
}
# GroupNorm inputs [B, C, H, W] (32 groups) of the UNet ResBlocks and of the VAE decoder at 512×512.
GROUP_NORM_SHAPES = [("UNet 64x64", 2, 320, 64, 64), ("UNet 32x32", 2, 640, 32, 32), ("UNet 16x16", 2, 1280, 16, 16),
                     ("VAE 128x128", 1, 512, 128, 128), ("VAE 512x512", 1, 128, 512, 512)]
# GEGLU inputs [B, N, 2F] of the transformer feed-forwards (F = 4 × width).
GEGLU_SHAPES = [("SD1.5 64x64", 2, 4096, 1280), ("SD1.5 32x32", 2, 1024, 2560), ("SDXL 64x64", 2, 4096, 2560)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sd2,sdxl",
                        help="comma-separated attention shape sets: sd15, sd2, sdxl (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="precision of the inputs")
    parser.add_argument("--batch", type=int, default=2, help="batch size (2 = a classifier-free guidance pair)")
    parser.add_argument("--layout", choices=["bnhd", "bhnd"], default="bnhd",
                        help="memory layout of q, k, v: [B, N, H, D] seen through .transpose(1, 2) as the models "
                             "produce them, or contiguous [B, H, N, D]")
    parser.add_argument("--forward-only", action="store_true", help="skip the forward+backward timings")
    parser.add_argument("--skip-fused", action="store_true", help="skip the GroupNorm+SiLU and GEGLU section")
    parser.add_argument("--rep-ms", type=int, default=100, help="time budget per measurement, in milliseconds")
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in ATTENTION_SHAPES]
    if unknown:
        parser.error(f"unknown shape set(s) {', '.join(unknown)}; choose from {', '.join(ATTENTION_SHAPES)}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    return args


def _time_ms(fn, grad_to_none, rep_ms: int) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def _sdpa_backends():
    """(column name, context manager factory) for each SDPA backend, pinned one at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return [("flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
            ("efficient", lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
            ("cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
            ("math", lambda: sdpa_kernel(SDPBackend.MATH))]


def _attention_inputs(batch, heads, n_q, n_k, head_dim, dtype, layout):
    def make(n):
        if layout == "bnhd":
            tensor = torch.randn(batch, n, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
        else:
            tensor = torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype)
        return tensor.requires_grad_()
    return make(n_q), make(n_k), make(n_k), torch.randn(batch, heads, n_q, head_dim, device="cuda", dtype=dtype)


def _attention_timings(fn, q, k, v, grad_out, forward_only, rep_ms):
    """(forward ms, forward+backward ms or None) of fn(q, k, v)."""
    with torch.no_grad():
        forward = _time_ms(lambda: fn(q, k, v), None, rep_ms)
    if forward_only:
        return forward, None
    both = _time_ms(lambda: fn(q, k, v).backward(grad_out), [q, k, v], rep_ms)
    return forward, both


def bench_attention(args, flash_attention) -> list[str]:
    dtype = DTYPES[args.dtype]
    backends = _sdpa_backends()
    modes = ["fwd"] + ([] if args.forward_only else ["fwd+bwd"])
    header = f"{'model':6} {'shape':12} {'B':>2} {'H':>3} {'Nq':>5} {'Nk':>5} {'D':>4} {'mode':8} {'ours':>6} " + \
             " ".join(f"{name:>9}" for name, _ in backends) + f" {'ours/best':>9} {'max|Δ|':>8}"
    lines = [f"Attention TFLOP/s ({args.dtype}, layout {args.layout}, {torch.cuda.get_device_name()})", header]
    cases = [(model, *shape) for model in args.models for shape in ATTENTION_SHAPES[model]]
    for model, label, heads, n_q, n_k, head_dim in tqdm(cases, desc="attention", file=sys.stderr):
        q, k, v, grad_out = _attention_inputs(args.batch, heads, n_q, n_k, head_dim, dtype, args.layout)
        with torch.no_grad():
            difference = (flash_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max().item()
        forward_flops = 4 * args.batch * heads * n_q * n_k * head_dim
        flops = {"fwd": forward_flops, "fwd+bwd": 3.5 * forward_flops}
        ours = dict(zip(modes, _attention_timings(flash_attention, q, k, v, grad_out, args.forward_only, args.rep_ms)))
        theirs = {}
        for name, context in backends:
            try:
                with context():
                    theirs[name] = dict(zip(modes, _attention_timings(F.scaled_dot_product_attention, q, k, v, grad_out,
                                                                      args.forward_only, args.rep_ms)))
            except RuntimeError:  # this backend does not take the shape/dtype on this GPU
                theirs[name] = {}
        for mode in modes:
            tflops = lambda ms: flops[mode] / (ms * 1e-3) / 1e12
            ours_tflops = tflops(ours[mode])
            columns = [f"{tflops(theirs[name][mode]):9.1f}" if mode in theirs[name] else f"{'n/a':>9}"
                       for name, _ in backends]
            available = [tflops(theirs[name][mode]) for name, _ in backends if mode in theirs[name]]
            ratio = f"{ours_tflops / max(available):9.2f}" if available else f"{'n/a':>9}"
            lines.append(f"{model:6} {label:12} {args.batch:>2} {heads:>3} {n_q:>5} {n_k:>5} {head_dim:>4} {mode:8} "
                         f"{ours_tflops:6.1f} " + " ".join(columns) + f" {ratio} {difference:8.1e}")
        del q, k, v, grad_out
        torch.cuda.empty_cache()
    return lines


def _fused_row(label, ours_fn, torch_fn, inputs, grad_out, forward_only, rep_ms) -> str:
    with torch.no_grad():
        difference = (ours_fn(*inputs).float() - torch_fn(*inputs).float()).abs().max().item()
        cells = [_time_ms(lambda: ours_fn(*inputs), None, rep_ms), _time_ms(lambda: torch_fn(*inputs), None, rep_ms)]
    if not forward_only:
        cells += [_time_ms(lambda: ours_fn(*inputs).backward(grad_out), list(inputs), rep_ms),
                  _time_ms(lambda: torch_fn(*inputs).backward(grad_out), list(inputs), rep_ms)]
    timings = " ".join(f"{ours:12.3f} {theirs:8.3f} {theirs / ours:7.2f}x"
                       for ours, theirs in zip(cells[::2], cells[1::2]))
    return f"{label:28} {timings} {difference:8.1e}"


def bench_fused(args, fused_group_norm, fused_geglu) -> list[str]:
    from . import dispatch
    dtype = DTYPES[args.dtype]
    modes = ["fwd"] + ([] if args.forward_only else ["fwd+bwd"])
    lines = [f"Fused kernels, ms: ours vs the PyTorch path ({args.dtype})",
             f"{'op / shape':28} " + " ".join(f"{mode + ' ours':>12} {'torch':>8} {'speedup':>8}" for mode in modes)
             + f" {'max|Δ|':>8}"]

    def torch_path(fn):
        def run(*inputs):
            with dispatch.use_backend("torch"):
                return fn(*inputs)
        return run

    for label, batch, channels, height, width in tqdm(GROUP_NORM_SHAPES, desc="group norm", file=sys.stderr):
        x = torch.randn(batch, channels, height, width, device="cuda", dtype=dtype, requires_grad=True)
        weight = torch.randn(channels, device="cuda", requires_grad=True)
        bias = torch.randn(channels, device="cuda", requires_grad=True)
        norm = lambda x_, w, b: fused_group_norm.group_norm(x_, 32, w, b, 1e-5, silu=True)
        torch_norm = torch_path(lambda x_, w, b: dispatch.group_norm(x_, 32, w, b, 1e-5, silu=True))
        lines.append(_fused_row(f"GroupNorm+SiLU {label}", norm, torch_norm, (x, weight, bias), torch.randn_like(x),
                                args.forward_only, args.rep_ms))
    for label, batch, tokens, features in tqdm(GEGLU_SHAPES, desc="geglu", file=sys.stderr):
        h = torch.randn(batch, tokens, 2 * features, device="cuda", dtype=dtype, requires_grad=True)
        grad_out = torch.randn(batch, tokens, features, device="cuda", dtype=dtype)
        lines.append(_fused_row(f"GEGLU {label}", fused_geglu.geglu, torch_path(dispatch.geglu), (h,), grad_out,
                                args.forward_only, args.rep_ms))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    try:
        from . import flash_attention, fused_geglu, fused_group_norm
    except ImportError as error:
        print(f"kernels.bench needs Triton, which cannot be imported: {error}", file=sys.stderr)
        return 2
    if flash_attention.INTERPRETED:
        print("kernels.bench times compiled kernels; unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    lines = bench_attention(args, flash_attention.flash_attention)
    if not args.skip_fused:
        lines += [""] + bench_fused(args, fused_group_norm, fused_geglu)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
