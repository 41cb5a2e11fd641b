"""Distances between sets of generated and real images, computed from network features: FID, KID, IS, precision and
recall, with bootstrap confidence intervals.

All arithmetic here is numpy float64 on the CPU: the feature sets are small (N x 2048) next to the network that made
them, and the matrix square root of FID loses digits in float32.

- Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", eq. 6) between the Gaussians N(μ1, Σ1), N(μ2, Σ2) fitted to two feature sets:
  d² = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½). Fitted to Inception pool features it is the FID.
- Kernel distance (Bińkowski et al. 2018, "Demystifying MMD GANs", §4 "KID"): the unbiased estimate of the squared
  maximum mean discrepancy under the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets.
- Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", §4):
  exp(E_x KL(p(y|x) ‖ p(y))) over classifier logits, reported as mean and standard deviation over splits
  (`inception_score`), or over the whole set (`classifier_score`, e.g. with a CLIP's zero-shot class logits).
- Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models", §2): each set's manifold is the union of balls around its points, each of radius the distance to the
  point's k-th nearest neighbour in the set; precision is the share of generated points inside the real manifold
  (fidelity), recall the share of real points inside the generated one (coverage).
- Bootstrap intervals (Efron & Tibshirani 1993, ch. 13, percentile intervals, re-centred on the estimate): every
  statistic here also takes frequency weights, how often each image occurs in a resample drawn with replacement, so
  a resample costs a reweighting of quantities computed once (`FeatureComparison`, `bootstrap_intervals`).
"""
import os
import warnings
from collections.abc import Callable

import numpy as np


def feature_statistics(features, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D, D]) of features [N, D]: the mean and the unbiased (N − 1) covariance, as pytorch-fid computes.
    `weights` [N]: integer frequency weights (row i counted weights[i] times, as in a bootstrap resample)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2 to estimate a covariance; got shape {features.shape}")
    if weights is None:
        return features.mean(axis=0), np.cov(features, rowvar=False)
    return np.average(features, axis=0, weights=weights), np.cov(features, rowvar=False, fweights=weights)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write μ and Σ as an .npz with arrays `mu` and `sigma`, the format pytorch-fid and clean-fid read and write."""
    _check_statistics(np.asarray(mu), np.asarray(sigma), os.fspath(path))
    np.savez(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (μ, Σ) from a pytorch-fid style .npz holding arrays `mu` [D] and `sigma` [D, D]."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name in ("mu", "sigma")}
            names = sorted(data.files)
    except (OSError, EOFError, ValueError) as error:  # numpy's errors for damaged, foreign or pickle files
        raise ValueError(f"{path} is not a readable .npz file of FID statistics: {error}") from None
    if len(arrays) != 2:
        raise ValueError(f"{path} holds arrays {names}, but FID statistics need 'mu' and 'sigma'")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    _check_statistics(mu, sigma, path)
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{source}: mu must be [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}")


def _eigenvalues_of_psd(values: np.ndarray, what: str) -> np.ndarray:
    """Eigenvalues of a matrix that should be positive semi-definite, with rounding noise set to exactly 0.

    Values below the numerical-rank tolerance D · ε · max|λ| (numpy's `matrix_rank` rule) are rounding noise around
    0, which every singular covariance has; left in, their square roots (√1e-13 ≈ 3e-7) would add up to a visible
    error. Clearly negative values cannot come from covariances: their square roots are imaginary, so this warns
    (naming the size) and drops them, where pytorch-fid would raise.
    """
    tolerance = values.shape[0] * np.finfo(np.float64).eps * max(np.abs(values).max(initial=0.0), 1e-300)
    negative = values[values < -tolerance]
    if negative.size:
        warnings.warn(f"{what} has {negative.size} negative eigenvalue(s) down to {negative.min():.3g}: the matrix "
                      f"square root has an imaginary component of magnitude up to {np.sqrt(-negative.min()):.3g}, "
                      "which was discarded. Are both matrices covariances (symmetric positive semi-definite)?",
                      RuntimeWarning, stacklevel=4)
    return np.where(values > tolerance, values, 0.0)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½) for covariances Σ1, Σ2 [D, D], exactly and stably, singular matrices included.

    Σ1 Σ2 = S (S Σ2) with S = Σ1^½ has the eigenvalues of (S Σ2) S = S Σ2 S (AB and BA share eigenvalues), a symmetric
    PSD matrix; the principal square root of Σ1 Σ2 has their square roots as eigenvalues, and the trace is their sum.
    Symmetric eigendecompositions replace scipy's general `sqrtm`, whose Schur iteration on the non-symmetric product
    can fail (non-finite output) or return complex rounding noise for rank-deficient covariances, and no ε has to be
    added to the diagonals.
    """
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    # Symmetrise: stored covariances can be off by rounding, and eigh reads only one triangle.
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (vectors * np.sqrt(_eigenvalues_of_psd(values, "Σ1"))) @ vectors.T  # S = Σ1^½
    product = root @ sigma2 @ root
    eigenvalues = _eigenvalues_of_psd(np.linalg.eigvalsh((product + product.T) / 2), "Σ1·Σ2")
    return float(np.sqrt(eigenvalues).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance d² between N(μ1, Σ1) and N(μ2, Σ2); μ: [D], Σ: [D, D] numpy arrays (float64 inside)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    _check_statistics(mu1, sigma1, "first statistics")
    _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the statistics have different feature sizes: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` contiguous splits of logits [N, classes].

    Split i holds rows [i·N // splits, (i + 1)·N // splits), as in Salimans et al.'s code; each split's score is
    exp(mean_x KL(p(y|x) ‖ p̂(y))) with p̂(y) the split's mean prediction, and the standard deviation is the
    population one (ddof 0), also as there. For the standard IS pass the FID Inception's 1008 `logits`, which (like
    the original TensorFlow code) leave out the final layer's bias.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"need logits [N, classes] with N >= splits; got shape {logits.shape}, splits={splits}")
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))  # log softmax, [N, classes]
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_probs[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))  # log p̂(y), [classes]
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)  # KL(p(y|x) ‖ p̂(y)) per image
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (xᵀy / d + coef0)^degree for rows of x [n, d], y [m, d] -> [n, m] (KID's kernel, with γ = 1/d)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased estimate of MMD² between samples x [n, d] and y [m, d] (Gretton et al. 2012, eq. 3).

    The within-set kernel means leave out the diagonal k(x_i, x_i); the cross term averages all n·m pairs.
    """
    n, m = x.shape[0], y.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x, degree, coef0), polynomial_kernel(y, y, degree, coef0)
    k_xy = polynomial_kernel(x, y, degree, coef0)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0, degree: int = 3,
        coef0: float = 1.0) -> tuple[float, float]:
    """(mean, std) of the Kernel Inception Distance between features1 [N1, D] and features2 [N2, D].

    Each of `subsets` rounds draws `subset_size` rows from each set without replacement (numpy's generator seeded with
    `seed`, so a result can be reproduced) and computes the unbiased MMD²; the standard deviation is ddof 0, as in
    Bińkowski et al.'s and torch-fidelity's code. `subset_size` is capped at the smaller set (then every round uses
    all rows of that set). KID is reported unscaled; papers often print it ×10³.
    """
    x, y = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features [N1, D] and [N2, D]; got shapes {x.shape} and {y.shape}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                            y[rng.choice(y.shape[0], size, replace=False)], degree, coef0)
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def classifier_score(logits, weights=None) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) over the whole set: the Inception Score's formula (Salimans et al. 2016) in one split,
    for any classifier's logits [N, classes] (p(y|x) = softmax(logits), p(y) = E_x p(y|x)). `weights` [N]: frequency
    weights of the rows (a bootstrap resample)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"need logits [N, classes] with N >= 1; got shape {logits.shape}")
    weights = np.ones(logits.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))  # log p(y|x), [N, classes]
    log_marginal = np.log(np.average(np.exp(log_probs), axis=0, weights=weights))  # log p(y), [classes]
    kl = (np.exp(log_probs) * (log_probs - log_marginal)).sum(axis=1)  # [N]
    return float(np.exp(np.average(kl, weights=weights)))


def kernel_distance(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray, weights_x=None, weights_y=None) -> float:
    """Unbiased MMD² (KID's estimate, over all rows at once) from kernel matrices k_xx [n, n], k_yy [m, m], k_xy [n, m].

    With frequency weights (a bootstrap resample), the within-set means leave out every pair of copies of one row,
    not just the diagonal: a repeated image adds no new pair of distinct images, and its k(x, x) terms would bias the
    estimate upwards. Without weights this is `mmd2_unbiased`.
    """
    wx = np.ones(k_xx.shape[0]) if weights_x is None else np.asarray(weights_x, dtype=np.float64)
    wy = np.ones(k_yy.shape[0]) if weights_y is None else np.asarray(weights_y, dtype=np.float64)

    def within(kernel: np.ndarray, w: np.ndarray) -> float:
        pairs = w.sum() ** 2 - (w ** 2).sum()  # ordered pairs of copies of distinct rows
        if pairs <= 0:
            raise ValueError("KID needs at least 2 distinct samples per set")
        return (w @ kernel @ w - (w ** 2 * np.diag(kernel)).sum()) / pairs

    return float(within(k_xx, wx) + within(k_yy, wy) - 2 * (wx @ k_xy @ wy) / (wx.sum() * wy.sum()))


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of x [n, D] and y [m, D] -> [n, m] (float64)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    squared = (x ** 2).sum(axis=1)[:, None] + (y ** 2).sum(axis=1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.maximum(squared, 0.0))


class NeighbourBalls:
    """The k-NN manifold of a point set (Kynkäänniemi et al. 2019, eq. 1-2): the ball around each point reaching its
    k-th nearest other point. The neighbour order is sorted once, so the radii of any sub-multiset (a bootstrap
    resample, as `present` rows) cost one pass."""

    def __init__(self, points: np.ndarray, k: int):
        points = np.asarray(points, dtype=np.float64)
        if k < 1 or points.shape[0] <= k:
            raise ValueError(f"k-NN balls with k = {k} need more than {k} points; got {points.shape[0]}")
        distances = pairwise_distances(points, points)
        np.fill_diagonal(distances, np.inf)  # a point is not its own neighbour
        self.k = k
        self.order = np.argsort(distances, axis=1, kind="stable")[:, :-1]  # [N, N − 1], nearest first, self dropped
        self.sorted_distances = np.take_along_axis(distances, self.order, axis=1)  # [N, N − 1]

    def radii(self, present: np.ndarray | None = None) -> np.ndarray:
        """[N] the radius of each point's ball; with `present` [N] bool, only present points count as neighbours (a
        resample's repeated image is one point of its manifold). Fewer than k present neighbours: radius ∞."""
        if present is None:
            return self.sorted_distances[:, self.k - 1]
        seen = np.cumsum(present[self.order], axis=1)  # [N, N − 1]: present neighbours up to each rank
        rank = np.argmax(seen >= self.k, axis=1)
        radii = np.take_along_axis(self.sorted_distances, rank[:, None], axis=1)[:, 0]
        return np.where(seen[:, -1] >= self.k, radii, np.inf)


def _inside(distances: np.ndarray, radii: np.ndarray, present: np.ndarray | None) -> np.ndarray:
    """[n] whether each query (row of distances [n, m] to the m ball centres) lies in a ball of a present centre."""
    hits = distances <= radii[None, :]
    if present is not None:
        hits &= present[None, :]
    return hits.any(axis=1)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake features [Nf, D] against real ones [Nr, D] with k-NN balls (Kynkäänniemi et al.
    2019; k = 3 as there)."""
    return FeatureComparison(real, fake, k).precision_recall()


def density_coverage(real, fake, k: int = 5) -> tuple[float, float]:
    """(density, coverage) of fake features [Nf, D] against real ones [Nr, D] (Naeem et al. 2020, "Reliable Fidelity
    and Diversity Metrics for Generative Models", eqs. 3-4; k = 5 as there). Only the real set's k-NN balls count, and
    each ball adds 1/k to the density of a fake it holds: one outlying real image with a large ball, which can make a
    whole set of fakes "precise", adds little to their density."""
    return FeatureComparison(real, fake, k).density_coverage()


class FeatureComparison:
    """Real [Nr, D] and generated [Nf, D] features with what FD, KID, precision/recall and density/coverage need of
    them computed once; each method takes optional frequency weights (bootstrap resamples) of the real and the
    generated rows.

    KID here is the unbiased MMD² over all rows (one "subset" of everything; Bińkowski et al. average subsets only to
    bound the cost, and a few thousand rows are cheap)."""

    def __init__(self, real, fake, k: int = 3):
        self.real, self.fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
        if self.real.ndim != 2 or self.fake.ndim != 2 or self.real.shape[1] != self.fake.shape[1]:
            raise ValueError(f"need features [Nr, D] and [Nf, D]; got shapes {self.real.shape} and {self.fake.shape}")
        self.kernels = (polynomial_kernel(self.real, self.real), polynomial_kernel(self.fake, self.fake),
                        polynomial_kernel(self.real, self.fake))
        self.real_balls, self.fake_balls = NeighbourBalls(self.real, k), NeighbourBalls(self.fake, k)
        self.real_to_fake = pairwise_distances(self.real, self.fake)  # [Nr, Nf]

    def frechet_distance(self, real_weights=None, fake_weights=None) -> float:
        return frechet_distance(*feature_statistics(self.fake, fake_weights),
                                *feature_statistics(self.real, real_weights))

    def kernel_distance(self, real_weights=None, fake_weights=None) -> float:
        return kernel_distance(*self.kernels, real_weights, fake_weights)

    def precision_recall(self, real_weights=None, fake_weights=None) -> tuple[float, float]:
        real_present = None if real_weights is None else np.asarray(real_weights) > 0
        fake_present = None if fake_weights is None else np.asarray(fake_weights) > 0
        fake_inside = _inside(self.real_to_fake.T, self.real_balls.radii(real_present), real_present)  # [Nf]
        real_inside = _inside(self.real_to_fake, self.fake_balls.radii(fake_present), fake_present)  # [Nr]
        return (float(np.average(fake_inside, weights=fake_weights)),
                float(np.average(real_inside, weights=real_weights)))

    def density_coverage(self, real_weights=None, fake_weights=None) -> tuple[float, float]:
        """Naeem et al. 2020, with the real balls B_i of radius NND_k(X_i):
        density  = 1/(k·M) Σ_j Σ_i 1[Y_j ∈ B_i]   (eq. 3: how many real balls hold each fake, over k; its expectation
                                                   is 1 when the fake and real distributions are equal, and it may
                                                   exceed 1 where fakes crowd the densest real regions)
        coverage = 1/N Σ_i 1[∃ j: Y_j ∈ B_i]       (eq. 4: the share of real balls holding at least one fake)
        With weights (a resample), each present real image is one ball, as for precision, and the fakes and real
        images are averaged with their weights."""
        real_present = None if real_weights is None else np.asarray(real_weights) > 0
        fake_present = None if fake_weights is None else np.asarray(fake_weights) > 0
        hits = self.real_to_fake <= self.real_balls.radii(real_present)[:, None]  # [Nr, Nf]: fake j in real ball i
        if real_present is not None:
            hits &= real_present[:, None]
        density = np.average(hits.sum(axis=0), weights=fake_weights) / self.real_balls.k
        if fake_present is not None:
            hits &= fake_present[None, :]
        coverage = np.average(hits.any(axis=1), weights=real_weights)
        return float(density), float(coverage)


def resample_weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] how often each of n items occurs in a draw of n with replacement (a bootstrap resample)."""
    return np.bincount(rng.integers(0, n, n), minlength=n)


def bootstrap_intervals(statistics: Callable[..., dict[str, float]], sizes: tuple[int, ...], resamples: int = 200,
                        seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of `statistics(*weights)` -> {name: value}, evaluated on the data (no weights) and on
    `resamples` resamples, each drawing every set (of `sizes[i]` items) with replacement anew (weights[i] [sizes[i]]
    are the counts). Seeded: the same call, the same intervals.

    The interval of a name is the central `confidence` range of its resampled values, shifted by the difference
    between the estimate and their mean: a resample holds only about 63% distinct images, which biases plug-in
    estimates (FD grows as the sample shrinks; k-NN balls widen), so the resamples' own offset is removed and their
    spread kept (Efron & Tibshirani 1993, §10.6: the bootstrap estimate of bias).
    """
    if resamples < 2 or not 0 < confidence < 1:
        raise ValueError(f"need at least 2 resamples and a confidence in (0, 1); got {resamples}, {confidence}")
    rng = np.random.default_rng(seed)
    estimates = statistics(*[None] * len(sizes))
    values: dict[str, list[float]] = {name: [] for name in estimates}
    for _ in range(resamples):
        for name, value in statistics(*[resample_weights(rng, n) for n in sizes]).items():
            values[name].append(value)
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name, resampled in values.items():
        shift = estimates[name] - float(np.mean(resampled))
        low, high = np.percentile(resampled, [tail, 100 - tail])
        intervals[name] = (float(low + shift), float(high + shift))
    return intervals
