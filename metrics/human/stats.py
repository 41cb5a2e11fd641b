"""Statistics of pairwise preference votes: per-model win rates with Wilson intervals, and Bradley–Terry strengths.

A vote compares two models' images for one prompt: one wins, or it is a tie. A tie counts as half a win for each side
in both statistics (the usual convention; a tie carries no evidence for either side).
"""
import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

Z_95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


@dataclass(frozen=True)
class Outcome:
    """One vote: `first` and `second` are model names; `winner` is one of them, or None for a tie."""
    first: str
    second: str
    winner: str | None


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001, eq. 4).

    Unlike the normal-approximation interval it stays inside [0, 1] and is not degenerate at 0 or n successes.
    (0, 1) when there are no trials.
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def win_rates(outcomes: list[Outcome]) -> dict[str, dict]:
    """Per model: comparisons, wins, losses, ties, win rate (wins + ties / 2) / comparisons, and its 95 % Wilson
    interval."""
    counts = defaultdict(lambda: {"comparisons": 0, "wins": 0, "losses": 0, "ties": 0})
    for outcome in outcomes:
        for model in (outcome.first, outcome.second):
            counts[model]["comparisons"] += 1
            if outcome.winner is None:
                counts[model]["ties"] += 1
            elif outcome.winner == model:
                counts[model]["wins"] += 1
            else:
                counts[model]["losses"] += 1
    result = {}
    for model, c in sorted(counts.items()):
        score = c["wins"] + c["ties"] / 2
        low, high = wilson_interval(score, c["comparisons"])
        result[model] = {**c, "win_rate": score / c["comparisons"], "ci95": [low, high]}
    return result


def bradley_terry(outcomes: list[Outcome], models: list[str] | None = None, prior_ties: float = 1.0,
                  tolerance: float = 1e-10, max_iterations: int = 10_000) -> dict[str, float]:
    """Bradley–Terry log-strengths θ (mean 0) by maximum likelihood: P(i beats j) = 1 / (1 + exp(θj − θi)).

    Solved with Hunter's minorisation–maximisation iteration (Hunter 2004, "MM algorithms for generalized
    Bradley–Terry models", eq. 3): p_i ← W_i / Σ_j n_ij / (p_i + p_j), where W_i counts i's wins and n_ij the
    comparisons of i and j. The maximum exists only if every model both wins and loses against the others, so
    `prior_ties` virtual ties are added between every pair of models: this keeps all θ finite (a model that never
    won gets a low finite strength) and pulls the estimates slightly towards equality, an effect that fades as votes
    accumulate.
    """
    names = sorted(set(models or []) | {m for o in outcomes for m in (o.first, o.second)})
    if not names:
        return {}
    index = {name: i for i, name in enumerate(names)}
    size = len(names)
    wins = [0.0] * size
    pair_counts = [[0.0] * size for _ in range(size)]
    for i, j in combinations(range(size), 2):
        pair_counts[i][j] = pair_counts[j][i] = prior_ties
        wins[i] += prior_ties / 2
        wins[j] += prior_ties / 2
    for outcome in outcomes:
        i, j = index[outcome.first], index[outcome.second]
        pair_counts[i][j] += 1
        pair_counts[j][i] += 1
        if outcome.winner is None:
            wins[i] += 0.5
            wins[j] += 0.5
        else:
            wins[index[outcome.winner]] += 1
    never_won = [names[i] for i in range(size) if wins[i] == 0]
    if never_won:
        raise ValueError(f"{', '.join(never_won)} never won, so the maximum-likelihood strengths are not finite; "
                         "use prior_ties > 0")
    strengths = [1.0] * size
    for _ in range(max_iterations):
        updated = []
        for i in range(size):
            denominator = sum(pair_counts[i][j] / (strengths[i] + strengths[j]) for j in range(size) if j != i)
            updated.append(wins[i] / denominator if denominator > 0 else strengths[i])
        # The likelihood is invariant to scaling all p; fix the geometric mean at 1 so θ has mean 0.
        log_mean = sum(math.log(p) for p in updated) / size
        updated = [p / math.exp(log_mean) for p in updated]
        converged = max(abs(math.log(a) - math.log(b)) for a, b in zip(updated, strengths)) < tolerance
        strengths = updated
        if converged:
            break
    return {name: math.log(strengths[index[name]]) for name in names}
