"""python -m metrics.evaluate --real DIR --fake DIR [--metrics fid,kid,is,ssim,ms_ssim,psnr,clip]

Scores a folder of generated images against a folder of real ones, prints the numbers as JSON on stdout and writes an
HTML report. Progress goes to stderr.

    fid, kid, is    FID / KID / Inception Score from the FID Inception-v3 (`--inception-weights`, see below)
    ssim, ms_ssim,  paired similarity: each fake image against the real image of the same file name (same size)
    psnr
    clip            CLIP score of each fake image against its prompt (PNG infotext or .txt caption), needs
                    `--clip-weights`
    --fd-features clip   adds `fd_clip`, the Fréchet distance in CLIP image-embedding space (Kynkäänniemi et al.
                    2023, "The Role of ImageNet Classes in Fréchet Inception Distance")
    --features MODULE:FUNCTION   any feature extractor, for when standard Inception weights are not at hand: FUNCTION
                    takes a batch of images (a list of [3, H, W] float tensors in [0, 1], sizes may differ) and returns
                    their features, [N, D] (numpy array or tensor); reported as `fd_<FUNCTION>` and
                    `kid_<FUNCTION>_mean/_std` (repeatable; MODULE is imported, so it may be a file on PYTHONPATH)

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
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sample.cli import ArgumentParser
from sample.imagefiles import IMAGE_EXTENSIONS, list_images, read_prompt
from sample.sharded import Ranks

from . import report
from .clip import CLIP, clip_similarities, load_clip
from .distribution import feature_statistics, frechet_distance, inception_score, kid, load_statistics, \
    save_statistics
from .features import CLIPImageExtractor, InceptionExtractor, default_device, read_image, sharded_batches
from .inception import STANDARD_WEIGHTS_NAME, file_sha256, is_standard_digest, load_inception
from .resize import CONVENTIONS
from .similarity import ms_ssim, psnr, ssim

METRICS = ("fid", "kid", "is", "ssim", "ms_ssim", "psnr", "clip")
INCEPTION_METRICS = ("fid", "kid", "is")
PAIRED_METRICS = {"ssim": ssim, "ms_ssim": ms_ssim, "psnr": psnr}
PROG = "python -m metrics.evaluate"


class UsageError(ValueError):
    """A request that cannot be served as given (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Score generated images against real ones: FID, KID, "
                                     "IS, SSIM, MS-SSIM, PSNR, CLIP score. Prints JSON; writes an HTML report.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--real", required=True, metavar="DIR|NPZ", help="folder of real images, or .npz statistics")
    parser.add_argument("--fake", required=True, metavar="DIR", help="folder of generated images")
    parser.add_argument("--metrics", default="fid,kid,is", help=f"comma-separated, from {','.join(METRICS)}")
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
    parser.add_argument("--fd-features", choices=("clip",), action="append", default=[],
                        help="also report the Fréchet distance in this network's features (fd_<name>)")
    parser.add_argument("--features", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="also report the Fréchet distance and KID in the features of this function "
                        "(images [3, H, W] in [0, 1] -> [N, D])")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset")
    parser.add_argument("--is-splits", type=int, default=10, help="Inception Score: number of splits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    parser.add_argument("--batch-size", type=int, default=32, help="images per network batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--save-real-stats", metavar="NPZ", help="also write the real images' Inception statistics")
    parser.add_argument("--report", default="evaluation.html", help="HTML report to write ('' for none)")
    parser.add_argument("--thumbnails", type=int, default=8, help="images of each set shown in the report")
    return parser


def _check_request(args: argparse.Namespace) -> list[str]:
    requested = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in requested if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not requested and not args.fd_features and not args.features:
        raise UsageError("nothing to compute: --metrics is empty and no --fd-features or --features given")
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
                               vision_head_width=args.clip_vision_head_width)
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

    for reference in args.features:
        name, function = load_feature_function(reference)
        extractor = _rows_extractor(function, reference)
        fake_rows = _features(extractor, fake_paths, args.batch_size, ranks, f"{name} (fake)")
        real_rows = _features(extractor, real_paths, args.batch_size, ranks, f"{name} (real)")
        metrics[f"fd_{name}"] = frechet_distance(*feature_statistics(fake_rows["features"]),
                                                 *feature_statistics(real_rows["features"]))
        metrics[f"kid_{name}_mean"], metrics[f"kid_{name}_std"] = kid(
            real_rows["features"], fake_rows["features"], args.kid_subsets, args.kid_subset_size, args.seed)
        settings.setdefault("features", []).append(reference)

    result = {"metrics": metrics, "counts": {"fake": len(fake_paths), "real": len(real_paths)},
              "settings": settings, "notes": notes}
    return result, _report_body(result, fake_paths, real_paths, per_image_clip, args.thumbnails)


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
    body = [report.table(["metric", "value"], [[name, value] for name, value in result["metrics"].items()])]
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
        result, body = evaluate(args, ranks)
    except UsageError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    except (ValueError, OSError, RuntimeError) as error:  # unreadable files, a device that is not there
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    finally:
        ranks.close()
    if ranks.rank != 0:  # under torchrun rank 0 alone reports
        return 0
    if args.report:
        report.write_page(args.report, f"Evaluation of {args.fake}", body)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
