"""python -m shapes make|judge|text|clip-eval: render a data set, score images against their prompts, train the text
stage, measure a CLIP's zero-shot caption retrieval.

    python -m shapes make --out data/shapes --n 20000 --seed 0
    python -m shapes make --out data/base --n 20000 --exclude-shape star --exclude-colour purple
    python -m shapes judge --images outputs/txt2img              # prompts from metadata.jsonl, .txt or infotext
    python -m shapes judge --images data/shapes --prompts data/shapes/metadata.jsonl
    python -m shapes judge --model default --n 200 --seed 0      # generate for held-out prompts, then score
    python -m shapes judge --model default+heart.safetensors:0.8 --n 200   # a model spec: base + LoRA at 0.8
    python -m shapes text --model outputs/tiny-shapes-vae/model.safetensors --data data/shapes \\
        --out outputs/tiny-shapes-text/model.safetensors
    python -m shapes clip-eval --clip outputs/tiny-shapes-clip/clip.safetensors --n 500   # see shapes.zero_shot

`judge` prints JSON accuracies and writes a labelled grid PNG (`--grid`). `python -m train.shapes`,
`python -m metrics.shapes` and `python -m train.shapes_text` are the same commands under their earlier names.
"""
import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from sample.cli import ArgumentParser

from .dataset import make_dataset
from .judge import generate_images, held_out_prompts, judge, load_prompted_images, save_grid
from .world import COLOURS, SHAPES, Vocabulary

PROG = "python -m shapes"


def _names(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def add_vocabulary_arguments(parser) -> None:
    """The options that choose which concepts appear and how often pairs do (data sets of `make`, held-out prompts
    of `judge`)."""
    parser.add_argument("--shapes", type=_names, default=",".join(SHAPES), help="allowed shapes, comma separated")
    parser.add_argument("--colours", "--colors", type=_names, default=",".join(COLOURS),
                        help="allowed colours, comma separated")
    parser.add_argument("--exclude-shape", action="append", default=[], metavar="SHAPE",
                        help="hold a shape out (repeatable)")
    parser.add_argument("--exclude-colour", "--exclude-color", action="append", default=[], metavar="COLOUR",
                        help="hold a colour out (repeatable)")
    parser.add_argument("--require-shape", action="append", default=[], metavar="SHAPE",
                        help="every image has an object of this shape or of a required colour (repeatable)")
    parser.add_argument("--require-colour", "--require-color", action="append", default=[], metavar="COLOUR",
                        help="every image has an object of this colour or of a required shape (repeatable)")
    parser.add_argument("--two-object-fraction", type=float, default=0.4, metavar="F",
                        help="share of images with two objects in a relation")


def vocabulary_from_args(args) -> Vocabulary:
    return Vocabulary.restricted(args.shapes, args.colours, args.exclude_shape, args.exclude_colour,
                                 args.require_shape, args.require_colour)


def _make_parser(commands) -> argparse.ArgumentParser:
    make = commands.add_parser("make", help="render a data set (imagefolder + webdataset shards)",
                               description="Render captioned images of coloured shapes with their ground truth.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    make.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    make.add_argument("--n", type=int, required=True, help="number of images")
    make.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) and the options")
    make.add_argument("--size", type=int, default=64, metavar="PIXELS", help="image width and height")
    make.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per webdataset shard")
    make.add_argument("--rotation", type=float, default=0.0, metavar="DEGREES",
                      help="turn each object by a random angle in ±this many degrees (0: upright)")
    make.add_argument("--silhouettes", action="store_true",
                      help="also write each image's silhouette as a ControlNet control image (conditioning_image)")
    make.add_argument("--segmentation", action="store_true",
                      help="also write each image's colour segmentation (each object in its flat colour on black) as "
                           "a ControlNet control image (conditioning_image); not with --silhouettes")
    add_vocabulary_arguments(make)
    return make


def _make(args, make: argparse.ArgumentParser) -> int:
    if args.n < 1 or args.size < 32 or args.shard_size < 1:
        make.error("--n and --shard-size must be positive and --size at least 32")
    if not 0.0 <= args.two_object_fraction <= 1.0:
        make.error("--two-object-fraction must be between 0 and 1")
    try:
        vocabulary = vocabulary_from_args(args)
        make_dataset(args.out, args.n, args.seed, vocabulary, args.two_object_fraction, args.rotation, args.size,
                     args.size, args.shard_size, progress=True, silhouettes=args.silhouettes,
                     segmentation_maps=args.segmentation)
    except (ValueError, FileExistsError, RuntimeError) as e:
        make.error(str(e))
    print(f"wrote {args.n} images to {args.out} (metadata.jsonl) and {args.out}/shards")
    return 0


def _judge_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("judge", help="score images against their prompts (JSON accuracies and a grid)",
                                 description="Shapes-world adherence: detect the objects in images and compare them "
                                 "with their prompts; prints JSON accuracies and writes a labelled grid.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="score the images of a folder")
    source.add_argument("--model", metavar="SPEC", help="generate for held-out prompts, then score: a checkpoint "
                        "or 'default', optionally +LORA[:STRENGTH] / +EMBEDDING (e.g. base.safetensors+heart."
                        "safetensors:0.8)")
    parser.add_argument("--prompts", metavar="FILE", help="with --images: a metadata.jsonl (file_name, text); "
                        "default: DIR/metadata.jsonl, else each image's .txt file or PNG infotext")
    parser.add_argument("--n", type=int, default=200, help="with --model: number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="with --model: seed of the prompts and of image 0")
    parser.add_argument("--sampler", default="Euler a", help="with --model: sampling method")
    parser.add_argument("--steps", type=int, default=20, help="with --model: sampling steps")
    parser.add_argument("--cfg-scale", type=float, default=7.0, help="with --model: CFG scale")
    parser.add_argument("--lora", metavar="FILE", help="with --model: a LoRA file applied to every image")
    parser.add_argument("--lora-strength", type=float, default=1.0, metavar="S",
                        help="with --lora: its strength (A1111's <lora:name:S>)")
    parser.add_argument("--outdir", metavar="DIR", help="with --model: also save the images and a metadata.jsonl")
    parser.add_argument("--grid", default="shapes_grid.png", metavar="PNG", help="labelled grid to write ('' for none)")
    parser.add_argument("--grid-images", type=int, default=64, metavar="N", help="at most this many images in the grid")
    add_vocabulary_arguments(parser.add_argument_group("held-out prompts (with --model)"))
    return parser


def _judge(args, parser: argparse.ArgumentParser) -> int:
    if args.n < 1 or args.steps < 1 or args.grid_images < 1:
        parser.error("--n, --steps and --grid-images must be positive")
    if args.prompts and not args.images:
        parser.error("--prompts goes with --images")
    if args.lora and not args.model:
        parser.error("--lora goes with --model")
    if args.lora_strength != 1.0 and not args.lora:
        parser.error("--lora-strength goes with --lora")
    try:
        if args.images:
            if not Path(args.images).is_dir():
                raise ValueError(f"--images {args.images}: no such folder")
            pairs = load_prompted_images(args.images, args.prompts)
            missing = [str(path) for path, _ in pairs if not path.is_file()]
            if missing:
                raise ValueError(f"{len(missing)} listed image(s) missing, e.g. {missing[0]}")
            images = [Image.open(path).convert("RGB") for path, _ in pairs]
            prompts = [text for _, text in pairs]
        else:
            prompts = held_out_prompts(args.n, args.seed, vocabulary_from_args(args), args.two_object_fraction)
            images = generate_images(args.model, prompts, args.seed, args.sampler, args.steps, args.cfg_scale,
                                     args.lora, args.lora_strength)
            if args.outdir:
                _save_generated(Path(args.outdir), images, prompts)
        summary, judged = judge(images, prompts)
    except (ValueError, OSError, RuntimeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.grid:
        save_grid([image for image, _ in judged[:args.grid_images]], [s for _, s in judged[:args.grid_images]],
                  args.grid)
    print(json.dumps(summary, indent=2))
    return 0


def _save_generated(folder: Path, images: list[Image.Image], prompts: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index, (image, prompt) in enumerate(zip(images, prompts)):
            image.save(folder / f"{index:05d}.png")
            metadata.write(json.dumps({"file_name": f"{index:05d}.png", "text": prompt}) + "\n")


def _text_parser(commands) -> argparse.ArgumentParser:
    text = commands.add_parser("text", help="train the text encoder to read caption structure (stage 2)",
                               description="Stage 2 of the shapes recipe: teach the text encoder to read its "
                               "caption's structure before the UNet uses it (see shapes.text).",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    text.add_argument("--model", required=True, help="checkpoint whose text encoder is trained (stage 1's file)")
    text.add_argument("--data", required=True, help="the shapes data set whose captions are read")
    text.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    text.add_argument("--steps", type=int, default=1000)
    text.add_argument("--batch-size", type=int, default=256)
    text.add_argument("--lr", type=float, default=1e-3)
    text.add_argument("--held-out", type=int, default=1000, help="captions only measured, not trained on")
    text.add_argument("--seed", type=int, default=0)
    return text


def _text(args, parser: argparse.ArgumentParser) -> int:
    from .text import NoCaptionsError, train_text_stage  # here, so `make` and `judge` load no torch

    try:
        result = train_text_stage(args.model, args.data, args.out, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, held_out=args.held_out, seed=args.seed)
    except NoCaptionsError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0


def _clip_eval_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("clip-eval", help="a CLIP's zero-shot caption retrieval on held-out renders (JSON)",
                                 description="Zero-shot caption retrieval of a CLIP file on held-out renders: colour, "
                                 "shape, position, relation and colour binding, each a choice among captions that "
                                 "differ in that attribute only (see shapes.zero_shot). Prints JSON accuracies.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clip", required=True, metavar="FILE", help="an OpenAI-layout CLIP file (.safetensors)")
    parser.add_argument("--n", type=int, default=500, help="one-object scenes, and as many two-object scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out scenes")
    vocabulary = parser.add_argument_group("vocabulary of the scenes")
    vocabulary.add_argument("--shapes", type=_names, default=",".join(SHAPES), help="allowed shapes, comma separated")
    vocabulary.add_argument("--colours", "--colors", type=_names, default=",".join(COLOURS),
                            help="allowed colours, comma separated")
    return parser


def _clip_eval(args, parser: argparse.ArgumentParser) -> int:
    if args.n < 1:
        parser.error("--n must be positive")
    from ldm.clip_model import load_clip  # here, so `make` and `judge` load no torch
    from .zero_shot import zero_shot_accuracy

    try:
        vocabulary = Vocabulary.restricted(args.shapes, args.colours)
        model = load_clip(args.clip)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps(zero_shot_accuracy(model, args.n, args.seed, vocabulary), indent=2))
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description="The shapes world: render captioned data sets, judge "
                                     "images against their prompts, train the text stage, measure a CLIP.")
    commands = parser.add_subparsers(dest="command", required=True)
    subcommands = {"make": (_make_parser(commands), _make), "judge": (_judge_parser(commands), _judge),
                   "text": (_text_parser(commands), _text),
                   "clip-eval": (_clip_eval_parser(commands), _clip_eval)}
    args = parser.parse_args(argv)
    subparser, run = subcommands[args.command]
    return run(args, subparser)


if __name__ == "__main__":
    sys.exit(main())
