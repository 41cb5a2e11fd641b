"""python -m kernels.compile_check: compile every Triton kernel for an NVIDIA GPU without having one; report resources.

Triton's NVIDIA backend, with the ptxas its wheel ships, runs on any Linux machine. This command takes each kernel
through the whole pipeline (Triton IR -> TTGIR -> LLVM IR -> PTX -> cubin) for a chosen architecture, at Stable
Diffusion's head dims and at a self-attention (all blocks full) and a cross-attention (77 keys, partial blocks) shape,
for the candidates of the autotune tables, and prints registers, spilled bytes and shared memory of each. It finds
the compile errors, register spills and shared-memory overflows a GPU run would hit; it runs nothing, so it says
nothing about speed or numerics (tests/test_kernels.py and `python -m kernels.bench` do).

Exit status: 0 when everything compiled (and, with --fail-on-spills, nothing spilled registers or overflowed shared
memory), 1 otherwise, 2 for usage errors.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# GPU shared memory per block (bytes, opt-in maximum) for the architectures this command knows.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
HEAD_DIMS = (40, 64, 80, 96, 128, 160)
# (Nq, Nk): full blocks everywhere, and partial query and key blocks (cross-attention over 77 text tokens).
ATTENTION_SHAPES = ((4096, 4096), (4000, 77))
POINTER_TYPES = {"fp16": "*fp16", "bf16": "*bf16"}


@dataclass
class Job:
    """One kernel specialisation to compile."""
    label: str
    kernel: object       # the @triton.jit function, possibly wrapped by autotune / heuristics
    pointers: dict       # argument name -> Triton pointer type, e.g. "*fp16"
    floats: tuple        # names of float32 scalar arguments (all other runtime scalars are int32)
    constexprs: dict     # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(MAX_SHARED_BYTES), default=90,
                        help="compute capability to compile for, e.g. 90 for H100, 80 for A100 (default 90)")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated input dtypes: fp16, bf16")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)),
                        help="comma-separated attention head dims")
    parser.add_argument("--configs", choices=["first", "all"], default="first",
                        help="compile only each table's first candidate (what runs with LDM_KERNELS_AUTOTUNE=0), or "
                             "every candidate the autotuner may time (a few seconds per attention kernel)")
    parser.add_argument("--fail-on-spills", action="store_true",
                        help="exit 1 when a kernel spills registers or needs more shared memory than the GPU has "
                             "(each table's first candidate, taken without autotuning, should do neither)")
    parser.add_argument("--only", choices=["attention", "fused"], default=None,
                        help="compile only the attention kernels or only the GroupNorm/GEGLU kernels")
    args = parser.parse_args(argv)
    args.dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    if not args.dtypes or any(name not in POINTER_TYPES for name in args.dtypes):
        parser.error(f"--dtypes takes a comma-separated subset of {', '.join(POINTER_TYPES)}, got {args.dtypes}")
    try:
        args.head_dims = [int(value) for value in args.head_dims.split(",") if value.strip()]
    except ValueError:
        parser.error(f"--head-dims takes comma-separated integers, got {args.head_dims!r}")
    if not args.head_dims or any(not 1 <= value <= 256 for value in args.head_dims):
        parser.error(f"--head-dims must be integers in 1..256, got {args.head_dims}")
    return args


def attention_jobs(flash_attention, dtype: str, head_dims, which: str) -> list[Job]:
    import triton
    pointer = POINTER_TYPES[dtype]
    kernels = [("fwd", flash_attention._attn_fwd_kernel,
                dict(Q=pointer, K=pointer, V=pointer, O=pointer, LSE2="*fp32"), ("qk_scale_log2",)),
               ("dkdv", flash_attention._attn_bwd_dkdv_kernel,
                dict(Q=pointer, K=pointer, V=pointer, DO=pointer, DK=pointer, DV=pointer, LSE2="*fp32",
                     DELTA="*fp32"), ("scale", "qk_scale_log2")),
               ("dq", flash_attention._attn_bwd_dq_kernel,
                dict(Q=pointer, K=pointer, V=pointer, DO=pointer, DQ=pointer, LSE2="*fp32", DELTA="*fp32"),
                ("scale", "qk_scale_log2"))]
    jobs = []
    for head_dim in head_dims:
        block_d = max(16, triton.next_power_of_2(head_dim))
        jobs.append(Job(f"attn_bwd_preprocess D={head_dim}", flash_attention._attn_bwd_preprocess_kernel,
                        dict(O=pointer, DO=pointer, DELTA="*fp32"), (),
                        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=flash_attention._preprocess_rows(block_d))))
        for n_q, n_k in ATTENTION_SHAPES:
            for name, kernel, pointers, floats in kernels:
                kept = flash_attention.kept_configs(flash_attention._table_configs(name), name, n_q, n_k, head_dim)
                for config in (kept if which == "all" else kept[:1]):
                    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                    jobs.append(Job(
                        f"attn_{name} D={head_dim} Nq={n_q} Nk={n_k} M{block_m} N{block_n} "
                        f"w{config.num_warps} s{config.num_stages}",
                        kernel, pointers, floats,
                        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, INTERPRETED_BF16=False, BLOCK_M=block_m,
                             BLOCK_N=block_n, EVEN_M=n_q % block_m == 0, EVEN_N=n_k % block_n == 0),
                        config.num_warps, config.num_stages))
    return jobs


def fused_jobs(fused_group_norm, fused_geglu, dtype: str, which: str) -> list[Job]:
    pointer = POINTER_TYPES[dtype]
    configs = fused_group_norm._CONFIGS if which == "all" else fused_group_norm._CONFIGS[:1]
    jobs = []
    for config in configs:
        block, warps = config.kwargs["BLOCK"], config.num_warps
        suffix = f"BLOCK={block} w{warps}"
        jobs += [
            Job(f"group_norm_stats {suffix}", fused_group_norm._group_norm_stats_kernel,
                dict(X=pointer, SUM="*fp32", SUMSQ="*fp32"), (), dict(BLOCK=block), warps),
            Job(f"group_norm_fwd {suffix}", fused_group_norm._group_norm_fwd_kernel,
                dict(X=pointer, Y=pointer, W="*fp32", B="*fp32", SUM="*fp32", SUMSQ="*fp32", MEAN="*fp32",
                     RSTD="*fp32"), ("eps",),
                dict(SILU=True, BLOCK_SPLITS=16, INTERPRETED_BF16=False, BLOCK=block), warps),
            Job(f"group_norm_bwd_reduce {suffix}", fused_group_norm._group_norm_bwd_reduce_kernel,
                dict(X=pointer, DY=pointer, W="*fp32", B="*fp32", MEAN="*fp32", RSTD="*fp32", SUM_DZ_XHAT="*fp32",
                     SUM_DZ="*fp32"), (), dict(SILU=True, BLOCK=block), warps),
            Job(f"group_norm_bwd_dx {suffix}", fused_group_norm._group_norm_bwd_dx_kernel,
                dict(X=pointer, DY=pointer, DX=pointer, W="*fp32", B="*fp32", MEAN="*fp32", RSTD="*fp32",
                     SUM_DZ_XHAT="*fp32", SUM_DZ="*fp32"), (),
                dict(SILU=True, BLOCK_CPG=64, INTERPRETED_BF16=False, BLOCK=block), warps),
            Job(f"geglu_fwd {suffix}", fused_geglu._geglu_fwd_kernel, dict(H=pointer, Y=pointer), (),
                dict(INTERPRETED_BF16=False, BLOCK=block), warps),
            Job(f"geglu_bwd {suffix}", fused_geglu._geglu_bwd_kernel, dict(H=pointer, DY=pointer, DH=pointer), (),
                dict(INTERPRETED_BF16=False, BLOCK=block), warps),
        ]
    return jobs


def _jit_function(kernel):
    import triton
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # unwrap autotune / heuristics
    return kernel


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spilled bytes of a kernel, from `ptxas -v` (the one Triton uses for this arch) run on its PTX.

    ptxas's own accounting is used because the cubin's STACK figure also counts stack frames that are not spills.
    """
    from triton.backends.nvidia.compiler import get_ptxas
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets the arch-specific sm_90a
    with tempfile.TemporaryDirectory() as directory:
        source = os.path.join(directory, "kernel.ptx")
        with open(source, "w") as file:
            file.write(ptx)
        command = [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", source, "-o",
                   os.path.join(directory, "kernel.cubin")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)) if registers else 0, "spilled": int(spills.group(1)) if spills else 0}


def compile_job(job: Job, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    function = _jit_function(job.kernel)
    signature = {}
    for param in function.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in job.pointers:
            signature[param.name] = job.pointers[param.name]
        else:
            signature[param.name] = "fp32" if param.name in job.floats else "i32"
    started = time.time()
    compiled = triton.compile(ASTSource(function, signature, job.constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    seconds = time.time() - started
    return {"seconds": seconds, **_ptxas_report(compiled.asm["ptx"], arch), "shared": compiled.metadata.shared}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (read when the kernel modules are imported)
    try:
        from tqdm import tqdm

        from . import flash_attention, fused_geglu, fused_group_norm
    except ImportError as error:
        print(f"kernels.compile_check needs Triton, which cannot be imported: {error}", file=sys.stderr)
        return 2
    if flash_attention.INTERPRETED:
        print("kernels.compile_check found the kernels already imported in interpreter mode; run it in a fresh "
              "process without TRITON_INTERPRET", file=sys.stderr)
        return 2
    max_shared = MAX_SHARED_BYTES[args.arch]
    jobs = []
    for dtype in args.dtypes:
        if args.only in (None, "attention"):
            jobs += [(dtype, job) for job in attention_jobs(flash_attention, dtype, args.head_dims, args.configs)]
        if args.only in (None, "fused"):
            jobs += [(dtype, job) for job in fused_jobs(fused_group_norm, fused_geglu, dtype, args.configs)]

    failures, warnings = 0, 0
    print(f"{'kernel':62} {'dtype':5} {'regs':>4} {'spill B':>7} {'shared B':>8} {'compile s':>9}  sm_{args.arch}")
    for dtype, job in tqdm(jobs, desc=f"compiling for sm_{args.arch}", file=sys.stderr):
        try:
            result = compile_job(job, args.arch)
        except Exception as error:  # a compile error is the finding this command exists to report
            failures += 1
            message = " ".join(str(error).split())[:300]
            print(f"{job.label:62} {dtype:5} FAILED: {type(error).__name__}: {message}")
            continue
        notes = []
        if result["spilled"]:
            notes.append("SPILLS")
        if result["shared"] > max_shared:
            notes.append(f"SHARED > {max_shared}")
        warnings += bool(notes)
        print(f"{job.label:62} {dtype:5} {result['registers']:4d} {result['spilled']:7d} {result['shared']:8d} "
              f"{result['seconds']:9.1f}  {' '.join(notes)}")
    print(f"{len(jobs)} kernels for sm_{args.arch}: {len(jobs) - failures} compiled, {failures} failed, "
          f"{warnings} with spills or too much shared memory")
    return 1 if failures or (args.fail_on_spills and warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
