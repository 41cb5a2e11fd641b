"""python -m benchmarks.kernel_self_check — what LDM_KERNELS=auto's one-time kernel self-check and race cost on this
GPU, and what the race gains.

    python -m benchmarks.kernel_self_check [--preset sd15] [--size 512] [--dtype fp16|bf16]

Times the first and a later UNet forward (batch 2, the CFG pair) in fresh processes: with LDM_KERNELS=triton (the
kernels, unchecked) and with LDM_KERNELS=auto (one self-check and race against PyTorch per kernel and shape class,
then the faster path; kernels/dispatch.py), after a first process has filled Triton's on-disk compile cache so neither
pays for compiling. The later forwards compare the paths each backend settled on; the one-time cost is how much more
auto's first forward exceeds its later one than triton's does. Also prints how many (kernel, dtype, shape class) keys
the forward met and how many auto runs on the Triton kernel. Needs a CUDA GPU.
"""
import argparse
import sys
import time

import torch

from benchmarks import common


def _child(args) -> dict:
    import ldm
    from kernels import dispatch

    dispatch.set_backend(args.child)
    dtype = common.DTYPES[args.dtype]
    model = ldm.create_model(args.preset, device="cuda", dtype=dtype)
    unet, config = model.unet, model.preset.unet
    latent = args.size // 8
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, config.in_channels, latent, latent, device="cuda", dtype=dtype, generator=generator)
    context = torch.randn(2, 77, config.context_dim, device="cuda", dtype=dtype, generator=generator)
    y = (torch.randn(2, config.adm_in_channels, device="cuda", dtype=dtype, generator=generator)
         if config.adm_in_channels else None)
    t = torch.tensor([500.0, 500.0], device="cuda")
    seconds = []
    with torch.inference_mode():
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            unet(x, t, context, y)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    verdicts = list(dispatch._self_checks.values())
    return {"first": seconds[0], "later": seconds[1], "keys": len(verdicts), "triton": sum(verdicts)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_self_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", help="model preset (default sd15)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="precision (default fp16)")
    parser.add_argument("--child", choices=("triton", "auto"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return common.print_child_result(_child(args))
    if not torch.cuda.is_available():
        parser.error("the self-check only runs on CUDA tensors, and torch sees no CUDA GPU")

    def run(backend: str) -> dict:
        return common.run_child(parser, "benchmarks.kernel_self_check", backend, "--preset", args.preset,
                                "--size", str(args.size), "--dtype", args.dtype)

    run("triton")  # fills Triton's compile cache; its timings include compiling, so they are not shown
    triton, auto = run("triton"), run("auto")
    print(f"kernel self-check cost: {args.preset} UNet forward, batch 2, {args.size}x{args.size}, {args.dtype}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'LDM_KERNELS':<12}{'first forward':>15}{'later forward':>15}   keys run on Triton")
    print(f"{'triton':<12}{triton['first'] * 1e3:13.1f}ms{triton['later'] * 1e3:13.1f}ms   all (unchecked)")
    print(f"{'auto':<12}{auto['first'] * 1e3:13.1f}ms{auto['later'] * 1e3:13.1f}ms   {auto['triton']} of "
          f"{auto['keys']} (checked and raced)")
    cost = (auto["first"] - auto["later"]) - (triton["first"] - triton["later"])
    print(f"one-time cost of the checks and races: {cost * 1e3:.1f} ms; later forward auto / triton: "
          f"{auto['later'] / triton['later']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
