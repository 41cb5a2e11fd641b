"""python -m metrics.evaluate --real DIR --fake DIR [--metrics fid,kid,is,ssim,ms_ssim,psnr,clip]
python -m metrics.evaluate --real DIR --model NAME=SPEC --model NAME=SPEC ... --feature-clip FILE [--n N]

Scores a folder of generated images against a folder of real ones, prints the numbers as JSON on stdout and writes an
HTML report. Progress goes to stderr. With `--model` (multi-model mode, below) it generates the folders itself.

    fid, kid, is    FID / KID / Inception Score from the FID Inception-v3 (`--inception-weights`, see below)
    ssim, ms_ssim,  paired similarity: each fake image against the real image of the same file name (same size)
    psnr
    clip            CLIP score of each fake image against its prompt (PNG infotext or .txt caption), needs
                    `--clip-weights`
    --fd-features clip   adds `fd_clip`, the Fréchet distance in CLIP image-embedding space (Kynkäänniemi et al.
                    2023, "The Role of ImageNet Classes in Fréchet Inception Distance")
    --features MODULE:FUNCTION   any feature extractor, for when standard Inception weights are not at hand: FUNCTION
                    takes a batch of images (a list of [3, H, W] float tensors in [0, 1], sizes may differ) and returns
                    their features, [N, D] (numpy array or tensor); reported as `fd_<FUNCTION>`,
                    `kid_<FUNCTION>_mean/_std` (subsets, as for Inception), and precision_, recall_, density_ and
                    coverage_<FUNCTION> (k = --pr-k), with bootstrap intervals as below except for KID
                    (repeatable; MODULE is imported, so it may be a file on PYTHONPATH)

    --feature-clip FILE --feature-label LABEL   a CLIP (OpenAI layout, e.g. one trained here) as the one network of:
                    fd_LABEL, kid_LABEL    Fréchet distance and KID (unbiased MMD² over all images) of its image
                                           embeddings; never called FID: the features are not Inception's
                    precision_LABEL, recall_LABEL   Kynkäänniemi et al. 2019 with k = --pr-k nearest neighbours
                    density_LABEL, coverage_LABEL   Naeem et al. 2020 with the same k: how many real k-NN balls hold
                                           each generated image (over k; 1 for equal distributions), and the share
                                           of real balls holding one; robust to outlying real images
                    clip_score_LABEL       100 · cos(image, prompt) with this CLIP (max(mean, 0))
                    is_clip_zeroshot_LABEL with --zero-shot-classes: exp E_x KL(p(y|x) ‖ p(y)) (Salimans et al.
                                           2016) where p(y|x) = softmax(logit_scale · cos(image, class prompt)) over
                                           the class prompts, p(y) its mean over the images; one split
                    Each with a bootstrap interval (`--bootstrap` resamples of the real and the generated images,
                    each drawn with replacement, seeded by --seed; the percentile interval re-centred on the estimate,
                    see metrics.distribution.bootstrap_intervals) under "intervals". The report shows the names as
                    FD-LABEL, KID-LABEL, ... FD and KID depend on the number of images: compare models at equal n.
    --zero-shot-classes shapes|FILE   the class prompts: a name of ZERO_SHOT_CLASSES ("shapes": every "a {colour}
                    {shape}" of the shapes world) or a file of one class prompt a line

Multi-model mode, `--model [LABEL=]SPEC` (twice or more; SPEC as in metrics.compare: a checkpoint, "default",
"untrained" (the default model with a freshly initialised UNet, a deliberately bad model), +LORA[:STRENGTH],
+EMBEDDING): for each model, image i of `--n` is generated for prompt i (`--prompts FILE`, its lines in turn, or
else the shapes world's held-out prompts `shapes.judge.held_out_prompts(n, --seed)`) with seed --seed + i, `--sampler`,
`--steps`, `--cfg-scale`, written to OUTDIR/LABEL/NNNNNN.png with its infotext; each folder gets the --feature-clip
metrics against --real and the adherence scorers of metrics.compare (the shapes judge, for shapes prompts); then each
metric's ranking of the models is compared with the adherence ranking (`--rank-by`, default the judge's overall
accuracy) by Spearman's ρ (metrics.ranking: FD and KID count lower as better, so ρ = +1 is full agreement).
JSON on stdout, OUTDIR/index.html. One process (run metrics.protocol under torchrun to generate at scale).

FID, KID and IS are only comparable with published numbers when computed with the standard weight file
pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release of TensorFlow's 2015-12-05 Inception). Without
`--inception-weights` those metrics are refused. With any other file (recognised by its SHA-256), the numbers are
printed under names that do not claim to be them: `fd_inception_unofficial`, `kid_unofficial_*`, `is_unofficial_*`.

`--real` may also be a pytorch-fid/clean-fid `.npz` of real statistics (`mu`, `sigma`), for FID only.
Under `torchrun --nproc-per-node N -m metrics.evaluate ...` the network passes (Inception, CLIP) are shared out over
the N processes, batch by batch; the features are gathered and rank 0 prints the numbers one process would.
Exit status: 0 done, 2 usage error, 1 unreadable input or unusable device.
"""
import argparse
import importlib
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.clip_model import CLIP, load_clip
from sample.cli import ArgumentParser, UsageError
from sample.images import save_png
from sample.imagefiles import IMAGE_EXTENSIONS, list_images, read_prompt
from sample.sharded import Ranks, read_prompt_file

from . import compare, ranking, report
from .clip import clip_similarities, cosine_scores, image_embeddings, text_embeddings, zero_shot_logits
from .distribution import FeatureComparison, bootstrap_intervals, classifier_score, feature_statistics, \
    frechet_distance, inception_score, kid, load_statistics, save_statistics
from .features import CLIPImageExtractor, InceptionExtractor, default_device, read_image, sharded_batches
from .inception import STANDARD_WEIGHTS_NAME, file_sha256, is_standard_digest, load_inception
from .resize import CONVENTIONS
from .similarity import ms_ssim, psnr, ssim

METRICS = ("fid", "kid", "is", "ssim", "ms_ssim", "psnr", "clip")
INCEPTION_METRICS = ("fid", "kid", "is")
PAIRED_METRICS = {"ssim": ssim, "ms_ssim": ms_ssim, "psnr": psnr}
PROG = "python -m metrics.evaluate"
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def shapes_classes() -> list[str]:
    from shapes.captions import class_prompts
    return class_prompts()


# The values each --feature-clip metric can take (KID, an unbiased estimate, can fall below 0).
RANGES = {"fd": (0, np.inf), "kid": (-np.inf, np.inf), "precision": (0, 1), "recall": (0, 1), "density": (0, np.inf),
          "coverage": (0, 1), "clip_score": (0, 100), "is_clip_zeroshot": (1, np.inf)}

# Class vocabularies for the zero-shot IS (`--zero-shot-classes NAME`): name -> function returning the class prompts.
ZERO_SHOT_CLASSES = {"shapes": shapes_classes}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Score generated images against real ones: FID, KID, "
                                     "IS, SSIM, MS-SSIM, PSNR, CLIP score. Prints JSON; writes an HTML report.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--real", required=True, metavar="DIR|NPZ", help="folder of real images, or .npz statistics")
    parser.add_argument("--fake", metavar="DIR", help="folder of generated images (or --model)")
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {','.join(METRICS)} (default: fid,kid,is; none with "
                        "--feature-clip)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"FID Inception-v3 weights ({STANDARD_WEIGHTS_NAME} for standard FID/KID/IS)")
    parser.add_argument("--resize", choices=CONVENTIONS, default="clean",
                        help="how images are resized to 299x299 for the Inception (see metrics.resize)")
    parser.add_argument("--clip-weights", metavar="PATH", help="CLIP state dict (OpenAI/open_clip layout)")
    parser.add_argument("--clip-activation", choices=("quick_gelu", "gelu"), default=None,
                        help="CLIP MLP activation: quick_gelu for OpenAI's models, gelu for open_clip's LAION ones "
                             "(default: the file's metadata, as method 'clip' writes it, else quick_gelu)")
    parser.add_argument("--clip-vision-head-width", type=int, default=None,
                        help="CLIP image-tower head width (80 for ViT-H/14, 104 for ViT-bigG/14; default: the "
                             "file's metadata, else 64)")
    parser.add_argument("--clip-text-head-width", type=int, default=None,
                        help="CLIP text-tower head width (64 for OpenAI's and open_clip's released models; "
                             "default: the file's metadata, else 64)")
    parser.add_argument("--fd-features", choices=("clip",), action="append", default=[],
                        help="also report the Fréchet distance in this network's features (fd_<name>)")
    parser.add_argument("--features", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="also report the Fréchet distance and KID in the features of this function "
                        "(images [3, H, W] in [0, 1] -> [N, D])")
    parser.add_argument("--feature-clip", metavar="FILE", help="a CLIP whose towers give fd_/kid_/precision_/"
                        "recall_/clip_score_/is_clip_zeroshot_<LABEL> (OpenAI layout, read with --clip-activation and "
                        "--clip-vision-head-width; see above)")
    parser.add_argument("--feature-label", metavar="LABEL", help="the name of --feature-clip in the metric names "
                        "(default: its file name), e.g. shapesCLIP -> fd_shapesCLIP")
    parser.add_argument("--zero-shot-classes", metavar="NAME|FILE",
                        help=f"class prompts of is_clip_zeroshot_<LABEL>: {', '.join(ZERO_SHOT_CLASSES)} or a file")
    parser.add_argument("--pr-k", type=int, default=3,
                        help="precision/recall and density/coverage: k of the k-NN balls")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="resamples of the --feature-clip and --features metrics' intervals (0: none)")
    parser.add_argument("--confidence", type=float, default=0.95, help="coverage of the bootstrap intervals")
    models = parser.add_argument_group("multi-model mode (instead of --fake)")
    models.add_argument("--model", action="append", default=[], metavar="[LABEL=]SPEC",
                        help="a model to generate with and score (twice or more): checkpoint, default or untrained, "
                        "+LORA[:STRENGTH], +EMBEDDING")
    models.add_argument("--prompts", metavar="FILE", help="prompts, one a line, used in turn (default: the shapes "
                        "world's held-out prompts for --seed)")
    models.add_argument("--n", type=int, default=100, help="images per model")
    models.add_argument("--sampler", default="Euler a", help="sampling method")
    models.add_argument("--steps", type=int, default=20, help="sampling steps")
    models.add_argument("--cfg-scale", type=float, default=7.0, help="CFG scale")
    models.add_argument("--adherence", action="append", choices=sorted(compare.ADHERENCE_SCORERS), default=None,
                        help="adherence scorers (default: all; each reports only for prompts in its domain)")
    models.add_argument("--rank-by", default="shapes overall", help="the adherence score the metrics' rankings are "
                        "checked against")
    models.add_argument("--outdir", default="evaluation", help="folder of the models' images and index.html")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset")
    parser.add_argument("--is-splits", type=int, default=10, help="Inception Score: number of splits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets and the bootstrap; with --model "
                        "also of the held-out prompts, and image i's seed is this + i")
    parser.add_argument("--batch-size", type=int, default=32, help="images per network batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--save-real-stats", metavar="NPZ", help="also write the real images' Inception statistics")
    parser.add_argument("--report", default="evaluation.html", help="HTML report to write ('' for none)")
    parser.add_argument("--thumbnails", type=int, default=8, help="images of each set shown in the report")
    return parser


def _check_request(args: argparse.Namespace) -> list[str]:
    if bool(args.fake) == bool(args.model):
        raise UsageError("give either --fake DIR (a folder of generated images) or --model SPEC (twice or more)")
    if args.model and (args.metrics or args.fd_features or args.features):
        raise UsageError("--model reports the --feature-clip metrics only; score a model's folder (OUTDIR/LABEL) "
                         "with --fake for --metrics, --fd-features or --features")
    if args.model and not args.feature_clip:
        raise UsageError("--model needs --feature-clip FILE, the CLIP whose metrics are compared across the models")
    if args.feature_clip:
        if not Path(args.feature_clip).is_file():
            raise UsageError(f"--feature-clip: file not found: {args.feature_clip}")
        args.feature_label = args.feature_label or Path(args.feature_clip).stem
        if not LABEL.fullmatch(args.feature_label):
            raise UsageError(f"--feature-label {args.feature_label!r}: use letters, digits, '.' and '-' (e.g. "
                             "shapesCLIP); it becomes part of the metric names")
        if args.feature_label == "clip" and "clip" in args.fd_features:
            raise UsageError("--feature-label clip would collide with --fd-features clip's fd_clip; choose another")
        if Path(args.real).suffix == ".npz":
            raise UsageError("--feature-clip needs a folder of real images, not .npz statistics")
    if args.zero_shot_classes and not args.feature_clip:
        raise UsageError("--zero-shot-classes needs --feature-clip, the CLIP that classifies")
    if args.bootstrap == 1 or args.bootstrap < 0:
        raise UsageError("--bootstrap must be 0 (no intervals) or at least 2 resamples")
    if not 0 < args.confidence < 1 or args.pr_k < 1:
        raise UsageError("--confidence must lie in (0, 1) and --pr-k be at least 1")
    if args.model and args.n <= args.pr_k:
        raise UsageError(f"--n must exceed --pr-k ({args.pr_k}): precision/recall need k neighbours per image")
    default = "" if args.feature_clip else "fid,kid,is"
    requested = [m.strip() for m in (args.metrics if args.metrics is not None else default).split(",") if m.strip()]
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not requested and not args.fd_features and not args.features and not args.feature_clip:
        raise UsageError("nothing to compute: --metrics is empty and no --fd-features, --features or --feature-clip "
                         "given")
    if any(m in INCEPTION_METRICS for m in requested) and not args.inception_weights:
        raise UsageError(f"{'/'.join(m.upper() for m in requested if m in INCEPTION_METRICS)} need(s) the standard "
                         f"Inception weights file {STANDARD_WEIGHTS_NAME} (pytorch-fid's release): pass "
                         "--inception-weights PATH; no FID is printed without it. --fd-features clip gives a "
                         "Fréchet distance in CLIP features instead")
    if ("clip" in requested or args.fd_features) and not args.clip_weights:
        raise UsageError("the CLIP score and --fd-features clip need --clip-weights PATH (an OpenAI/open_clip CLIP "
                         "state dict, e.g. ViT-L/14)")
    if min(args.batch_size, args.kid_subsets, args.kid_subset_size, args.is_splits) < 1 or args.thumbnails < 0:
        raise UsageError("--batch-size, --kid-subsets, --kid-subset-size and --is-splits must be positive")
    if Path(args.real).suffix == ".npz" and ([m for m in requested if m not in ("fid", "is", "clip")]
                                             + args.fd_features + args.features):
        raise UsageError("--real as .npz statistics serves fid (and is/clip, which use the fake images only); "
                         "kid, ssim, ms_ssim, psnr, --fd-features and --features need a folder of real images")
    return requested


def _paired_scores(real_dir: Path, fake_paths: list[Path], names: list[str]) -> dict[str, float]:
    """Each fake image against the real image of the same file name: mean of each paired metric."""
    real_by_name = {p.name: p for p in list_images(real_dir)}
    unmatched = [p.name for p in fake_paths if p.name not in real_by_name]
    if unmatched:
        raise ValueError(f"{len(unmatched)} fake image(s) have no real image of the same name in {real_dir} "
                         f"(e.g. {unmatched[0]}); ssim/ms_ssim/psnr compare pairs of equal names")
    totals = dict.fromkeys(names, 0.0)
    for path in fake_paths:
        fake, real = read_image(path)[None], read_image(real_by_name[path.name])[None]
        if fake.shape != real.shape:
            raise ValueError(f"{path.name}: the fake image is {fake.shape[-1]}x{fake.shape[-2]}, the real one "
                             f"{real.shape[-1]}x{real.shape[-2]}; paired metrics need equal sizes")
        for name in names:
            totals[name] += PAIRED_METRICS[name](real, fake)
    return {name: total / len(fake_paths) for name, total in totals.items()}


def _prompts(paths: list[Path]) -> list[str]:
    prompts = [read_prompt(p) for p in paths]
    missing = [p.name for p, prompt in zip(paths, prompts) if prompt is None]
    if missing:
        raise ValueError(f"{len(missing)} fake image(s) have no prompt (no PNG infotext, no .txt caption), e.g. "
                         f"{missing[0]}; the CLIP score needs one per image")
    return prompts


def _clip_scores(model: CLIP, paths: list[Path], prompts: list[str], batch_size: int, ranks: Ranks) -> np.ndarray:
    def scores(pairs: list[tuple[Path, str]]) -> dict[str, np.ndarray]:
        images = [read_image(path) for path, _ in pairs]
        return {"clip": clip_similarities(model, images, [prompt for _, prompt in pairs]).double().numpy()}
    return sharded_batches(scores, list(zip(paths, prompts)), batch_size, ranks, "clip score")["clip"]


def _features(extractor, paths: list[Path], batch_size: int, ranks: Ranks, description: str) -> dict:
    return sharded_batches(lambda batch: extractor([read_image(p) for p in batch]), paths, batch_size, ranks,
                           description)


def zero_shot_classes(value: str) -> list[str]:
    """The class prompts of `--zero-shot-classes`: a name of ZERO_SHOT_CLASSES or a file of one prompt a line."""
    if value in ZERO_SHOT_CLASSES:
        return ZERO_SHOT_CLASSES[value]()
    if not Path(value).is_file():
        raise UsageError(f"--zero-shot-classes {value!r} is neither a class vocabulary ({', '.join(ZERO_SHOT_CLASSES)})"
                         " nor a file of class prompts")
    classes = read_prompt_file(value)
    if len(classes) < 2:
        raise UsageError(f"--zero-shot-classes {value}: a classifier needs at least 2 classes")
    return classes


def clip_rows(model: CLIP, paths: list[Path], prompts: list[str] | None, class_features: torch.Tensor | None,
              batch_size: int, ranks: Ranks, description: str) -> dict[str, np.ndarray]:
    """One pass of the CLIP image tower over the images: {"features": [N, E] embeddings, "similarity": [N]
    100 · cos with each image's prompt (given `prompts`), "zero_shot": [N, C] logits over the classes (given their
    embeddings `class_features` [C, E])}, float64."""
    def rows(batch: list[tuple[Path, str | None]]) -> dict[str, np.ndarray]:
        embeddings = image_embeddings(model, [read_image(path) for path, _ in batch])
        result = {"features": embeddings.double().numpy()}
        if prompts is not None:
            texts = text_embeddings(model, [prompt for _, prompt in batch])
            result["similarity"] = cosine_scores(embeddings, texts).double().numpy()
        if class_features is not None:
            result["zero_shot"] = zero_shot_logits(model, embeddings, class_features).double().numpy()
        return result
    return sharded_batches(rows, list(zip(paths, prompts or [None] * len(paths))), batch_size, ranks, description)


def neighbour_metrics(comparison: FeatureComparison, label: str, real_weights=None,
                      fake_weights=None) -> dict[str, float]:
    """The k-NN metrics of a comparison (optionally of a resample's weights), named `<metric>_<label>`: precision and
    recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)."""
    precision, recall = comparison.precision_recall(real_weights, fake_weights)
    density, coverage = comparison.density_coverage(real_weights, fake_weights)
    return {f"precision_{label}": precision, f"recall_{label}": recall, f"density_{label}": density,
            f"coverage_{label}": coverage}


def labelled_metrics(label: str, real: dict[str, np.ndarray], fake: dict[str, np.ndarray], k: int, resamples: int,
                     seed: int, confidence: float) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(metrics, bootstrap intervals) named `<metric>_<label>` from `clip_rows` of the real and the generated images:
    fd, kid (unbiased MMD² over all images), precision, recall, density, coverage, and from what `fake` holds
    clip_score and is_clip_zeroshot. The intervals resample the real and the generated images, with replacement,
    `resamples` times (none for 0)."""
    comparison = FeatureComparison(real["features"], fake["features"], k)

    def statistics(real_weights=None, fake_weights=None) -> dict[str, float]:
        values = {f"fd_{label}": comparison.frechet_distance(real_weights, fake_weights),
                  f"kid_{label}": comparison.kernel_distance(real_weights, fake_weights),
                  **neighbour_metrics(comparison, label, real_weights, fake_weights)}
        if "similarity" in fake:
            values[f"clip_score_{label}"] = max(float(np.average(fake["similarity"], weights=fake_weights)), 0.0)
        if "zero_shot" in fake:
            values[f"is_clip_zeroshot_{label}"] = classifier_score(fake["zero_shot"], fake_weights)
        return values

    intervals = bootstrap_intervals(statistics, (len(comparison.real), len(comparison.fake)), resamples, seed,
                                    confidence) if resamples else {}
    return statistics(), within_ranges(intervals, label)


def within_ranges(intervals: dict[str, tuple[float, float]], label: str) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of metrics named `<metric>_<label>`, each clipped to the values its metric can take: the
    re-centred intervals may cross a bound the metric cannot pass (a precision of 1.02); they stop at it."""
    return {name: tuple(np.clip(interval, *RANGES[name.removesuffix(f"_{label}")]).tolist())
            for name, interval in intervals.items()}


def feature_metrics(name: str, real: np.ndarray, fake: np.ndarray, k: int | None, resamples: int, seed: int,
                    confidence: float) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """(metrics, bootstrap intervals) of a `--features` function's rows, real [Nr, D] and generated [Nf, D]:
    fd_<name>, and with k (None: too few images for k-NN balls) precision, recall, density and coverage; the
    intervals resample both sets with replacement `resamples` times (none for 0), as for --feature-clip."""
    comparison = None if k is None else FeatureComparison(real, fake, k)

    def statistics(real_weights=None, fake_weights=None) -> dict[str, float]:
        values = {f"fd_{name}": frechet_distance(*feature_statistics(fake, fake_weights),
                                                 *feature_statistics(real, real_weights))}
        if comparison is not None:
            values.update(neighbour_metrics(comparison, name, real_weights, fake_weights))
        return values

    intervals = bootstrap_intervals(statistics, (len(real), len(fake)), resamples, seed, confidence) \
        if resamples else {}
    return statistics(), within_ranges(intervals, name)


class FeatureCLIP:
    """The `--feature-clip` network with its label and class-prompt embeddings, and the real images' rows, computed
    once however many folders are scored against them."""

    def __init__(self, args: argparse.Namespace, device: torch.device | None, real_paths: list[Path], ranks: Ranks):
        self.label, self.args, self.ranks = args.feature_label, args, ranks
        self.model = load_clip(args.feature_clip, device=device, activation=args.clip_activation,
                               vision_head_width=args.clip_vision_head_width,
                               text_head_width=args.clip_text_head_width)
        self.classes = zero_shot_classes(args.zero_shot_classes) if args.zero_shot_classes else None
        self.class_features = text_embeddings(self.model, self.classes) if self.classes else None
        self.settings = {"path": args.feature_clip, "sha256": file_sha256(args.feature_clip), "label": self.label,
                         "config": asdict(self.model.config), "precision_recall_k": args.pr_k,
                         "zero_shot_classes": self.classes,
                         "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "confidence": args.confidence,
                                       "resampled": "real and generated images, each with replacement"}}
        if not real_paths:
            raise ValueError(f"{args.real} holds no images")
        self.real = clip_rows(self.model, real_paths, None, None, args.batch_size, ranks, f"{self.label} (real)")

    def score(self, fake_paths: list[Path], prompts: list[str] | None):
        """(metrics, intervals) of a folder's images; the CLIP score only with `prompts` (one per image)."""
        fake = clip_rows(self.model, fake_paths, prompts, self.class_features, self.args.batch_size, self.ranks,
                         f"{self.label} (fake)")
        return labelled_metrics(self.label, self.real, fake, self.args.pr_k, self.args.bootstrap, self.args.seed,
                                self.args.confidence)


def evaluate(args: argparse.Namespace, ranks: Ranks) -> tuple[dict, list[str]]:
    """(result, report body fragments) for parsed arguments; raises UsageError, ValueError (CheckpointError),
    OSError or RuntimeError. Under torchrun (`ranks`) the network passes are shared out over the processes and
    every process gets the one-process numbers (see metrics.features.sharded_batches)."""
    requested = _check_request(args)
    device = torch.device(args.device) if args.device else None
    fake_dir, real_path = Path(args.fake), Path(args.real)
    fake_paths = list_images(fake_dir)
    if not fake_paths:
        raise ValueError(f"{fake_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    real_is_stats = real_path.suffix == ".npz"
    real_paths = [] if real_is_stats else list_images(real_path)
    if not real_is_stats and not real_paths and (set(requested) - {"is", "clip"} or args.fd_features
                                                 or args.features):
        raise ValueError(f"{real_path} holds no images")
    metrics: dict[str, float] = {}
    settings: dict = {"resize": args.resize}
    notes: list[str] = []

    if any(m in INCEPTION_METRICS for m in requested):
        digest = file_sha256(args.inception_weights)
        standard = is_standard_digest(digest)
        settings["inception_weights"] = {"path": args.inception_weights, "sha256": digest, "standard": standard}
        if not standard:
            notes.append(f"{args.inception_weights} is not {STANDARD_WEIGHTS_NAME}: Inception-based numbers are "
                         "labelled unofficial and are not comparable with published FID/KID/IS.")
        extractor = InceptionExtractor(load_inception(args.inception_weights), args.resize, device)
        fake = _features(extractor, fake_paths, args.batch_size, ranks, "inception (fake)")
        real = None
        if not real_is_stats and ({"fid", "kid"} & set(requested) or args.save_real_stats):
            real = _features(extractor, real_paths, args.batch_size, ranks, "inception (real)")
            if args.save_real_stats and ranks.rank == 0:
                save_statistics(args.save_real_stats, *feature_statistics(real["pool"]))
        if "fid" in requested:
            real_stats = load_statistics(real_path) if real_is_stats else feature_statistics(real["pool"])
            metrics["fid" if standard else "fd_inception_unofficial"] = frechet_distance(
                *feature_statistics(fake["pool"]), *real_stats)
        if "kid" in requested:
            mean, std = kid(real["pool"], fake["pool"], args.kid_subsets, args.kid_subset_size, args.seed)
            prefix = "kid" if standard else "kid_unofficial"
            metrics[f"{prefix}_mean"], metrics[f"{prefix}_std"] = mean, std
        if "is" in requested:
            mean, std = inception_score(fake["logits"], min(args.is_splits, len(fake_paths)))
            prefix = "is" if standard else "is_unofficial"
            metrics[f"{prefix}_mean"], metrics[f"{prefix}_std"] = mean, std

    paired = [m for m in requested if m in PAIRED_METRICS]
    if paired:
        metrics.update(_paired_scores(real_path, fake_paths, paired))

    per_image_clip = None
    if "clip" in requested or args.fd_features:
        clip_model = load_clip(args.clip_weights, device=device, activation=args.clip_activation,
                               vision_head_width=args.clip_vision_head_width,
                               text_head_width=args.clip_text_head_width)
        settings["clip_weights"] = {"path": args.clip_weights, "sha256": file_sha256(args.clip_weights),
                                    "config": asdict(clip_model.config)}
        if "clip" in requested:
            per_image_clip = _clip_scores(clip_model, fake_paths, _prompts(fake_paths), args.batch_size, ranks)
            metrics["clip_score"] = max(float(per_image_clip.mean()), 0.0)
        if "clip" in args.fd_features:
            extractor = CLIPImageExtractor(clip_model, device)
            fake_clip = _features(extractor, fake_paths, args.batch_size, ranks, "clip (fake)")
            real_clip = _features(extractor, real_paths, args.batch_size, ranks, "clip (real)")
            metrics["fd_clip"] = frechet_distance(*feature_statistics(fake_clip["clip"]),
                                                  *feature_statistics(real_clip["clip"]))

    intervals = {}
    for reference in args.features:
        name, function = load_feature_function(reference)
        extractor = _rows_extractor(function, reference)
        fake_rows = _features(extractor, fake_paths, args.batch_size, ranks, f"{name} (fake)")
        real_rows = _features(extractor, real_paths, args.batch_size, ranks, f"{name} (real)")
        with_neighbours = min(len(fake_paths), len(real_paths)) > args.pr_k
        if not with_neighbours:
            notes.append(f"precision_{name}, recall_{name}, density_{name} and coverage_{name} are left out: k-NN "
                         f"balls with k = {args.pr_k} need more than {args.pr_k} images per set")
        values, feature_intervals = feature_metrics(name, real_rows["features"], fake_rows["features"],
                                                    args.pr_k if with_neighbours else None, args.bootstrap,
                                                    args.seed, args.confidence)
        metrics[f"fd_{name}"] = values[f"fd_{name}"]  # listed first, then KID, then the k-NN metrics
        metrics[f"kid_{name}_mean"], metrics[f"kid_{name}_std"] = kid(
            real_rows["features"], fake_rows["features"], args.kid_subsets, args.kid_subset_size, args.seed)
        metrics.update(values)
        intervals.update(feature_intervals)
        settings.setdefault("features", []).append(reference)

    if args.feature_clip:
        feature_clip = FeatureCLIP(args, device, real_paths, ranks)
        settings["feature_clip"] = feature_clip.settings
        prompts = [read_prompt(p) for p in fake_paths]
        if None in prompts:
            notes.append(f"clip_score_{feature_clip.label} is left out: {prompts.count(None)} generated image(s) "
                         "have no prompt (PNG infotext or .txt caption)")
        labelled, clip_intervals = feature_clip.score(fake_paths, None if None in prompts else prompts)
        metrics.update(labelled)
        intervals.update(clip_intervals)

    result = {"metrics": metrics, "intervals": intervals,
              "counts": {"fake": len(fake_paths), "real": len(real_paths)}, "settings": settings, "notes": notes}
    return result, _report_body(result, fake_paths, real_paths, per_image_clip, args.thumbnails)


def model_prompts(args: argparse.Namespace) -> list[str]:
    """Prompt i of the --n images: the --prompts file's lines in turn, or the shapes world's held-out prompts."""
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise UsageError(f"--prompts: file not found: {args.prompts}")
        lines = read_prompt_file(args.prompts)
        return [lines[i % len(lines)] for i in range(args.n)]
    from shapes.judge import held_out_prompts
    return held_out_prompts(args.n, args.seed)


def generate_folder(model: compare.LabelledModel, prompts: list[str], args: argparse.Namespace, folder: Path,
                    device: torch.device) -> list[Path]:
    """Image i for prompt i with seed --seed + i, written with its infotext as folder/NNNNNN.png (one image per
    call: a batch of `sample.generate` holds one prompt, and every image here has its own)."""
    generate, GenerationParams = compare.generation_pipeline()
    loaded, embeddings = compare.load_generator(model.spec, device)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, prompt in enumerate(tqdm(prompts, desc=model.label, unit="img", leave=False)):
        params = GenerationParams(prompt=prompt, seed=args.seed + index, sampler_name=args.sampler, steps=args.steps,
                                  cfg_scale=args.cfg_scale)
        result = generate(loaded, params, progress=False, embeddings=embeddings)
        paths.append(folder / f"{index:06d}.png")
        save_png(result.images[0], str(paths[-1]), result.infotexts[0])
    return paths


def evaluate_models(args: argparse.Namespace, ranks: Ranks) -> tuple[dict, list[str]]:
    """Multi-model mode: (result, report body) of generating with each --model and scoring each folder (see the
    module's documentation)."""
    _check_request(args)
    if ranks.size > 1:
        raise UsageError("--model runs in one process; generate at scale with metrics.protocol under torchrun and "
                         "score the folders with --fake")
    models = compare.parse_models(args.model)
    missing = [path for m in models for path in m.spec.files() if not Path(path).is_file()]
    if missing:
        raise UsageError(f"file not found: {', '.join(missing)}")
    prompts = model_prompts(args)
    device = torch.device(args.device) if args.device else default_device()
    feature_clip = FeatureCLIP(args, device, list_images(args.real), ranks)
    outdir = Path(args.outdir)
    per_model, paths, notes = {}, {}, []
    for model in models:
        start = time.perf_counter()
        paths[model.label] = generate_folder(model, prompts, args, outdir / model.label, device)
        seconds = time.perf_counter() - start
        metrics, intervals = feature_clip.score(paths[model.label], prompts)
        images = [Image.open(path).convert("RGB") for path in paths[model.label]]
        adherence = {}
        for name in args.adherence or sorted(compare.ADHERENCE_SCORERS):
            adherence.update(compare.ADHERENCE_SCORERS[name](images, prompts) or {})
        per_model[model.label] = {"spec": model.text, "images": len(images), "generation_seconds": seconds,
                                  "metrics": metrics, "intervals": intervals, "adherence": adherence}
    reference = {label: m["adherence"][args.rank_by] for label, m in per_model.items()
                 if args.rank_by in m["adherence"]}
    if len(reference) < len(per_model):
        notes.append(f"no ranking check: the adherence score {args.rank_by!r} is missing for "
                     f"{', '.join(sorted(set(per_model) - set(reference)))} (prompts outside every scorer's domain?)")
        reference = {}
    agreement = ranking.rank_agreement({label: m["metrics"] for label, m in per_model.items()}, reference)
    result = {"models": per_model,
              "ranking": {"by": args.rank_by, "spearman": agreement,
                          "order": sorted(reference, key=reference.get, reverse=True)} if reference else None,
              "counts": {"generated_per_model": len(prompts), "real": len(feature_clip.real["features"])},
              "settings": {"real": args.real, "prompts": args.prompts or f"shapes held-out prompts, seed {args.seed}",
                           "seed": args.seed, "sampler": args.sampler, "steps": args.steps,
                           "cfg_scale": args.cfg_scale, "device": str(device), "feature_clip": feature_clip.settings},
              "notes": notes}
    return result, _models_report_body(result, paths, args.thumbnails)


def _with_interval(value: float, interval: tuple[float, float] | None) -> float | str:
    return f"{report.format_number(value)} [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else value


def _models_report_body(result: dict, paths: dict[str, list[Path]], thumbnails: int) -> list[str]:
    models = result["models"]
    labels = list(models)
    names = sorted({name for m in models.values() for name in m["metrics"]})
    adherence = sorted({name for m in models.values() for name, v in m["adherence"].items()
                        if isinstance(v, (int, float))})
    confidence = result["settings"]["feature_clip"]["bootstrap"]["confidence"]
    label = result["settings"]["feature_clip"]["label"]
    rows = [["model", *[models[label]["spec"] for label in labels]],
            ["images", *[models[label]["images"] for label in labels]],
            ["generation seconds", *[models[label]["generation_seconds"] for label in labels]],
            *[[ranking.display_name(name, label) + (" (lower is better)" if ranking.orientation(name) < 0 else ""),
               *[_with_interval(models[label]["metrics"][name], models[label]["intervals"].get(name))
                 for label in labels]] for name in names],
            *[[name, *[models[label]["adherence"].get(name, "") for label in labels]] for name in adherence]]
    body = [report.table(["", *labels], rows),
            f"<p>Brackets: {confidence:.0%} bootstrap intervals (percentiles re-centred on the estimate; "
            f"{result['settings']['feature_clip']['bootstrap']['resamples']} resamples of the real and the generated "
            "images).</p>"]
    if result["ranking"]:
        order = " &gt; ".join(report.escape(label) for label in result["ranking"]["order"])
        body.append(f"<h2>Ranking check against {report.escape(result['ranking']['by'])}</h2><p>Adherence order: "
                    f"{order}. Spearman's ρ between each metric (higher-is-better sign) and the adherence over the "
                    f"{len(labels)} models; +1: the same ranking.</p>")
        body.append(report.table(["metric", "Spearman ρ"], [
            [ranking.display_name(name, label), "undefined (ties)" if rho is None else rho]
            for name, rho in result["ranking"]["spearman"].items()]))
    body += [f'<p class="note">{report.escape(note)}</p>' for note in result["notes"]]
    body.append("<h2>Settings</h2><pre>" + report.escape(json.dumps(
        {"counts": result["counts"], **result["settings"]}, indent=2)) + "</pre>")
    for label in labels:
        if thumbnails:
            body.append(f"<h2>{report.escape(label)} (first {min(thumbnails, len(paths[label]))})</h2>" + "".join(
                report.figure(read_image(p), read_prompt(p) or p.name, 192) for p in paths[label][:thumbnails]))
    return body


def load_feature_function(reference: str):
    """`MODULE:FUNCTION` -> (FUNCTION's name, the function), imported; UsageError saying what is wrong."""
    module_name, separator, function_name = reference.partition(":")
    if not separator or not module_name or not function_name.isidentifier():
        raise UsageError(f"--features takes MODULE:FUNCTION (e.g. mypackage.features:embed); got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--features {reference}: cannot import {module_name} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--features {reference}: {module_name} has no function {function_name}")
    return function_name, function


def _rows_extractor(function, reference: str):
    """An extractor (metrics.features) around a user function images -> [N, D] features."""
    @torch.no_grad()
    def extractor(images: list[torch.Tensor]) -> dict[str, np.ndarray]:
        rows = function(images)
        rows = rows.detach().double().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, float)
        if rows.ndim != 2 or rows.shape[0] != len(images):
            raise ValueError(f"--features {reference} returned features of shape {rows.shape} for {len(images)} "
                             "images; it must return one row per image, [N, D]")
        return {"features": rows}
    return extractor


def _report_body(result: dict, fake_paths: list[Path], real_paths: list[Path], per_image_clip: np.ndarray | None,
                 thumbnails: int) -> list[str]:
    label = result["settings"].get("feature_clip", {}).get("label", "")
    body = [report.table(["metric", "value"], [[ranking.display_name(name, label), _with_interval(
        value, result["intervals"].get(name))] for name, value in result["metrics"].items()])]
    body += [f'<p class="note">{report.escape(note)}</p>' for note in result["notes"]]
    body.append("<h2>Settings</h2><pre>" + report.escape(json.dumps(
        {"counts": result["counts"], **result["settings"]}, indent=2)) + "</pre>")
    for title, paths in (("Generated", fake_paths), ("Real", real_paths)):
        if paths and thumbnails:
            captions = [p.name for p in paths[:thumbnails]]
            if title == "Generated" and per_image_clip is not None:
                captions = [f"{c}  CLIP {s:.2f}" for c, s in zip(captions, per_image_clip)]
            body.append(f"<h2>{title} (first {min(thumbnails, len(paths))})</h2>" + "".join(
                report.figure(read_image(p), c, 192) for p, c in zip(paths, captions)))
    return body


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ranks = Ranks(torch.device(args.device) if args.device else default_device())
    try:
        result, body = (evaluate_models if args.model else evaluate)(args, ranks)
    except UsageError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    except (ValueError, OSError, RuntimeError) as error:  # unreadable files, a device that is not there
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    finally:
        ranks.close()
    if ranks.rank != 0:  # under torchrun rank 0 alone reports
        return 0
    if args.model:
        report.write_page(Path(args.outdir) / "index.html", "Evaluation of " + ", ".join(result["models"]), body)
        result["report"] = str(Path(args.outdir) / "index.html")
    elif args.report:
        report.write_page(args.report, f"Evaluation of {args.fake}", body)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
