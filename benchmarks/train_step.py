"""python -m benchmarks.train_step — one UNet training step, ours against diffusers' UNet2DConditionModel, same run.

    python -m benchmarks.train_step [--preset sd15] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--batch 2]
                                    [--size 512] [--repeat 5] [--gradient-checkpointing]

A step is what the trainer does per batch for the UNet: forward on noisy latents with a text context, MSE against a
target, backward, AdamW step, zero_grad. Both sides get identical weights (ours converted with the test oracle
tests/oracles.py), identical inputs and the same optimizer. Mixed precision keeps fp32 master weights and runs the
forward under autocast, as training does. Printed: images/s and peak memory of each, and ours/diffusers ratios
(goal: ≥ 1.2× img/s). Each side runs in its own subprocess so peak-memory readings stay separate. Defaults: sd15 at
512 px on CUDA, the tiny preset at 64 px on CPU, fp32. Needs the test extras (diffusers).
"""
import argparse
import sys
import time

import torch

from benchmarks import common


def _child(impl: str, args) -> dict:
    import ldm
    common.use_test_oracles()
    from oracles import diffusers_unet
    from random_weights import randomize_weights

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ldm.create_model(args.preset)
    randomize_weights(model.unet)
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
    # fp32 trains without autocast; fp16 also needs loss scaling.
    autocast_dtype = None if args.dtype == "fp32" else common.DTYPES[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.mse_loss(forward(x, t, context).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocates the optimizer state)
    # Peak memory here is absolute (weights, gradients and optimizer state included), not above a baseline.
    common.reset_peak_memory(args.device)
    times = []
    for _ in range(args.repeat):
        common.synchronize(args.device)
        start = time.perf_counter()
        step()
        common.synchronize(args.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {"img_per_s": args.batch / seconds, "seconds": seconds,
            "peak_bytes": common.peak_memory_above(args.device, 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    args = common.parse_benchmark_args(parser, argv, dtypes=("fp32", "bf16", "fp16"), repeat=5,
                                       gpu={"preset": "sd15", "dtype": "fp32", "size": 512},
                                       cpu={"preset": "tiny", "dtype": "fp32", "size": 64})
    if args.child:
        return common.print_child_result(_child(args.child[0], args))
    common.require_reference(parser, "diffusers")

    options = common.forwarded(args, "preset", "device", "dtype", "batch", "size", "repeat", "gradient_checkpointing")
    results = {impl: common.run_child(parser, "benchmarks.train_step", impl, *options)
               for impl in ("ours", "diffusers")}
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
