"""SSIM, MS-SSIM and PSNR against scikit-image and torchmetrics, on random and on natural-looking images."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from metrics.similarity import ms_ssim, psnr, ssim
from metrics_oracles import torchmetrics


def natural_looking(seed: int, size: int = 64, channels: int = 3) -> torch.Tensor:
    """[1, C, size, size] in [0, 1] with structure at several scales (smooth gradients, blobs, edges, fine noise),
    so that the local statistics SSIM looks at vary across the image as in a photograph."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.zeros(channels, size, size)
    for c in range(channels):
        cx, cy, r = torch.rand(3, generator=g)
        image[c] = 0.4 * x * (c + 1) / channels + 0.3 * ((x - cx) ** 2 + (y - cy) ** 2 < (0.1 + 0.3 * r) ** 2)
        image[c] += 0.2 * (torch.sin(12 * x + 7 * c) * torch.cos(9 * y) > 0)
    image += 0.05 * torch.randn(channels, size, size, generator=g)
    return image.clamp(0, 1)[None]


def degraded(image: torch.Tensor, seed: int) -> torch.Tensor:
    """Blur + noise + a brightness shift: the kind of difference SSIM is meant to grade."""
    g = torch.Generator().manual_seed(seed)
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    return (0.9 * blurred + 0.05 + 0.03 * torch.randn(image.shape, generator=g)).clamp(0, 1)


def skimage_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    # The settings under which scikit-image reproduces Wang et al. 2004 (its documentation says so).
    scores = [structural_similarity(x.numpy().astype(np.float64), y.numpy().astype(np.float64),
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                    channel_axis=0) for x, y in zip(a, b)]
    return float(np.mean(scores))


@pytest.mark.parametrize("kind", ["random", "natural"])
def test_ssim_matches_scikit_image(kind):
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        a = torch.rand(3, 3, 40, 48, generator=g)
        b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    else:
        a = torch.cat([natural_looking(1), natural_looking(2)])
        b = torch.cat([degraded(a[:1], 3), degraded(a[1:], 4)])
    assert ssim(a, b) == pytest.approx(skimage_ssim(a, b), abs=1e-9)


def test_ssim_of_identical_images_is_one_and_drops_with_damage():
    image = natural_looking(5)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    mild, strong = degraded(image, 0), degraded(degraded(degraded(image, 1), 2), 3)
    assert 1 > ssim(image, mild) > ssim(image, strong)


def test_ssim_of_single_channel_images_matches_scikit_image():
    a, b = natural_looking(7, channels=1), degraded(natural_looking(7, channels=1), 8)
    expected = structural_similarity(a[0, 0].double().numpy(), b[0, 0].double().numpy(), gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-9)


def test_ms_ssim_matches_its_definition_built_from_reference_terms():
    """Wang et al. 2003 eq. 7 assembled from reference parts: the contrast-structure means of scales 1-4 from
    torchmetrics' SSIM kernel (cropped to valid windows), the full SSIM of scale 5 from scikit-image, 2x2 average
    pooling between scales, negative terms clipped to 0, each channel scored alone. (torchmetrics' own MS-SSIM
    differs from the original in two ways: it pools the channels before the powers and averages its last-scale SSIM
    over reflect-padded border windows too.)"""
    ssim_module = torchmetrics().functional.image.ssim
    a = torch.cat([natural_looking(10, 176), natural_looking(11, 176)])
    b = torch.cat([degraded(a[:1], 12), degraded(a[1:], 13)])
    expected = []
    for i in range(2):
        for c in range(3):
            x, y = a[i:i + 1, c:c + 1].double(), b[i:i + 1, c:c + 1].double()
            score = 1.0
            for scale, weight in enumerate((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
                if scale < 4:
                    _, term = ssim_module._ssim_update(x, y, data_range=1.0, return_contrast_sensitivity=True)
                    term = term.item()
                else:
                    term = skimage_ssim(x, y)
                score *= max(term, 0.0) ** weight
                x, y = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2)
            expected.append(score)
    assert ms_ssim(a, b) == pytest.approx(np.mean(expected), abs=1e-9)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_scikit_image_and_is_infinite_for_identical_images():
    g = torch.Generator().manual_seed(20)
    a = torch.rand(4, 3, 16, 24, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    expected = np.mean([peak_signal_noise_ratio(x.double().numpy(), y.double().numpy(), data_range=1.0)
                        for x, y in zip(a, b)])
    assert psnr(a, b) == pytest.approx(expected, abs=1e-9)
    assert psnr(a, a) == math.inf


@pytest.mark.parametrize("metric", [ssim, ms_ssim, psnr])
def test_similarity_metrics_reject_mismatched_or_out_of_range_images(metric):
    image = torch.rand(1, 3, 192, 192)
    with pytest.raises(ValueError, match="one shape"):
        metric(image, image[:, :, :-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(image * 2 - 1, image)


def test_ssim_and_ms_ssim_name_the_minimum_image_size():
    with pytest.raises(ValueError, match="^SSIM needs a side of at least 11 pixels"):
        ssim(torch.rand(1, 3, 10, 64), torch.rand(1, 3, 10, 64))
    with pytest.raises(ValueError, match="^MS-SSIM needs a side of at least 176 pixels; these images are 64x64; use "
                                         "SSIM for small images$"):
        ms_ssim(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
