"""python -m benchmarks.realtime — images/s of the embedded model: eager, compiled, compiled + LCM, against diffusers'
pipeline with its UNet torch.compile'd, in the same run.

    python -m benchmarks.realtime [--batch-sizes 1,8] [--steps 20] [--lcm-steps 4] [--repeat 3] [--threads 1]
                                  [--precision full|bf16]

All at 64×64 on the embedded default model (ldm/data/tiny-shapes.safetensors); diffusers gets the same weights through
its own converters. Rows:
- ours eager / ours compiled (generate(compile=True)) / diffusers compiled (pipeline.unet = torch.compile(unet), as
  diffusers documents): Euler, `--steps` steps, CFG 7 (two UNet evaluations per step, batched);
- ours compiled + LCM: the LCM sampler, `--lcm-steps` steps, CFG 1 (one UNet evaluation per step), on the base
  weights (the sampler's own cost);
- ours compiled + LCM-LoRA: the same with `<lora:tiny-shapes-lcm:1>` in the prompt, i.e. the job of the web UI's
  "tiny-shapes + LCM" preset, whose images the adherence scores of docs/RESULTS.md are for: the shipped few-step
  LoRA is merged into the weights before sampling and restored after it, once per job (sample.lora.applied).
`--precision bf16` loads both models' weights in bfloat16 (ours: `--precision bf16`; diffusers: `.to(torch.bfloat16)`),
so the two pipelines are always compared at equal precision.
images/s = batch size / the best of `--repeat` timed runs of a whole job (prompt encoding, sampling, VAE decode, PIL),
after a warm-up run that also compiles. Compile time is printed separately. The ratio line compares ours compiled
with diffusers compiled at equal steps (goal ≥ 1.3×). Needs the test extras (diffusers, transformers).
"""
import argparse
import sys
import time

import torch

from benchmarks import common

PROMPT, NEGATIVE = "a red circle on the left", ""
# The few-step LoRA shipped beside the default model (sample.models.BUILTIN_LORAS).
LCM_LORA = "tiny-shapes-lcm"


def _ours(checkpoint, batch: int, sampler: str, steps: int, cfg: float, compile: bool, prompt: str = PROMPT):
    from sample import GenerationParams, generate
    params = GenerationParams(prompt=prompt, negative_prompt=NEGATIVE, sampler_name=sampler, steps=steps,
                              cfg_scale=cfg, width=64, height=64, seed=0, batch_size=batch)
    return lambda: generate(checkpoint, params, progress=False, compile=compile).images


def _diffusers(pipeline, batch: int, steps: int):
    return lambda: pipeline([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
                            generator=torch.Generator().manual_seed(0)).images


def _timed(run, repeat: int) -> tuple[float, float]:
    """(seconds of the warm-up run, which compiles; best seconds of `repeat` runs)."""
    start = time.perf_counter()
    run()
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return warm_up, min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps with CFG 7 (default 20)")
    parser.add_argument("--lcm-steps", type=int, default=4, help="LCM steps with CFG 1 (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (best reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the commands use for "
                                                               "this model)")
    parser.add_argument("--precision", choices=("full", "bf16"), default="full",
                        help="weights in float32 or bfloat16, for both pipelines (default full)")
    args = parser.parse_args(argv)
    try:
        batches = [int(value) for value in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}")
    common.require_reference(parser, "diffusers", "transformers")
    common.use_test_oracles()
    torch.set_num_threads(args.threads)
    from sample.models import default_model
    from sample_helpers import diffusers_pipeline

    dtype = {"full": torch.float32, "bf16": torch.bfloat16}[args.precision]
    checkpoint = default_model(dtype=dtype)
    pipeline = diffusers_pipeline(checkpoint.model).to(dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet = torch.compile(pipeline.unet)
    print(f"benchmarks.realtime: {checkpoint.name}, cpu, {dtype}, 64x64, threads {args.threads}, best of "
          f"{args.repeat}", flush=True)
    print(f"{'':<28}{'batch':>6}{'images/s':>10}{'ms/image':>10}{'warm-up s':>11}", flush=True)
    with torch.inference_mode():
        for batch in batches:
            rows = {
                f"ours eager, {args.steps} steps": _ours(checkpoint, batch, "Euler", args.steps, 7.0, False),
                f"ours compiled, {args.steps} steps": _ours(checkpoint, batch, "Euler", args.steps, 7.0, True),
                f"ours compiled + LCM {args.lcm_steps}": _ours(checkpoint, batch, "LCM", args.lcm_steps, 1.0, True),
                f"ours compiled + LCM-LoRA {args.lcm_steps}": _ours(checkpoint, batch, "LCM", args.lcm_steps, 1.0, True,
                                                                   f"{PROMPT} <lora:{LCM_LORA}:1>"),
                f"diffusers compiled, {args.steps}": _diffusers(pipeline, batch, args.steps),
            }
            seconds = {}
            for name, run in rows.items():
                warm_up, seconds[name] = _timed(run, args.repeat)
                print(f"{name:<28}{batch:6d}{batch / seconds[name]:10.2f}{1000 * seconds[name] / batch:10.1f}"
                      f"{warm_up:11.1f}", flush=True)
            eager, compiled, *_, diffusers = rows
            print(f"{'ratio':<28}{batch:6d}  ours compiled / diffusers compiled, images/s, equal steps: "
                  f"{seconds[diffusers] / seconds[compiled]:.2f}x (goal >= 1.3); compiled / eager: "
                  f"{seconds[eager] / seconds[compiled]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
