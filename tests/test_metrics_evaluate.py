"""`python -m metrics.evaluate`: what it refuses, how it labels numbers, and that its numbers are the metric functions'
on the folders' images."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import metrics.evaluate as evaluate
import metrics.inception as inception
from metrics.clip import clip_similarities
from metrics.distribution import density_coverage, feature_statistics, frechet_distance, inception_score, kid, \
    precision_recall
from metrics.features import CLIPImageExtractor, InceptionExtractor, extract, read_image
from metrics.resize import inception_input
from metrics.similarity import ms_ssim, psnr, ssim
from random_weights import random_clip_file

SIZE = 176  # the smallest side MS-SSIM accepts


def write_png(path, pixels: np.ndarray, prompt: str | None = None) -> None:
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("parameters", f"{prompt}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1, "
                                    f"Size: {SIZE}x{SIZE}")
    Image.fromarray(pixels).save(path, pnginfo=info)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """real/ and fake/ with three same-named image pairs; fake images carry their prompt (infotext or .txt)."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    (root / "real").mkdir()
    (root / "fake").mkdir()
    prompts = ["a red circle", "a blue square above a green star", "two yellow triangles"]
    for i, prompt in enumerate(prompts):
        real = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        fake = np.clip(real.astype(int) + rng.integers(-40, 40, real.shape), 0, 255).astype(np.uint8)
        write_png(root / "real" / f"{i:03d}.png", real)
        if i == 2:  # a caption file instead of infotext, as in img2dataset shards
            write_png(root / "fake" / f"{i:03d}.png", fake)
            (root / "fake" / f"{i:03d}.txt").write_text(prompt + "\n")
        else:
            write_png(root / "fake" / f"{i:03d}.png", fake, prompt)
    return root, prompts


class PixelFeatures(torch.nn.Module):
    """Stand-in for the Inception in command tests: 4x4-pooled pixels as 'pool features', a fixed map as logits."""

    def __init__(self):
        super().__init__()
        self.classifier = torch.randn(48, 10, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        features = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # [B, 48]
        return features, features @ self.classifier * 5


@pytest.fixture
def stand_in_inception(monkeypatch, tmp_path):
    weights = tmp_path / "not-the-standard.pth"
    weights.write_bytes(b"some weights")
    monkeypatch.setattr(evaluate, "load_inception", lambda path: PixelFeatures())
    return weights


def run(argv, capsys) -> dict:
    assert evaluate.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def folder_features(folder, convention="clean") -> tuple[np.ndarray, np.ndarray]:
    images = [read_image(p) for p in sorted(folder.glob("*.png"))]
    features, logits = PixelFeatures()(inception_input(images, convention))
    return features.double().numpy(), logits.double().numpy()


def test_fid_is_refused_without_the_standard_weights_file(folders):
    root, _ = folders
    result = subprocess.run([sys.executable, "-m", "metrics.evaluate", "--real", str(root / "real"), "--fake",
                             str(root / "fake"), "--metrics", "fid,ssim", "--report", ""],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr and "--inception-weights" in result.stderr


def test_other_inception_weights_give_numbers_that_do_not_claim_to_be_fid(folders, stand_in_inception, capsys,
                                                                          tmp_path):
    root, _ = folders
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "fid,kid,is",
                  "--inception-weights", str(stand_in_inception), "--is-splits", "1", "--kid-subsets", "4",
                  "--report", str(tmp_path / "report.html")], capsys)
    assert set(result["metrics"]) == {"fd_inception_unofficial", "kid_unofficial_mean", "kid_unofficial_std",
                                      "is_unofficial_mean", "is_unofficial_std"}
    assert result["settings"]["inception_weights"]["standard"] is False and "not comparable" in result["notes"][0]
    real, _ = folder_features(root / "real")
    fake, fake_logits = folder_features(root / "fake")
    assert result["metrics"]["fd_inception_unofficial"] == pytest.approx(
        frechet_distance(*feature_statistics(fake), *feature_statistics(real)), rel=1e-9)
    assert result["metrics"]["kid_unofficial_mean"] == pytest.approx(kid(real, fake, 4, 1000)[0], rel=1e-9)
    assert result["metrics"]["is_unofficial_mean"] == pytest.approx(inception_score(fake_logits, 1)[0], rel=1e-9)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # three generated and three real thumbnails
    text = re.sub(r"data:image/png;base64,[^\"]+", "", page)
    assert "<td>fd_inception_unofficial</td>" in text and "FID" not in text.replace("FID/KID/IS", "")


def test_the_standard_weights_file_gives_fid_kid_and_is(folders, stand_in_inception, capsys, monkeypatch):
    root, _ = folders
    monkeypatch.setattr(inception, "STANDARD_SHA256_PREFIX", inception.file_sha256(stand_in_inception)[:8])
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "fid,kid,is",
                  "--inception-weights", str(stand_in_inception), "--resize", "pytorch-fid", "--is-splits", "3",
                  "--report", ""], capsys)
    assert set(result["metrics"]) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"} and not result["notes"]
    real, _ = folder_features(root / "real", "pytorch-fid")
    fake, _ = folder_features(root / "fake", "pytorch-fid")
    assert result["metrics"]["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(fake), *feature_statistics(real)), rel=1e-9)
    assert result["settings"]["resize"] == "pytorch-fid"


def test_real_statistics_saved_as_npz_serve_later_fid_runs(folders, stand_in_inception, capsys, tmp_path):
    root, _ = folders
    stats = tmp_path / "real.npz"
    first = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "fid", "--inception-weights",
                 str(stand_in_inception), "--save-real-stats", str(stats), "--report", ""], capsys)
    second = run(["--real", str(stats), "--fake", str(root / "fake"), "--metrics", "fid", "--inception-weights",
                  str(stand_in_inception), "--report", ""], capsys)
    assert second["metrics"] == pytest.approx(first["metrics"], rel=1e-12)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--real", str(stats), "--fake", str(root / "fake"), "--metrics", "kid",
                       "--inception-weights", str(stand_in_inception)])
    assert exit_info.value.code == 2 and "need a folder of real images" in capsys.readouterr().err


def test_paired_metrics_compare_images_of_the_same_name(folders, capsys, tmp_path):
    root, _ = folders
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "ssim,ms_ssim,psnr",
                  "--report", ""], capsys)
    pairs = [(read_image(root / "real" / f"{i:03d}.png")[None], read_image(root / "fake" / f"{i:03d}.png")[None])
             for i in range(3)]
    for name, metric in (("ssim", ssim), ("ms_ssim", ms_ssim), ("psnr", psnr)):
        assert result["metrics"][name] == pytest.approx(np.mean([metric(r, f) for r, f in pairs]), rel=1e-12)
    (tmp_path / "fake").mkdir()
    Image.open(root / "fake" / "000.png").save(tmp_path / "fake" / "other-name.png")
    assert evaluate.main(["--real", str(root / "real"), "--fake", str(tmp_path / "fake"), "--metrics", "ssim",
                          "--report", ""]) == 1
    assert "other-name.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    return path, random_clip_file(path)


def test_clip_score_uses_each_images_prompt_and_fd_clip_its_embeddings(folders, clip_weights, capsys):
    root, prompts = folders
    path, model = clip_weights
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "clip", "--fd-features",
                  "clip", "--clip-weights", str(path), "--report", ""], capsys)
    fake_images = [read_image(root / "fake" / f"{i:03d}.png") for i in range(3)]
    real_images = [read_image(root / "real" / f"{i:03d}.png") for i in range(3)]
    expected = clip_similarities(model, fake_images, prompts).mean().item()
    assert result["metrics"]["clip_score"] == pytest.approx(max(expected, 0.0), abs=1e-5)
    extractor = CLIPImageExtractor(model, "cpu")
    assert result["metrics"]["fd_clip"] == pytest.approx(frechet_distance(
        *feature_statistics(extractor(fake_images)["clip"]), *feature_statistics(extractor(real_images)["clip"])),
        rel=1e-6)


def test_clip_score_needs_weights_and_a_prompt_for_every_image(folders, clip_weights, capsys, tmp_path):
    root, _ = folders
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "clip"])
    assert exit_info.value.code == 2 and "--clip-weights" in capsys.readouterr().err
    (tmp_path / "fake").mkdir()
    Image.open(root / "real" / "000.png").save(tmp_path / "fake" / "no-prompt.png")
    assert evaluate.main(["--real", str(root / "real"), "--fake", str(tmp_path / "fake"), "--metrics", "clip",
                          "--clip-weights", str(clip_weights[0]), "--report", ""]) == 1
    assert "no-prompt.png" in capsys.readouterr().err


def test_unknown_metric_is_a_usage_error(folders, capsys):
    root, _ = folders
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "fid,lpips"])
    assert exit_info.value.code == 2 and "unknown metric(s) lpips" in capsys.readouterr().err


def test_streaming_extraction_over_generated_batches_equals_one_pass():
    """Feature extraction accepts any iterable of batches (a folder reader, or a generator producing images), in
    batches of any sizes, and gives the rows of a single pass in order."""
    images = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    extractor = InceptionExtractor(PixelFeatures(), "clean", "cpu")
    streamed = extract(extractor, (images[i:i + 2] for i in range(0, 5, 2)), total=5)
    at_once = extractor(list(images))
    np.testing.assert_array_equal(streamed["pool"], at_once["pool"])
    np.testing.assert_array_equal(streamed["logits"], at_once["logits"])
    with pytest.raises(ValueError, match="no images"):
        extract(extractor, iter([]))


FEATURE_MODULE = '''
import torch


def mean_colours(images):
    """[N, 6]: each image's per-channel mean and standard deviation."""
    return torch.stack([torch.cat([image.mean(dim=(1, 2)), image.std(dim=(1, 2))]) for image in images])
'''


def test_features_option_runs_any_feature_function_for_fd_kid_and_precision_recall(folders, capsys, tmp_path, monkeypatch):
    root, _ = folders
    (tmp_path / "my_features.py").write_text(FEATURE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "", "--features",
                  "my_features:mean_colours", "--kid-subset-size", "3", "--kid-subsets", "4", "--report", ""], capsys)

    def rows(folder):
        images = [read_image(p) for p in sorted(folder.glob("*.png"))]
        return torch.stack([torch.cat([i.mean(dim=(1, 2)), i.std(dim=(1, 2))]) for i in images]).double().numpy()

    fake, real = rows(root / "fake"), rows(root / "real")
    assert result["metrics"]["fd_mean_colours"] == pytest.approx(
        frechet_distance(*feature_statistics(fake), *feature_statistics(real)), rel=1e-9)
    mean, std = kid(real, fake, 4, 3, 0)
    assert (result["metrics"]["kid_mean_colours_mean"], result["metrics"]["kid_mean_colours_std"]) == \
        pytest.approx((mean, std), rel=1e-9)
    assert result["settings"]["features"] == ["my_features:mean_colours"]
    # Precision/recall need more than k images per set: 3 images with k = 3 are left out, with a note; k = 2 works.
    assert "precision_mean_colours" not in result["metrics"] and "more than 3 images" in result["notes"][0]
    result = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "", "--features",
                  "my_features:mean_colours", "--pr-k", "2", "--report", ""], capsys)
    assert (result["metrics"]["precision_mean_colours"], result["metrics"]["recall_mean_colours"]) == \
        precision_recall(real, fake, k=2)
    assert (result["metrics"]["density_mean_colours"], result["metrics"]["coverage_mean_colours"]) == \
        density_coverage(real, fake, k=2)
    # Bootstrap intervals as for --feature-clip: the same resamples give the same intervals, each holds its estimate
    # and stays within what its metric can take; KID keeps its subset mean ± std instead.
    names = ["fd", "precision", "recall", "density", "coverage"]
    intervals = result["intervals"]
    assert sorted(intervals) == sorted(f"{name}_mean_colours" for name in names)
    for metric, (low, high) in intervals.items():
        assert low <= result["metrics"][metric] <= high
    assert 0 <= intervals["precision_mean_colours"][0] and intervals["coverage_mean_colours"][1] <= 1
    again = run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "", "--features",
                 "my_features:mean_colours", "--pr-k", "2", "--report", ""], capsys)
    assert again["intervals"] == intervals
    assert run(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "", "--features",
                "my_features:mean_colours", "--bootstrap", "0", "--report", ""], capsys)["intervals"] == {}


@pytest.mark.parametrize("reference, message", [("my_features", "takes MODULE:FUNCTION"),
                                                ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
                                                ("my_features:missing", "has no function missing")])
def test_features_option_names_what_is_wrong(folders, capsys, tmp_path, monkeypatch, reference, message):
    root, _ = folders
    (tmp_path / "my_features.py").write_text(FEATURE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--real", str(root / "real"), "--fake", str(root / "fake"), "--metrics", "", "--features",
                       reference, "--report", ""])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1


def test_ms_ssim_on_small_images_names_the_metric_and_the_alternative(capsys, tmp_path):
    for folder in ("real", "fake"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "0.png", np.zeros((64, 64, 3), np.uint8))
    assert evaluate.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--metrics", "ms_ssim",
                          "--report", ""]) == 1
    assert "MS-SSIM needs a side of at least 176 pixels; these images are 64x64; use SSIM" in capsys.readouterr().err
