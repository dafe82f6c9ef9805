"""From accumulated gradient sums to normalized importance and its summaries.

Pure numpy, usable without `fit`: the method's math lives here.
"""

from __future__ import annotations

import numpy as np


def normalize(sums: np.ndarray, visits: np.ndarray) -> np.ndarray:
    """I_i = S_i / sum_k S_k, with S_i the mean per visit of sum_j |dJ_i/dX_ij|.

    Args:
        sums: [N] accumulated sum_j |g_ij| over the epoch's visits.
        visits: [N] number of visits of each sample in the epoch.

    Returns:
        float64 [N] importance summing to 1 over visited samples (all zeros if
        nothing was visited or every gradient was zero); unvisited samples get 0.

    Example:

    >>> normalize(np.array([2.0, 1.0, 0.0]), np.array([2, 1, 0]))
    array([0.5, 0.5, 0. ])
    """
    sums = np.asarray(sums, dtype=np.float64)
    visits = np.asarray(visits)
    per_visit = np.divide(sums, visits, out=np.zeros_like(sums), where=visits > 0)
    total = per_visit.sum()
    if not np.isfinite(total) or total <= 0:
        return np.zeros_like(per_visit)
    return per_visit / total


# Above this many values the Gini coefficient is estimated from a fixed-seed
# uniform sample of this size (sorting 10^8 values took seconds at epoch end).
GINI_EXACT_MAX = 1 << 20


def gini(p: np.ndarray, max_exact: int = GINI_EXACT_MAX) -> float:
    """Gini coefficient of a non-negative vector (0 = equal, ->1 = concentrated).

    Exact up to `max_exact` values; above, estimated from a uniform sample of
    `max_exact` values drawn with a fixed seed (standard error of order
    1/sqrt(max_exact), about 0.001).
    """
    p = np.asarray(p)
    if p.size > max_exact:  # uniform sample (with replacement: O(max_exact), not O(N))
        p = p[np.random.default_rng(0).integers(0, p.size, size=max_exact)]
    p = np.sort(p.astype(np.float64, copy=False))
    n = p.size
    total = p.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2.0 * np.sum(ranks * p) / (n * total)) - (n + 1.0) / n)


def top_share(p: np.ndarray, fraction: float = 0.01) -> float:
    """Share of the total held by the top `fraction` of samples (at least one)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if p.size == 0 or total <= 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * p.size)))
    top = np.partition(p, p.size - k)[p.size - k:]
    return float(top.sum() / total)


def effective_sample_size(p: np.ndarray) -> float:
    """1 / sum p_i^2 for the normalized importance (N when uniform)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    # np.sum, not np.dot: np.dot wakes the BLAS thread pool, whose idle threads
    # then spin for ~0.1 s and slowed the next epoch's first ~100 steps by up
    # to 20 % of a small model's CPU time (benchmarks/README.md).
    return float(total * total / np.sum(np.square(p)))  # = 1 / sum (p_i / total)^2


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of the normalized importance (ln N when uniform)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    q = p[p > 0] / total
    return float(-np.sum(q * np.log(q)))


def summarize(importance: np.ndarray, visits: np.ndarray) -> dict[str, float]:
    """Summary scalars over the visited samples of one epoch."""
    visited = np.asarray(visits) > 0
    p = np.asarray(importance)[visited].astype(np.float64)  # one conversion for all four
    return {
        "gini": gini(p),
        "top1pct_share": top_share(p, 0.01),
        "effective_sample_size": effective_sample_size(p),
        "entropy": entropy(p),
        "visited_samples": float(visited.sum()),
        "unvisited_samples": float((~visited).sum()),
    }


def top_k_indices(importance: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Indices of the k largest (or smallest) scores, best first; O(N) selection."""
    importance = np.asarray(importance)
    k = int(min(max(k, 0), importance.size))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    key = -importance if largest else importance
    part = np.argpartition(key, k - 1)[:k]
    # Stable order: by score, then by index.
    return part[np.lexsort((part, key[part]))].astype(np.int64)


def top_k_rows(
    importance: np.ndarray, visits: np.ndarray, keys: np.ndarray, k: int, largest: bool = True
) -> list[tuple]:
    """[(key, importance, visits)] of the k most (or least) important visited samples."""
    visited = np.asarray(visits) > 0
    masked = np.where(visited, importance, -np.inf if largest else np.inf)
    idx = top_k_indices(masked, min(k, int(visited.sum())), largest)
    return [(keys[i].item(), float(importance[i]), int(visits[i])) for i in idx]


def aggregate(per_epoch: list[np.ndarray], first: int | None = None) -> np.ndarray:
    """Cross-epoch aggregate: the mean of the per-epoch importances, renormalized.

    Args:
        per_epoch: Per-epoch importance arrays, in epoch order.
        first: Average only the first `first` epochs (None: all of them).
    """
    if first is not None:
        per_epoch = per_epoch[: max(int(first), 1)]
    if not per_epoch:
        return np.zeros(0)
    mean = np.mean(np.stack(per_epoch), axis=0)
    total = mean.sum()
    return mean / total if total > 0 else mean
