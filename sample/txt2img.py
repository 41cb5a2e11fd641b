"""`python -m sample.txt2img "a red circle" [options]`: A1111's txt2img tab as a command.

Images go to --outdir (default outputs/txt2img-images) as NNNNN-SEED-prompt.png with the infotext in their
`parameters` chunk; their paths are printed on stdout. Without --model the embedded default model is used.
`--from-file prompts.txt` runs one job per line; under `torchrun --nproc-per-node N -m sample.txt2img --from-file ...`
the lines are shared out over the N processes, with the seeds and file names one process would give (sample.sharded).
"""
import sys

from .cli import ArgumentParser, add_common_arguments, common_params, parse_arguments, run
from .params import HIRES_UPSCALERS, GenerationParams


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m sample.txt2img", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?",
                        help="Prompt (A1111 syntax: (emphasis:1.2), [from:to:when], <lora:name:w>, ...)")
    parser.add_argument("--from-file", help="Prompts from file: one prompt a line, each a job; under torchrun the "
                                            "lines are shared out over the processes (see sample.sharded)")
    add_common_arguments(parser)
    parser.add_argument("--hires", action="store_true", help="Hires. fix: upscale and refine in a second pass")
    parser.add_argument("--hr-scale", type=float, default=2.0, help="Hires upscale by (default 2)")
    parser.add_argument("--hr-upscaler", default="Latent",
                        help=f"Hires upscaler: {', '.join(HIRES_UPSCALERS)} or a model in --upscalers-dir")
    parser.add_argument("--upscalers-dir", help="Folder of upscaler models (ESRGAN, Real-ESRGAN, SwinIR; also its "
                                                "A1111 subfolders ESRGAN/, RealESRGAN/, SwinIR/)")
    parser.add_argument("--hr-second-pass-steps", type=int, default=0, help="Hires steps (0: same as --steps)")
    parser.add_argument("--hr-denoising-strength", type=float, default=0.7, help="Hires denoising strength")
    args = parse_arguments(parser, argv)
    if (args.prompt is None) == (args.from_file is None):
        parser.error("give either a prompt or --from-file PROMPTS.txt")
    if args.from_file and (args.grid or args.zip):
        parser.error("--grid and --zip apply to one prompt's images, not to --from-file")
    params = GenerationParams(prompt=args.prompt or "", enable_hr=args.hires, hr_scale=args.hr_scale,
                              hr_upscaler=args.hr_upscaler, hr_second_pass_steps=args.hr_second_pass_steps,
                              hr_denoising_strength=args.hr_denoising_strength, **common_params(args))
    return run(parser.prog, args, params, "outputs/txt2img-images", prompt_file=args.from_file)


if __name__ == "__main__":
    sys.exit(main())
