"""Evaluation of generated images: metric functions, their feature networks, and the commands built on them.

    from metrics import ssim, frechet_distance, inception_score, kid, clip_score
    python -m metrics.evaluate --real DIR --fake DIR --metrics fid,kid,is --inception-weights pt_inception-...pth
    python -m metrics.evaluate --real DIR --model base=default --model bad=untrained --feature-clip CLIP_FILE
    python -m metrics.compare --prompts prompts.txt --model base.safetensors --model tuned.safetensors
    python -m metrics.human serve --db votes.sqlite --model base=DIR --model tuned=DIR

Modules: `similarity` (SSIM, MS-SSIM, PSNR), `distribution` (FID, KID, IS, precision/recall from features, bootstrap
intervals; .npz statistics), `ranking` (Spearman's ρ of metrics against a judge over models),
`inception` (the FID Inception-v3), `resize` (the 299x299 input conventions), `clip` (CLIP score and embeddings over ldm.clip_model's CLIP),
`features` (folders and batched extraction), `report` (HTML), `human` (pairwise preference study).
"""
from ldm.clip_model import CLIP, CLIPConfig, load_clip

from .clip import clip_score, clip_similarities, zero_shot_logits
from .distribution import FeatureComparison, bootstrap_intervals, classifier_score, density_coverage, \
    feature_statistics, frechet_distance, inception_score, kid, load_statistics, precision_recall, save_statistics
from .inception import FIDInceptionV3, STANDARD_WEIGHTS_NAME, is_standard_weights, load_inception
from .resize import CONVENTIONS, inception_input
from .similarity import ms_ssim, psnr, ssim

__all__ = ["CLIP", "CLIPConfig", "clip_score", "clip_similarities", "load_clip", "zero_shot_logits",
           "FeatureComparison", "bootstrap_intervals", "classifier_score", "precision_recall", "density_coverage",
           "feature_statistics",
           "frechet_distance", "inception_score", "kid", "load_statistics", "save_statistics", "FIDInceptionV3",
           "STANDARD_WEIGHTS_NAME", "is_standard_weights", "load_inception", "CONVENTIONS", "inception_input",
           "ms_ssim", "psnr", "ssim"]
