"""python -m ldm.bench — our models against diffusers on identical weights, measured in the same run.

    python -m ldm.bench [--preset sd15] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size 512] [--repeat 3]
                        [--skip-load]

Prints, for the UNet forward (one CFG-sized batch of 2) and the VAE decode: time and peak memory of ours and of
diffusers, and their ratio (goal ≤ 1.0×); then the time and peak RSS of `load_model` on a ~2 GB fp16 `.safetensors`
against a raw read of the same file (goals ≤ 1.5× time, peak RSS ≤ 1.2× the weight bytes). Each measurement runs in
its own subprocess so peak-memory readings do not contaminate each other. Needs the test extras (diffusers).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to the current one, so the next
    # reading covers only what follows (model construction before it would otherwise dominate the peak).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed(fn, device: str, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _child_model(task: str, impl: str, args) -> dict:
    """Build the preset with random weights (converted to diffusers when impl != "ours") and time one forward."""
    import ldm
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from oracles import diffusers_unet, diffusers_vae  # test-only bridge: diffusers is never a runtime dependency

    dtype, device = DTYPES[args.dtype], args.device
    model = ldm.create_model(args.preset)
    unet_cfg, vae_cfg = model.preset.unet, model.preset.vae
    prefix = "model.diffusion_model." if task == "unet" else "first_stage_model."
    part = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    if impl == "ours":
        net = model.unet if task == "unet" else model.vae
    else:
        net, converted = (diffusers_unet if task == "unet" else diffusers_vae)(unet_cfg, vae_cfg, part)
        net.load_state_dict(converted)
    del model, part
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def randn(*shape):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)

    latent = args.size // 8
    if task == "unet":
        x, context = randn(2, unet_cfg.in_channels, latent, latent), randn(2, 77, unet_cfg.context_dim)
        t = torch.tensor([500.0, 500.0], device=device)
        y = randn(2, unet_cfg.adm_in_channels) if unet_cfg.adm_in_channels else None
        if impl == "ours":
            call = lambda: net(x, t, context, y)  # noqa: E731
        else:
            extra = {} if y is None else {"added_cond_kwargs": {"text_embeds": y[:, :-6 * 256],
                                                                "time_ids": randn(2, 6) * 1000}}
            call = lambda: net(x, t, encoder_hidden_states=context, **extra).sample  # noqa: E731
    else:
        z = randn(1, vae_cfg.embed_dim, latent, latent)
        call = (lambda: net.decode(z, tiled=False)) if impl == "ours" else (lambda: net.decode(z).sample)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    base = torch.cuda.memory_allocated() if device == "cuda" else current_rss_bytes()
    with torch.inference_mode():
        seconds = _timed(call, device, args.repeat)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return {"seconds": seconds, "peak_bytes": peak - base}


def _child_load(impl: str, path: str) -> dict:
    import ldm
    reset_peak_rss()
    base = current_rss_bytes()
    start = time.perf_counter()
    if impl == "raw":
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.path.getsize(path))
            f.readinto(data)
    else:
        ldm.load_model(path)
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak_rss_bytes() - base}


def _run_child(*child_args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "ldm.bench", "--child", *child_args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:8.0f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", help="model preset (default sd15)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size/8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--skip-load", action="store_true", help="skip the ~2 GB checkpoint loading benchmark")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, impl, *rest = args.child
        result = _child_load(impl, rest[0]) if kind == "load" else _child_model(kind, impl, args)
        print(json.dumps(result))
        return 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        parser.error("the benchmark compares against diffusers: install the test extras (pip install -e '.[test]')")

    common = ["--preset", args.preset, "--device", args.device, "--dtype", args.dtype, "--size", str(args.size),
              "--repeat", str(args.repeat)]
    print(f"ldm.bench: {args.preset}, {args.device}, {args.dtype}, {args.size}x{args.size}, median of {args.repeat}")
    print(f"{'measurement':<28}{'ours':>12}{'reference':>12}{'ratio':>8}   peak memory above the inputs, ours / reference")
    for task, label in (("unet", "UNet forward (batch 2)"), ("vae", "VAE decode (batch 1)")):
        ours = _run_child(task, "ours", *common)
        ref = _run_child(task, "diffusers", *common)
        print(f"{label:<28}{ours['seconds'] * 1e3:10.1f}ms{ref['seconds'] * 1e3:10.1f}ms"
              f"{ours['seconds'] / ref['seconds']:7.2f}x   {_fmt_bytes(ours['peak_bytes'])} / "
              f"{_fmt_bytes(ref['peak_bytes'])} ({ours['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x)")

    if not args.skip_load:
        import ldm
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sd15-fp16.safetensors")
            ldm.save_model(ldm.create_model("sd15"), path, dtype=torch.float16)
            size = os.path.getsize(path)
            raw = _run_child("load", "raw", path)
            ours = _run_child("load", "ours", path)
        print(f"{'load .safetensors':<28}{ours['seconds'] * 1e3:10.1f}ms{raw['seconds'] * 1e3:10.1f}ms"
              f"{ours['seconds'] / raw['seconds']:7.2f}x   peak RSS {_fmt_bytes(ours['peak_bytes'])} = "
              f"{ours['peak_bytes'] / size:.2f}x the {size / 2**30:.2f} GiB file (raw read "
              f"{raw['peak_bytes'] / size:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
