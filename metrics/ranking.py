"""Do the metrics rank models as the judge does? Spearman's rank correlation over models, with each metric's sign.

`python -m metrics.evaluate --model ...` (multi-model mode) scores several models and checks, per metric, that it
orders them as a trusted reference does (on the shapes world, the judge's adherence): a metric that agrees can be
trusted on data where no judge exists. Each metric is first turned into "higher is better" (FD and KID are negated),
so ρ = +1 means the metric ranks the models exactly as the reference, −1 exactly backwards.

Spearman's ρ (Spearman 1904) is Pearson's correlation of the ranks; tied values share their mean rank.
"""
import numpy as np

# Metrics (by the prefix before their label) of which a lower value is better; all others: higher is better.
LOWER_IS_BETTER = ("fd", "fid", "kid")

# How the metrics of a labelled feature network are shown: fd_shapesCLIP -> "FD-shapesCLIP" (the label says which
# network made them).
DISPLAY_NAMES = {"fd": "FD", "kid": "KID", "precision": "Precision", "recall": "Recall", "density": "Density",
                 "coverage": "Coverage", "clip_score": "CLIP score", "is_clip_zeroshot": "IS-zero-shot"}


def display_name(name: str, label: str) -> str:
    """A result name as reports show it: display_name("fd_shapesCLIP", "shapesCLIP") -> "FD-shapesCLIP"; names not
    of the labelled metrics are kept."""
    for prefix, title in DISPLAY_NAMES.items():
        if name == f"{prefix}_{label}":
            return f"{title}-{label}"
    return name


def orientation(name: str) -> int:
    """+1 when a higher value of metric `name` is better, −1 when a lower one is (FD, KID)."""
    return -1 if name.split("_")[0] in LOWER_IS_BETTER else 1


def ranks(values) -> np.ndarray:
    """Ranks 1..n of values [n] (ascending), ties given their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(x, y) -> float | None:
    """Spearman's ρ of paired values x [n], y [n]; None when it is undefined (n < 2, or either side all tied)."""
    rx, ry = ranks(x), ranks(y)
    if len(rx) != len(ry):
        raise ValueError(f"need paired values; got {len(rx)} and {len(ry)}")
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return round(float(np.corrcoef(rx, ry)[0, 1]), 12)  # ±1 exactly, not 0.9999999999999999


def rank_agreement(metrics: dict[str, dict[str, float]], reference: dict[str, float]) -> dict[str, float | None]:
    """{metric: Spearman ρ between the metric (oriented so higher is better) and the reference} over the models that
    have both; `metrics`: model -> {metric: value}, `reference`: model -> the reference score (higher is better)."""
    models = [m for m in metrics if m in reference]
    names = sorted({name for m in models for name in metrics[m]})
    agreement = {}
    for name in names:
        have = [m for m in models if metrics[m].get(name) is not None]
        agreement[name] = spearman([orientation(name) * metrics[m][name] for m in have], [reference[m] for m in have])
    return agreement
