"""Full-reference image similarity: SSIM, MS-SSIM and PSNR between paired images.

Every function takes two torch tensors `a, b: [N, C, H, W]` with values in [0, 1] (data range L = 1), compares image i
of `a` with image i of `b`, and returns the mean over the batch as a Python float. Arithmetic is float64 on the
tensors' device.

- SSIM follows Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality Assessment: From Error Visibility to Structural
  Similarity", §III-C: local statistics under an 11x11 circular-symmetric Gaussian window with σ = 1.5, constants
  C1 = (K1 L)², C2 = (K2 L)² with K1 = 0.01, K2 = 0.03, and population (not sample) variances. The SSIM map is taken
  over the "valid" region only (windows that lie fully inside the image) and averaged over pixels and channels: the
  same number as scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=0)`.
- MS-SSIM follows Wang, Simoncelli & Bovik 2003, "Multi-scale Structural Similarity for Image Quality Assessment",
  eq. 7: contrast-structure terms at five scales (2x2 average pooling between scales) and the luminance term at the
  coarsest, with the exponents of §3.2. Negative terms are clipped to 0 before the fractional powers (as TensorFlow's
  `ssim_multiscale` and torchmetrics' default `normalize="relu"` do), and each channel is scored on its own and the
  channel scores averaged, as for SSIM. Images need a side of at least 176 pixels (the 11-pixel window must fit at the
  fifth scale, 1/16 of the size).
- PSNR is 10·log10(L² / MSE) per image; identical images give +inf.
"""
import torch
import torch.nn.functional as F

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03
# Wang et al. 2003, §3.2: the exponents β_j = γ_j (and α_M) fitted to their subjective scale experiment, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(a: torch.Tensor, b: torch.Tensor, min_side: int, metric: str, small_images_hint: str = "") -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"{metric}: expected two non-empty image batches of one shape [N, C, H, W]; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if min(a.shape[-2:]) < min_side:
        raise ValueError(f"{metric} needs a side of at least {min_side} pixels; these images are "
                         f"{a.shape[-1]}x{a.shape[-2]}{small_images_hint}")
    for name, x in (("a", a), ("b", b)):
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{metric}: {name} has values in [{x.min().item():.3g}, {x.max().item():.3g}]; image metrics take "
                             "[0, 1] (map [-1, 1] model output with (x + 1) / 2 and clamp)")


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA, dtype=torch.float64, device=None):
    """The 1-D Gaussian [size] normalised to sum 1; the 2-D window is its outer product (the Gaussian separates)."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _local_mean(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean over each valid window position, per channel; x: [N, C, H, W] -> [N, C, H-10, W-10]."""
    channels = x.shape[1]
    rows = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)


def _ssim_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means of the luminance·contrast·structure map and of the contrast·structure map.

    a, b: [N, C, H, W] float64 -> (ssim [N, C], cs [N, C]). Wang et al. 2004 eq. 13 with α = β = γ = 1, C3 = C2 / 2:
    SSIM = l · cs, l = (2 μa μb + C1) / (μa² + μb² + C1), cs = (2 σab + C2) / (σa² + σb² + C2).
    """
    window = gaussian_window(device=a.device)
    c1, c2 = K1 ** 2, K2 ** 2
    mu_a, mu_b = _local_mean(a, window), _local_mean(b, window)
    var_a = _local_mean(a * a, window) - mu_a ** 2
    var_b = _local_mean(b * b, window) - mu_b ** 2
    cov = _local_mean(a * b, window) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).mean(dim=(-2, -1)), contrast_structure.mean(dim=(-2, -1))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean structural similarity of paired images a, b: [N, C, H, W] in [0, 1] (1 = identical)."""
    _check_pair(a, b, WINDOW_SIZE, "SSIM")
    per_channel, _ = _ssim_terms(a.double(), b.double())
    return per_channel.mean().item()


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean multi-scale structural similarity of paired images a, b: [N, C, H, W] in [0, 1], sides >= 176."""
    scales = len(MS_SSIM_WEIGHTS)
    _check_pair(a, b, WINDOW_SIZE * 2 ** (scales - 1), "MS-SSIM", "; use SSIM for small images")
    a, b = a.double(), b.double()
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64, device=a.device)
    terms = []  # per scale: [N, C]
    for scale in range(scales):
        full, contrast_structure = _ssim_terms(a, b)
        terms.append(full if scale == scales - 1 else contrast_structure)
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(terms).clamp(min=0)  # [scales, N, C]
    score = (stacked ** weights.view(-1, 1, 1)).prod(dim=0)  # [N, C]
    return score.mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean peak signal-to-noise ratio in dB of paired images a, b: [N, C, H, W] in [0, 1]; +inf if all identical."""
    _check_pair(a, b, 1, "PSNR")
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))  # [N]
    per_image = 10 * torch.log10(1 / mse)  # an exact match gives 1/0 = inf, the honest value
    return per_image.mean().item()
