"""`python -m sample.img2img --init-image IMAGE ["prompt"] [--mask MASK] [options]`: A1111's img2img and inpaint tabs.

With --mask, white areas of the mask are regenerated and the rest of the image is kept. Images go to --outdir
(default outputs/img2img-images) as NNNNN-SEED-prompt.png with the infotext embedded; their paths are printed.
"""
import sys

from .cli import ArgumentParser, add_common_arguments, common_params, parse_arguments, run
from .params import INPAINTING_FILLS, RESIZE_MODES, GenerationParams


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m sample.img2img", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", default="", help="Prompt (A1111 syntax)")
    parser.add_argument("--init-image", action="append", required=True,
                        help="Image to start from (repeat to give one per image of a batch)")
    add_common_arguments(parser)
    parser.add_argument("--denoising-strength", type=float, default=0.75, help="Denoising strength (default 0.75)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="Noise multiplier for img2img")
    parser.add_argument("--resize-mode", default=RESIZE_MODES[0], choices=RESIZE_MODES, help="Resize mode")
    parser.add_argument("--mask", help="Inpainting mask (white: regenerate)")
    parser.add_argument("--mask-blur", type=int, default=4, help="Mask blur in pixels (default 4)")
    parser.add_argument("--mask-invert", action="store_true", help="Mask mode: inpaint not masked")
    parser.add_argument("--inpainting-fill", default="original", choices=INPAINTING_FILLS, help="Masked content")
    parser.add_argument("--only-masked", action="store_true", help="Inpaint area: only masked (at full resolution)")
    parser.add_argument("--only-masked-padding", type=int, default=32, help="Only masked padding, pixels")
    parser.add_argument("--inpainting-mask-weight", type=float, default=1.0,
                        help="Inpainting conditioning mask strength (9-channel inpainting models)")
    args = parse_arguments(parser, argv)
    params = GenerationParams(
        prompt=args.prompt, init_images=args.init_image, denoising_strength=args.denoising_strength,
        noise_multiplier=args.noise_multiplier, resize_mode=RESIZE_MODES.index(args.resize_mode), mask=args.mask,
        mask_blur=args.mask_blur, inpainting_mask_invert=args.mask_invert,
        inpainting_fill=INPAINTING_FILLS.index(args.inpainting_fill), inpaint_full_res=args.only_masked,
        inpaint_full_res_padding=args.only_masked_padding, inpainting_mask_weight=args.inpainting_mask_weight,
        **common_params(args))
    return run(parser.prog, args, params, "outputs/img2img-images")


if __name__ == "__main__":
    sys.exit(main())
