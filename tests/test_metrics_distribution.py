"""Fréchet distance, KID, Inception Score and precision/recall against textbook formulas, closed forms, scipy,
torchmetrics and torch-fidelity on the same features; weighted (bootstrap) forms against repeated rows."""
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from metrics.distribution import FeatureComparison, NeighbourBalls, bootstrap_intervals, classifier_score, \
    density_coverage, feature_statistics, frechet_distance, inception_score, kernel_distance, kid, load_statistics, \
    mmd2_unbiased, polynomial_kernel, precision_recall, resample_weights, save_statistics, trace_sqrt_product
from metrics_oracles import torch_fidelity_precision_recall, torchmetrics


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """Heusel et al.'s formula with scipy's general matrix square root (the reference pytorch-fid uses)."""
    root = linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def random_features(seed: int, n: int, d: int, rank: int | None = None) -> np.ndarray:
    """[n, d] features with correlated dimensions; with `rank`, confined to a rank-dimensional subspace."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank or d, d))
    return rng.normal(size=(n, rank or d)) @ basis + rng.normal(size=d)


def test_frechet_distance_matches_scipy_sqrtm_on_full_rank_covariances():
    mu1, sigma1 = feature_statistics(random_features(0, 400, 32))
    mu2, sigma2 = feature_statistics(random_features(1, 300, 32) * 1.3)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2),
                                                                       rel=1e-9)


def test_frechet_distance_handles_rank_deficient_covariances():
    """Fewer samples than dimensions (the usual case for small FID sets: N < 2048) gives singular covariances; the
    eigen-decomposition route needs no ε on the diagonal and still agrees with scipy where scipy succeeds."""
    mu1, sigma1 = feature_statistics(random_features(2, 20, 64))
    mu2, sigma2 = feature_statistics(random_features(3, 30, 64, rank=10))
    assert np.linalg.matrix_rank(sigma1) < 64 and np.linalg.matrix_rank(sigma2) == 10
    with np.errstate(all="ignore"):
        expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_translation_adds_the_squared_shift():
    features = random_features(4, 50, 16, rank=8)
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-12 * np.trace(sigma))
    shift = np.arange(16.0)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(shift @ shift, rel=1e-9)


def test_frechet_distance_of_gaussians_with_commuting_covariances_has_a_closed_form():
    """For diagonal Σ1, Σ2 the trace term is Σ_k (√a_k − √b_k)², the textbook special case."""
    a, b = np.array([1.0, 4.0, 0.0, 9.0]), np.array([4.0, 1.0, 2.0, 9.0])
    expected = 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(4), np.diag(a), np.array([1.0, 0, 0, 0]), np.diag(b)) == pytest.approx(expected)


def test_trace_sqrt_warns_about_imaginary_components_of_non_covariances():
    not_psd = np.diag([1.0, -4.0])
    with pytest.warns(RuntimeWarning, match="imaginary component of magnitude up to 2"):
        assert trace_sqrt_product(not_psd, np.eye(2)) == pytest.approx(1.0)
    with warnings.catch_warnings():  # genuine (here singular) covariances never warn
        warnings.simplefilter("error")
        assert trace_sqrt_product(np.diag([1.0, 4.0, 0.0]), np.diag([1.0, 9.0, 5.0])) == pytest.approx(1 + 6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_statistics_round_trip_through_pytorch_fid_npz(tmp_path):
    mu, sigma = feature_statistics(random_features(5, 10, 6))
    path = tmp_path / "real.npz"
    save_statistics(path, mu, sigma)
    with np.load(path) as data:  # what pytorch-fid's compute_statistics_of_path reads
        assert sorted(data.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(data["mu"], mu)
    loaded_mu, loaded_sigma = load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    # A file written the way pytorch-fid / clean-fid write theirs (float32 is common) loads too.
    np.savez(tmp_path / "other.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert load_statistics(tmp_path / "other.npz")[0].dtype == np.float64


def test_load_statistics_explains_what_is_wrong(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="need 'mu' and 'sigma'"):
        load_statistics(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_statistics(tmp_path / "text.npz")


def textbook_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))) per contiguous split, mean and population std."""
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    n, scores = len(logits), []
    for i in range(splits):
        part = probabilities[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in part])))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_the_textbook_formula_with_uneven_splits():
    logits = np.random.default_rng(6).normal(scale=3, size=(103, 20))
    mean, std = inception_score(logits, splits=10)
    expected_mean, expected_std = textbook_inception_score(logits, 10)
    assert mean == pytest.approx(expected_mean, rel=1e-12) and std == pytest.approx(expected_std, rel=1e-9)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save all extracted features")
def test_inception_score_matches_torchmetrics(monkeypatch):
    """torchmetrics shuffles before splitting; with the shuffle made the identity and N divisible by the splits its
    splits are ours. Its std is the sample one (ddof 1), ours the original code's population one (ddof 0)."""
    inception_module = torchmetrics().image.inception
    logits = torch.randn(100, 1008, generator=torch.Generator().manual_seed(7)) * 4

    class GivenLogits(torch.nn.Module):  # torchmetrics' `feature` hook: the "network" returns the logits given
        def forward(self, rows):
            return rows

    monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: torch.arange(n))
    metric = inception_module.InceptionScore(feature=GivenLogits(), splits=5)
    metric.update(logits.double())
    reference_mean, reference_std = metric.compute()
    mean, std = inception_score(logits.numpy(), splits=5)
    assert mean == pytest.approx(reference_mean.item(), rel=1e-9)
    assert std * np.sqrt(5 / 4) == pytest.approx(reference_std.item(), rel=1e-6)


def test_inception_score_bounds():
    """A classifier sure of one class per image, spread evenly over k classes, scores k; a constant one scores 1."""
    confident = np.full((40, 8), -50.0)
    confident[np.arange(40), np.arange(40) % 8] = 50
    assert inception_score(confident, splits=1)[0] == pytest.approx(8, rel=1e-9)
    assert inception_score(np.zeros((40, 8)), splits=4) == pytest.approx((1.0, 0.0))


def textbook_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012 eq. 3, unbiased, with KID's kernel (xᵀy / d + 1)³, written out pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_with_one_full_subset_is_the_unbiased_mmd2():
    x, y = random_features(8, 30, 5), random_features(9, 30, 5) + 0.5
    mean, std = kid(x, y, subsets=3, subset_size=30)
    assert mean == pytest.approx(textbook_mmd2(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_when_subsets_cover_the_sets():
    module = torchmetrics().image.kid
    x, y = random_features(10, 40, 16), random_features(11, 40, 16) * 0.8

    class GivenFeatures(torch.nn.Module):
        def forward(self, rows):
            return rows

    metric = module.KernelInceptionDistance(feature=GivenFeatures(), subsets=2, subset_size=40)
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    reference_mean, _ = metric.compute()
    assert kid(x, y, subsets=2, subset_size=40)[0] == pytest.approx(reference_mean.item(), rel=1e-9)


def test_kid_subsets_are_reproducible_and_estimate_zero_for_one_distribution():
    x, y = np.split(random_features(12, 600, 8), 2)
    first, second = kid(x, y, subsets=20, subset_size=50, seed=3), kid(x, y, subsets=20, subset_size=50, seed=3)
    assert first == second and first != kid(x, y, subsets=20, subset_size=50, seed=4)
    # Same distribution: unbiased, so the mean sits within a few standard errors of 0.
    assert abs(first[0]) < 4 * first[1] / np.sqrt(20)
    shifted_mean, shifted_std = kid(x, y + 1.0, subsets=20, subset_size=50)
    assert shifted_mean > 4 * shifted_std / np.sqrt(20)


# ----------------------------------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019), weighted statistics and bootstrap intervals


def test_precision_recall_closed_form_on_points_of_a_line():
    """Real points 0, 1, 2, 3 on a line: with k = 1 every ball has radius 1, so the real manifold is [−1, 4]. Fake
    points 0.5, 3.9 and 10: precision 2/3. Fake balls with k = 1: 0.5 and 3.9 are 3.4 apart, 10 is 6.1 from 3.9, so
    the radii are 3.4, 3.4 and 6.1; every real point lies within 3.4 of 0.5 or 3.9: recall 1. With k = 2 the real
    radii are 2, 1, 1, 2 ([−2, 5]) and the fake ones 9.5, 6.1, 9.5: precision 2/3, recall 1."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [3.9], [10.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    assert precision_recall(real, fake, k=2) == pytest.approx((2 / 3, 1.0))
    # A fake cluster far from all real points: nothing of it is real-looking, and it covers no real point.
    assert precision_recall(real, fake + 100, k=1) == (0.0, 0.0)
    # Fake points on a sub-range of the real ones: all precise, but the real points near 3 are not covered when the
    # fake balls are small (fake 0, 0.1, 0.2: radii 0.1 with k = 1 -> covers only real 0).
    assert precision_recall(real, np.array([[0.0], [0.1], [0.2]]), k=1) == pytest.approx((1.0, 0.25))


def test_precision_recall_matches_torch_fidelity():
    real, fake = random_features(0, 120, 8), random_features(1, 90, 8) * 1.2
    oracle = torch_fidelity_precision_recall()
    expected = oracle.calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3)
    # Shares of 90 and 120 points differ by at least 1/120 when one point's verdict differs; the oracle averages in
    # float32 (error ~1e-8).
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-6)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case with points on both sides of the balls


def test_density_coverage_closed_form_on_points_of_a_line():
    """Real points 0, 1, 2, 3 (k = 1: balls of radius 1) and fakes 0.5, 3.9, 10: 0.5 lies in the balls of 0 and 1,
    3.9 in that of 3, 10 in none, so density = (2 + 1 + 0) / (1 · 3) = 1; the balls of 0, 1 and 3 hold a fake:
    coverage 3/4. With k = 2 (radii 2, 1, 1, 2) the counts are the same: density (2 + 1) / (2 · 3) = 1/2."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [3.9], [10.0]])
    assert density_coverage(real, fake, k=1) == pytest.approx((1.0, 0.75))
    assert density_coverage(real, fake, k=2) == pytest.approx((0.5, 0.75))
    assert density_coverage(real, fake + 100, k=1) == (0.0, 0.0)


def test_one_outlying_real_image_makes_fakes_precise_but_not_dense():
    """A tight real cluster 0, 0.1, 0.2, 0.3 and one outlier at 20, whose 3rd-neighbour ball (radius 19.8) reaches
    30: fakes all at 30 are 'precise' (precision 1) although only that one ball holds them, so their density is 1/3
    and they cover 1 real ball of 5 -- the failure of precision Naeem et al. 2020 designed density for."""
    real = np.array([[0.0], [0.1], [0.2], [0.3], [20.0]])
    fake = np.full((6, 1), 30.0)
    assert precision_recall(real, fake, k=3)[0] == 1.0
    assert density_coverage(real, fake, k=3) == pytest.approx((1 / 3, 1 / 5))


def test_density_coverage_equal_the_papers_sums_and_weights_equal_repeated_rows():
    real, fake = random_features(0, 60, 4), random_features(1, 40, 4) * 1.3
    k = 3
    # Eqs. 3-4 of Naeem et al. written as loops over the balls (radius: distance to the k-th other real point).
    radii = [sorted(np.linalg.norm(real - x, axis=1))[k] for x in real]
    inside = [[np.linalg.norm(y - x) <= r for y in fake] for x, r in zip(real, radii)]
    density = sum(map(sum, inside)) / (k * len(fake))
    coverage = sum(map(any, inside)) / len(real)
    assert 0 < coverage < 1 and 0 < density
    comparison = FeatureComparison(real, fake, k)
    assert comparison.density_coverage() == pytest.approx((density, coverage), rel=1e-12)
    # A resample's fake weights are repeated fakes; its real weights keep each drawn real image as one ball.
    rng = np.random.default_rng(2)
    fake_weights, real_weights = rng.integers(0, 3, len(fake)), rng.integers(0, 3, len(real))
    assert comparison.density_coverage(fake_weights=fake_weights) == pytest.approx(
        density_coverage(real, np.repeat(fake, fake_weights, axis=0), k), rel=1e-12)
    present = real_weights > 0
    dense, _ = density_coverage(real[present], fake, k)
    covered = FeatureComparison(real[present], fake, k).real_to_fake.min(axis=1) <= \
        NeighbourBalls(real[present], k).radii()
    assert comparison.density_coverage(real_weights=real_weights) == pytest.approx(
        (dense, np.average(covered, weights=real_weights[present])), rel=1e-12)


def test_neighbour_balls_of_a_resample_count_each_repeated_point_once():
    """Points 0, 1, 3, 7 on a line, resampled as {0, 0, 0, 3}: a copy is not a neighbour of its original, so with
    k = 1 the radius of 0 is 3 (to 3), not 0; absent points (1, 7) are nobody's neighbour."""
    balls = NeighbourBalls(np.array([[0.0], [1.0], [3.0], [7.0]]), k=1)
    np.testing.assert_allclose(balls.radii(), [1, 1, 2, 4])
    present = np.array([3, 0, 1, 0]) > 0
    np.testing.assert_allclose(balls.radii(present)[[0, 2]], [3, 3])
    assert balls.radii(np.array([True, False, False, False]))[0] == np.inf  # no neighbour at all


def test_weighted_statistics_equal_the_statistics_of_repeated_rows():
    real, fake = random_features(2, 30, 4), random_features(3, 25, 4) + 0.5
    rng = np.random.default_rng(0)
    real_w, fake_w = resample_weights(rng, 30), resample_weights(rng, 25)
    comparison = FeatureComparison(real, fake, k=3)
    repeated_real, repeated_fake = np.repeat(real, real_w, axis=0), np.repeat(fake, fake_w, axis=0)
    assert comparison.frechet_distance(real_w, fake_w) == pytest.approx(frechet_distance(
        *feature_statistics(repeated_fake), *feature_statistics(repeated_real)), rel=1e-10)
    # Without weights: the unbiased MMD² and the IS of one split.
    assert comparison.kernel_distance() == pytest.approx(mmd2_unbiased(real, fake), rel=1e-12)
    logits = random_features(4, 25, 6)
    assert classifier_score(logits) == pytest.approx(inception_score(logits, splits=1)[0], rel=1e-12)
    assert classifier_score(logits, fake_w) == pytest.approx(inception_score(np.repeat(logits, fake_w, axis=0), 1)[0],
                                                             rel=1e-12)


def test_weighted_kernel_distance_leaves_out_pairs_of_copies():
    """x = {a, a (copy), b}: the within-x mean is over the pairs of distinct originals (a, b) and (b, a) only."""
    x, y = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [0.5, 0.0]])
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    expected = k_xx[0, 1] + k_yy[0, 1] - 2 * (2 * k_xy[0].sum() + k_xy[1].sum()) / (3 * 2)
    assert kernel_distance(k_xx, k_yy, k_xy, np.array([2, 1]), np.array([1, 1])) == pytest.approx(expected)


def test_bootstrap_interval_contains_the_estimate_is_seeded_and_shrinks_with_n():
    def widths(n: int) -> tuple[float, dict]:
        real, fake = random_features(5, n, 4), random_features(6, n, 4) + 0.3
        comparison = FeatureComparison(real, fake, k=3)

        def statistics(real_w=None, fake_w=None):
            precision, recall = comparison.precision_recall(real_w, fake_w)
            return {"fd": comparison.frechet_distance(real_w, fake_w),
                    "kid": comparison.kernel_distance(real_w, fake_w), "precision": precision, "recall": recall}
        intervals = bootstrap_intervals(statistics, (n, n), resamples=100, seed=1)
        point = statistics()
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, name
        assert intervals == bootstrap_intervals(statistics, (n, n), resamples=100, seed=1)
        return intervals["fd"][1] - intervals["fd"][0], intervals
    small, small_intervals = widths(40)
    large, large_intervals = widths(640)
    assert large < small / 2.5  # the width falls as 1/√n: 4x at 16x the images, asked here with room to spare
    assert (large_intervals["precision"][1] - large_intervals["precision"][0]
            < small_intervals["precision"][1] - small_intervals["precision"][0])


def test_bootstrap_intervals_are_the_resamples_percentiles_moved_onto_the_estimate():
    """A statistic whose resamples are biased: the interval keeps their spread and removes their offset."""
    data = np.arange(10.0)
    values = []

    def statistics(weights):
        value = 5.0 if weights is None else float(np.average(data, weights=weights)) + 1.0  # resamples offset by 1
        values.append(value)
        return {"v": value}
    (low, high), = bootstrap_intervals(statistics, (10,), resamples=50, seed=3).values()
    resampled = np.array(values[1:])
    shift = 5.0 - resampled.mean()
    assert (low, high) == pytest.approx((np.percentile(resampled, 2.5) + shift, np.percentile(resampled, 97.5) + shift))
    assert shift == pytest.approx(5.0 - (4.5 + 1.0), abs=0.4)  # resamples average the mean 4.5, plus the offset
