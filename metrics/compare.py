"""python -m metrics.compare --prompts FILE --model A --model B [--seeds 1,2] [--sampler "Euler a"] ...

Generates every prompt with every seed under each model with identical settings (e.g. the base model and its
fine-tuned version), saves the images as `OUTDIR/<model>/<prompt>-<seed>.png` with their A1111 infotext, and writes
`OUTDIR/index.html`: a metric table per model, then for each prompt the models' images side by side with their
infotexts. The same file names in every model folder make the folders ready for `python -m metrics.human serve` and
for the paired metrics of `python -m metrics.evaluate`.

For distribution metrics (FD, KID, precision/recall against reference images, with bootstrap intervals) and a check
that they rank the models as the judge does, use `python -m metrics.evaluate --model ...` (docs/EVALUATION.md).

Per-model metrics: the CLIP score (with `--clip-weights`), and prompt-adherence scores from every scorer in
ADHERENCE_SCORERS whose domain the prompts are in (the shapes judge, `shapes.judge`, for shapes-world prompts).
An adherence scorer is a function (images: list[PIL.Image], prompts: list[str]) -> {name: value} or None, where None
means "these prompts are outside my domain"; add one to ADHERENCE_SCORERS to have it reported.

Prompts FILE: one prompt per line (blank lines and lines starting with # are skipped), or a .jsonl file with a
"prompt" or "text" field per line. `--model` is a model spec (`sample.models.ModelSpec`: a checkpoint path or
"default", then `+LORA[:STRENGTH]` or `+EMBEDDING` parts), optionally labelled `LABEL=SPEC`:

    python -m metrics.compare --prompts p.txt --model base=base.safetensors \
        --model tuned=base.safetensors+heart.safetensors --model half=base.safetensors+heart.safetensors:0.5
Exit status: 0 done, 2 usage error, 1 unreadable input or failed generation.
"""
import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from sample.cli import ArgumentParser, UsageError
from sample.models import ModelSpec, generation_dtype, load_model_spec, parse_model_spec

from ldm.clip_model import load_clip

from . import report
from .clip import clip_similarities

PROG = "python -m metrics.compare"


def shapes_adherence(images: list[Image.Image], prompts: list[str]) -> dict[str, float] | None:
    """The shapes judge's accuracies (shapes.judge), or None when no prompt is in the shapes vocabulary. "shapes
    overall" is the share of judged images drawn entirely right (one- and two-object prompts together)."""
    from shapes.judge import judge
    try:
        summary, judged = judge(images, prompts)
    except ValueError:
        return None
    scores = {f"shapes {name}": value for name, value in summary.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)}
    scores["shapes overall"] = round(sum(bool(score.correct) for _, score in judged) / len(judged), 4)
    return scores


ADHERENCE_SCORERS: dict[str, Callable] = {"shapes": shapes_adherence}


@dataclass(frozen=True)
class LabelledModel:
    label: str
    spec: ModelSpec
    text: str


@dataclass
class Sample:
    prompt_index: int
    seed: int
    path: Path
    infotext: str
    image: Image.Image


def parse_models(values: list[str]) -> list[LabelledModel]:
    """`--model` values (SPEC or LABEL=SPEC) -> models with unique labels (default: the spec's file names without
    suffix, joined by +)."""
    specs = []
    for value in values:
        label, separator, text = value.partition("=")
        if not separator:
            label, text = "", value
        try:
            spec = parse_model_spec(text)
        except ValueError as error:
            raise UsageError(f"--model {value!r}: {error}") from None
        label = label or "+".join(Path(part).stem for part in [spec.base, *[path for path, _ in spec.additions]])
        if not label:
            raise UsageError(f"--model takes SPEC or LABEL=SPEC; got {value!r}")
        specs.append(LabelledModel(label, spec, text))
    labels = [s.label for s in specs]
    if len(specs) < 2:
        raise UsageError("a comparison needs at least two --model")
    if len(set(labels)) != len(labels):
        raise UsageError(f"model labels must differ (got {', '.join(labels)}); name them with LABEL=PATH")
    if any(os.sep in label or label.startswith(".") for label in labels):
        raise UsageError(f"model labels become folder names, so they may not contain {os.sep} or start with '.'")
    return specs


def read_prompts(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt", row.get("text")), str):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" or \"text\" string")
                prompts.append(row.get("prompt", row.get("text")))
    else:
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers; got {text!r}") from None
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds):
        raise UsageError("--seeds needs at least one seed in [0, 4294967295] (a fixed seed: -1 would differ per "
                         "model)")
    return seeds


def load_generator(spec: ModelSpec, device: torch.device):
    """(LoadedModel, EmbeddingDatabase or None) for `sample.generate`: the spec's checkpoint with its LoRAs merged
    (fp16 on a GPU, fp32 on the CPU)."""
    return load_model_spec(spec, device=device, dtype=generation_dtype(device))


def generation_pipeline():
    """(generate, GenerationParams) from `sample`, the generation pipeline this command drives."""
    try:
        from sample.generate import generate
        from sample.params import GenerationParams
    except ImportError as error:
        raise RuntimeError(f"metrics.compare needs the generation pipeline sample.generate, which could not be "
                           f"imported ({error})") from None
    return generate, GenerationParams


def generate_samples(spec: LabelledModel, prompts: list[str], seeds: list[int], settings: dict, outdir: Path,
                     device: torch.device) -> list[Sample]:
    """Every (prompt, seed) with one model; each image is written as soon as it exists."""
    generate, GenerationParams = generation_pipeline()
    model, embeddings = load_generator(spec.spec, device)
    folder = outdir / spec.label
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    with tqdm(total=len(prompts) * len(seeds), desc=spec.label, unit="img", leave=False) as progress:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                result = generate(model, GenerationParams(prompt=prompt, seed=seed, **settings), embeddings=embeddings)
                image, infotext = result.images[0], result.infotexts[0]
                path = folder / f"{index:04d}-{seed}.png"
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", infotext)
                image.save(path, pnginfo=info)
                samples.append(Sample(index, seed, path, infotext, image))
                progress.update()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return samples


def model_metrics(samples: list[Sample], prompts: list[str], clip_model, adherence: list[str]) -> dict[str, float]:
    images = [s.image for s in samples]
    sample_prompts = [prompts[s.prompt_index] for s in samples]
    metrics = {}
    if clip_model is not None:
        metrics["clip_score"] = max(clip_similarities(clip_model, images, sample_prompts).mean().item(), 0.0)
    for name in adherence:
        scores = ADHERENCE_SCORERS[name](images, sample_prompts)
        if scores is not None:
            metrics.update(scores)
    return metrics


def report_body(specs: list[LabelledModel], prompts: list[str], seeds: list[int], samples: dict[str, list[Sample]],
                metrics: dict[str, dict], timings: dict[str, float], settings: dict) -> list[str]:
    names = sorted({name for m in metrics.values() for name in m})
    # One column per model, one row per quantity: models are few, metrics (with the adherence scores) many.
    rows = [["model", *[spec.text for spec in specs]],
            ["images", *[len(samples[spec.label]) for spec in specs]],
            ["seconds", *[timings[spec.label] for spec in specs]],
            *[[name, *[metrics[spec.label].get(name, "") for spec in specs]] for name in names]]
    body = [report.table(["", *[spec.label for spec in specs]], rows),
            "<p>Settings: " + report.escape(json.dumps({**settings, "seeds": seeds})) + "</p>"]
    by_key = {label: {(s.prompt_index, s.seed): s for s in model_samples} for label, model_samples in samples.items()}
    for index, prompt in enumerate(prompts):
        body.append(f"<h2>{index}. {report.escape(prompt)}</h2>")
        header = "".join(f"<th>{report.escape(spec.label)}</th>" for spec in specs)
        cells = []
        for seed in seeds:
            row = []
            for spec in specs:
                sample = by_key[spec.label][(index, seed)]
                row.append(f"<td>{report.figure(sample.image, '', 256)}"
                           f'<div class="infotext">{report.escape(sample.infotext)}</div></td>')
            cells.append("<tr>" + "".join(row) + "</tr>")
        body.append(f"<table><tr>{header}</tr>{''.join(cells)}</table>")
    return body


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Generate the same prompts and seeds with several "
                                     "models and write a side-by-side HTML comparison with per-model metrics.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", required=True, metavar="FILE", help="prompts, one per line (or .jsonl)")
    parser.add_argument("--model", action="append", default=[], metavar="[LABEL=]SPEC",
                        help="a model to compare (give two or more): a checkpoint, or CHECKPOINT+LORA[:STRENGTH] "
                        "(+EMBEDDING ...)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each used for every prompt")
    parser.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    parser.add_argument("--sampler", default="Euler a", help="sampling method")
    parser.add_argument("--scheduler", default="Automatic", help="schedule type")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--cfg-scale", type=float, default=7.0, help="CFG scale")
    parser.add_argument("--width", type=int, default=None, help="width in pixels (default: the model's)")
    parser.add_argument("--height", type=int, default=None, help="height in pixels (default: the model's)")
    parser.add_argument("--outdir", default="compare", help="folder for the images and index.html")
    parser.add_argument("--clip-weights", metavar="PATH", help="CLIP state dict, to report the CLIP score")
    parser.add_argument("--clip-activation", choices=("quick_gelu", "gelu"), default=None,
                        help="CLIP MLP activation (quick_gelu for OpenAI's models, gelu for LAION's; default: the "
                             "file's metadata, as method 'clip' writes it, else quick_gelu)")
    parser.add_argument("--adherence", action="append", choices=sorted(ADHERENCE_SCORERS), default=None,
                        help="adherence scorers to run (default: all; each reports only for prompts in its domain)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {"negative_prompt": args.negative_prompt, "sampler_name": args.sampler, "scheduler": args.scheduler,
                "steps": args.steps, "cfg_scale": args.cfg_scale, "width": args.width, "height": args.height}
    try:
        specs, seeds = parse_models(args.model), parse_seeds(args.seeds)
        if not Path(args.prompts).is_file():
            raise UsageError(f"--prompts: file not found: {args.prompts}")
        prompts = read_prompts(args.prompts)
        missing = [path for s in specs for path in s.spec.files() if not Path(path).is_file()]
        if missing:
            raise UsageError(f"file not found: {', '.join(missing)}")
        clip_model = load_clip(args.clip_weights, device=device, activation=args.clip_activation) \
            if args.clip_weights else None
        outdir = Path(args.outdir)
        samples, metrics, timings = {}, {}, {}
        for spec in specs:
            start = time.perf_counter()
            samples[spec.label] = generate_samples(spec, prompts, seeds, settings, outdir, device)
            timings[spec.label] = time.perf_counter() - start
            metrics[spec.label] = model_metrics(samples[spec.label], prompts, clip_model,
                                                args.adherence or sorted(ADHERENCE_SCORERS))
    except UsageError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    except (ValueError, OSError, RuntimeError) as error:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    report.write_page(outdir / "index.html", "Model comparison",
                      report_body(specs, prompts, seeds, samples, metrics, timings, settings))
    print(json.dumps({"outdir": str(outdir), "report": str(outdir / "index.html"), "metrics": metrics,
                      "seconds": timings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
