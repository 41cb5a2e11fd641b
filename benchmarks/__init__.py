"""Benchmarks of this checkout against the reference implementations, measured in the same run.

Commands, run from the repository root (this folder is not installed with the library, since it compares against the
test oracles):

    python -m benchmarks.models             # UNet forward, VAE decode and checkpoint loading against diffusers
    python -m benchmarks.sampler_overhead   # per-step overhead of every sampler against k-diffusion and diffusers
    python -m benchmarks.txt2img            # end-to-end txt2img against diffusers' StableDiffusionPipeline
    python -m benchmarks.train_step         # one UNet training step against diffusers
    bash benchmarks/gpu.sh                  # everything a GPU can tell, as one table for docs/BENCHMARKS.md

The Triton kernels' own benchmark, which needs no oracle, ships with them: python -m kernels.bench.
"""
