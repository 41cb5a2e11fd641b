"""python -m train.bench — one UNet training step, ours against diffusers' UNet2DConditionModel, same run.

    python -m train.bench [--preset sd15] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--batch 2] [--size 512]
                          [--repeat 5] [--gradient-checkpointing]

A step is what the trainer does per batch for the UNet: forward on noisy latents with a text context, MSE against a
target, backward, AdamW step, zero_grad. Both sides get identical weights (ours converted with the test oracle
tests/oracles.py), identical inputs and the same optimizer. Mixed precision keeps fp32 master weights and runs the
forward under autocast, as training does. Printed: images/s and peak memory of each, and ours/diffusers ratios
(goal: ≥ 1.2× img/s). Each side runs in its own subprocess so peak-memory readings stay separate. Defaults: sd15 at
512 px on CUDA, the tiny preset at 64 px on CPU. Needs the test extras (diffusers).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from ldm.bench import peak_rss_bytes, reset_peak_rss

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _child(impl: str, args) -> dict:
    import ldm
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from oracles import diffusers_unet, randomize_  # test-only bridge: diffusers is never a runtime dependency

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ldm.create_model(args.preset)
    randomize_(model.unet)
    if impl == "ours":
        unet = model.unet

        def forward(x, t, context):
            return unet(x, t, context)
        unet.gradient_checkpointing = args.gradient_checkpointing
    else:
        part = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
        unet, converted = diffusers_unet(model.preset.unet, model.preset.vae, part)
        unet.load_state_dict(converted)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        def forward(x, t, context):
            return unet(x, t, encoder_hidden_states=context).sample
    del model
    unet = unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    preset = ldm.get_preset(args.preset)
    latent = args.size // 8 if args.preset != "tiny" else args.size // 2
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, preset.unet.in_channels, latent, latent, generator=generator).to(device)
    target = torch.randn(args.batch, preset.unet.out_channels, latent, latent, generator=generator).to(device)
    context = torch.randn(args.batch, 77, preset.unet.context_dim, generator=generator).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    dtype = DTYPES[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(forward(x, t, context).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocates the optimizer state)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {"img_per_s": args.batch / seconds, "seconds": seconds, "peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="model preset (default: sd15 on CUDA, tiny on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, help="image size in pixels (default 512 on CUDA, 64 on CPU)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("sd15" if cuda else "tiny")
    args.size = args.size or (512 if cuda else 64)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    results = {}
    for impl in ("ours", "diffusers"):
        command = [sys.executable, "-m", "train.bench", "--child", impl, "--preset", args.preset, "--device",
                   args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size", str(args.size),
                   "--repeat", str(args.repeat)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            parser.exit(1, f"python -m train.bench: the {impl} run failed:\n{done.stderr[-2000:]}\n")
        results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["diffusers"]
    print(f"UNet training step, {args.preset} {args.size}px batch {args.batch} {args.dtype} on {args.device}"
          + (" with gradient checkpointing" if args.gradient_checkpointing else ""))
    for name, r in results.items():
        print(f"  {name:9s} {r['img_per_s']:8.2f} img/s  {r['seconds'] * 1000:9.1f} ms/step  "
              f"peak {r['peak_bytes'] / 2 ** 30:6.2f} GiB")
    print(f"  ours/diffusers: {ours['img_per_s'] / theirs['img_per_s']:.2f}x img/s (goal >= 1.2x), "
          f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
