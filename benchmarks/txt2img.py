"""python -m benchmarks.txt2img — end-to-end txt2img against diffusers' StableDiffusionPipeline, measured in the same
run.

    python -m benchmarks.txt2img [--preset tiny|sd15] [--device cpu|cuda] [--dtype fp32|fp16] [--size N]
                                 [--steps 20] [--repeat 3] [--rounds 2] [--threads N] [--compile]

Both sides get the same random weights (diffusers' through its own converters), prompt, negative prompt, CFG scale 7,
Euler sampler, step count and size, and produce a PIL image: prompt encoding, sampling and VAE decoding are all timed.
Prints the best time of `--repeat` runs (after a warm-up) over `--rounds` alternating subprocess pairs (ours, theirs,
ours, theirs, ...: on a shared machine the best of several runs is the reading least disturbed by other jobs), it/s
(steps per second of the whole run) and peak memory above the loaded model (CUDA allocator peak, or peak RSS on the
CPU), ours against diffusers'. Each side runs in its own subprocesses so the memory readings do not mix. Defaults: CPU
`tiny` at 64², fp32; GPU `sd15` at 512², fp16. Goals: ≤ 1.0× diffusers' time on the CPU, ≥ 1.5× its it/s on a GPU.
`--compile` runs ours as `generate(..., compile=True)` (torch.compile; CUDA graphs on a GPU) against diffusers eager,
the comparison the GPU goal names; the warm-up run, which compiles, is not timed.
Needs the test extras (diffusers, transformers, open_clip_torch).
"""
import argparse
import sys
import time

import torch

from benchmarks import common

PROMPT, NEGATIVE = "a red circle on a white background, (masterpiece:1.2)", "blurry, lowres"


def _build(args, impl: str):
    """(run once) for one side, the weights drawn from seed 0 either way."""
    import ldm
    from sample import GenerationParams, LoadedModel, generate
    common.use_test_oracles()
    from random_weights import randomize_weights

    model = ldm.create_model(args.preset)
    randomize_weights(model, 0)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    steps, size = args.steps, args.size
    if impl == "ours":
        alphas = model.alphas_cumprod
        model.to(device=device, dtype=dtype)
        model.alphas_cumprod = alphas.to(device)
        checkpoint = LoadedModel(model, args.preset)
        params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler", scheduler="Uniform",
                                  steps=steps, cfg_scale=7.0, width=size, height=size, seed=0)
        return lambda: generate(checkpoint, params, progress=False, compile=args.compile).images[0]
    from sample_helpers import diffusers_pipeline

    pipeline = diffusers_pipeline(model).to(device=device, dtype=dtype)
    del model
    channels, latent = pipeline.unet.config.in_channels, size // pipeline.vae_scale_factor
    noise = torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    return lambda: pipeline(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                            height=size, width=size, latents=noise.to(device=device, dtype=dtype)).images[0]


def _child(args, impl: str) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        run = _build(args, impl)
        run()  # warm-up: kernels, caches, tokenizer vocabulary
        baseline = common.reset_peak_memory(args.device)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            common.synchronize(args.device)
            times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": common.peak_memory_above(args.device, baseline)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.txt2img", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess pairs (best time reported)")
    parser.add_argument("--threads", type=int, help="CPU threads for both sides (default: PyTorch's)")
    parser.add_argument("--compile", action="store_true", help="ours through torch.compile (diffusers stays eager)")
    args = common.parse_benchmark_args(parser, argv, dtypes=("fp32", "fp16"), repeat=3,
                                       gpu={"preset": "sd15", "dtype": "fp16", "size": 512},
                                       cpu={"preset": "tiny", "dtype": "fp32", "size": 64})
    if args.child:
        return common.print_child_result(_child(args, args.child[0]))
    common.require_reference(parser, "diffusers", "transformers", "open_clip")

    options = common.forwarded(args, "preset", "device", "dtype", "size", "steps", "repeat", "threads", "compile")
    runs = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for impl in runs:
            runs[impl].append(common.run_child(parser, "benchmarks.txt2img", impl, *options))
    ours, ref = ({"seconds": min(r["seconds"] for r in side), "peak_bytes": max(r["peak_bytes"] for r in side)}
                 for side in runs.values())
    print(f"benchmarks.txt2img: {args.preset}, {args.device}, {args.dtype}, {args.size}x{args.size}, Euler, "
          f"{args.steps} steps, CFG 7, threads {args.threads or torch.get_num_threads()}, best of "
          f"{args.rounds} x {args.repeat} runs" + (", ours compiled, diffusers eager" if args.compile else ""))
    print(f"{'':<12}{'time':>10}{'it/s':>9}{'peak memory':>14}")
    for name, result in (("ours", ours), ("diffusers", ref)):
        print(f"{name:<12}{result['seconds']:9.3f}s{args.steps / result['seconds']:9.2f}"
              f"{result['peak_bytes'] / 2**20:10.0f} MiB")
    # Below 1 MiB a peak is allocator noise (a tiny model reuses what its warm-up allocated): no meaningful ratio.
    memory = f"{ours['peak_bytes'] / ref['peak_bytes']:10.2f}x" if ref["peak_bytes"] >= 2**20 else f"{'n/a':>11}"
    print(f"{'ratio':<12}{ours['seconds'] / ref['seconds']:9.2f}x{ref['seconds'] / ours['seconds']:8.2f}x{memory}"
          "   (time: ours / theirs, goal <= 1.0 on the CPU; it/s: ours / theirs, goal >= 1.5 on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
