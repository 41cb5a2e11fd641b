"""python -m sample.bench — end-to-end txt2img against diffusers' StableDiffusionPipeline, measured in the same run.

    python -m sample.bench [--preset tiny|sd15] [--device cpu|cuda] [--dtype fp32|fp16] [--size N]
                           [--steps 20] [--repeat 3] [--rounds 2] [--threads N]

Both sides get the same random weights (diffusers' through its own converters), prompt, negative prompt, CFG scale 7,
Euler sampler, step count and size, and produce a PIL image: prompt encoding, sampling and VAE decoding are all timed.
Prints the best time of `--repeat` runs (after a warm-up) over `--rounds` alternating subprocess pairs (ours, theirs,
ours, theirs, ...: on a shared machine the best of several runs is the reading least disturbed by other jobs), it/s
(steps per second of the whole run) and peak memory above the loaded model (CUDA allocator peak, or peak RSS on the
CPU), ours against diffusers'. Each side runs in its own subprocesses so the memory readings do not mix. Defaults: CPU `tiny` at 64², fp32; GPU `sd15` at 512², fp16. Goals: ≤ 1.0× diffusers' time on the
CPU, ≥ 1.5× its it/s on a GPU. Needs the test extras (diffusers, transformers, open_clip_torch).
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import torch

from ldm.bench import current_rss_bytes, peak_rss_bytes, reset_peak_rss

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PROMPT, NEGATIVE = "a red circle on a white background, (masterpiece:1.2)", "blurry, lowres"


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter from a seeded generator and return the model: matrices N(0, 1/fan_in) so activations keep
    their scale through deep stacks (LeCun et al. 1998), norm scales near 1, biases small. Unlike PyTorch's default
    initialisation this also fills the layers Stable Diffusion starts at zero (UNet output, attention projections),
    without which an untrained UNet predicts exactly zero noise and ignores the prompt — and a parity test on zero
    weights would prove nothing (the tests use this too)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            std = 1 / math.sqrt(parameter[0].numel())
            values = torch.randn(parameter.shape, generator=generator) * std
        elif name.endswith("weight"):
            values = 1 + 0.1 * torch.randn(parameter.shape, generator=generator)
        else:
            values = 0.1 * torch.randn(parameter.shape, generator=generator)
        parameter.copy_(values)
    return model


def _build(args, impl: str):
    """(run once, model device) for one side, the weights drawn from seed 0 either way."""
    import ldm
    from sample import GenerationParams, LoadedModel, generate

    model = ldm.create_model(args.preset)
    randomize_weights(model, 0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    steps, size = args.steps, args.size
    if impl == "ours":
        alphas = model.alphas_cumprod
        model.to(device=device, dtype=dtype)
        model.alphas_cumprod = alphas.to(device)
        loaded = LoadedModel(model, args.preset)
        params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler", scheduler="Uniform",
                                  steps=steps, cfg_scale=7.0, width=size, height=size, seed=0)
        return lambda: generate(loaded, params, progress=False).images[0]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from sample_helpers import diffusers_pipeline  # test-only bridge: diffusers is never a runtime dependency

    pipeline = diffusers_pipeline(model).to(device=device, dtype=dtype)
    del model
    channels, latent = pipeline.unet.config.in_channels, size // pipeline.vae_scale_factor
    noise = torch.randn(1, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    return lambda: pipeline(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                            height=size, width=size, latents=noise.to(device=device, dtype=dtype)).images[0]


def _child(args, impl: str) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        run = _build(args, impl)
        run()  # warm-up: kernels, caches, tokenizer vocabulary
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = current_rss_bytes()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"seconds": min(times), "peak_bytes": peak - base}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m sample.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15" if cuda else "tiny", help="model preset (SD1 family)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--size", type=int, help="image size in pixels (default: 512 on a GPU, 64 on the CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess pairs (best time reported)")
    parser.add_argument("--threads", type=int, help="CPU threads for both sides (default: PyTorch's)")
    parser.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")
    args.size = args.size or (512 if on_gpu else 64)
    if args.child:
        print(json.dumps(_child(args, args.child)))
        return 0
    if importlib.util.find_spec("diffusers") is None:
        parser.error("the benchmark compares against diffusers: install the test extras (pip install -e '.[test]')")

    common = ["--preset", args.preset, "--device", args.device, "--dtype", args.dtype, "--size", str(args.size),
              "--steps", str(args.steps), "--repeat", str(args.repeat)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    runs = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for impl in runs:
            out = subprocess.run([sys.executable, "-m", "sample.bench", "--child", impl, *common], check=True,
                                 capture_output=True, text=True)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, ref = ({"seconds": min(r["seconds"] for r in side), "peak_bytes": max(r["peak_bytes"] for r in side)}
                 for side in runs.values())
    print(f"sample.bench: txt2img {args.preset}, {args.device}, {args.dtype}, {args.size}x{args.size}, Euler, "
          f"{args.steps} steps, CFG 7, threads {args.threads or torch.get_num_threads()}, best of "
          f"{args.rounds} x {args.repeat} runs")
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
