"""python -m benchmarks.models — our models against diffusers on identical weights, measured in the same run.

    python -m benchmarks.models [--preset sd15] [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--size 512]
                                [--repeat 3] [--skip-load]

Prints, for the UNet forward (one CFG-sized batch of 2) and the VAE decode: time and peak memory of ours and of
diffusers, and their ratio (goal ≤ 1.0×); then the time and peak RSS of `load_model` on a ~2 GB fp16 `.safetensors`
against a raw read of the same file (goals ≤ 1.5× time, peak RSS ≤ 1.2× the weight bytes). Each measurement runs in
its own subprocess so peak-memory readings do not contaminate each other. Needs the test extras (diffusers).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from benchmarks import common


def _child_model(task: str, impl: str, args) -> dict:
    """Build the preset with random weights (converted to diffusers when impl != "ours") and time one forward."""
    import ldm
    common.use_test_oracles()
    from oracles import diffusers_unet, diffusers_vae

    dtype, device = common.DTYPES[args.dtype], args.device
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

    baseline = common.reset_peak_memory(device)
    with torch.inference_mode():
        seconds = common.median_seconds(call, device, args.repeat)
    return {"seconds": seconds, "peak_bytes": common.peak_memory_above(device, baseline)}


def _child_load(impl: str, path: str) -> dict:
    import ldm
    baseline = common.reset_peak_memory("cpu")
    start = time.perf_counter()
    if impl == "raw":
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.path.getsize(path))
            f.readinto(data)
    else:
        ldm.load_model(path)
    return {"seconds": time.perf_counter() - start, "peak_bytes": common.peak_memory_above("cpu", baseline)}


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:8.0f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-load", action="store_true", help="skip the ~2 GB checkpoint loading benchmark")
    same_everywhere = {"preset": "sd15", "dtype": "fp32", "size": 512}
    args = common.parse_benchmark_args(parser, argv, dtypes=common.DTYPES, repeat=3, gpu=same_everywhere,
                                       cpu=same_everywhere)
    if args.child:
        kind, impl, *rest = args.child
        return common.print_child_result(_child_load(impl, rest[0]) if kind == "load"
                                         else _child_model(kind, impl, args))
    common.require_reference(parser, "diffusers")

    options = common.forwarded(args, "preset", "device", "dtype", "size", "repeat")
    print(f"benchmarks.models: {args.preset}, {args.device}, {args.dtype}, {args.size}x{args.size}, "
          f"median of {args.repeat}")
    print(f"{'measurement':<28}{'ours':>12}{'reference':>12}{'ratio':>8}"
          "   peak memory above the inputs, ours / reference")
    for task, label in (("unet", "UNet forward (batch 2)"), ("vae", "VAE decode (batch 1)")):
        ours = common.run_child(parser, "benchmarks.models", task, "ours", *options)
        ref = common.run_child(parser, "benchmarks.models", task, "diffusers", *options)
        print(f"{label:<28}{ours['seconds'] * 1e3:10.1f}ms{ref['seconds'] * 1e3:10.1f}ms"
              f"{ours['seconds'] / ref['seconds']:7.2f}x   {_fmt_bytes(ours['peak_bytes'])} / "
              f"{_fmt_bytes(ref['peak_bytes'])} ({ours['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x)")

    if not args.skip_load:
        import ldm
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sd15-fp16.safetensors")
            ldm.save_model(ldm.create_model("sd15"), path, dtype=torch.float16)
            size = os.path.getsize(path)
            raw = common.run_child(parser, "benchmarks.models", "load", "raw", path)
            ours = common.run_child(parser, "benchmarks.models", "load", "ours", path)
        print(f"{'load .safetensors':<28}{ours['seconds'] * 1e3:10.1f}ms{raw['seconds'] * 1e3:10.1f}ms"
              f"{ours['seconds'] / raw['seconds']:7.2f}x   peak RSS {_fmt_bytes(ours['peak_bytes'])} = "
              f"{ours['peak_bytes'] / size:.2f}x the {size / 2**30:.2f} GiB file (raw read "
              f"{raw['peak_bytes'] / size:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
