"""Combining ranked lists from several retrievers into one ranking.

Both functions take, per retriever, a list of (row, score) pairs, best first, and return {row: fused score}.

RRF (reciprocal rank fusion, Cormack et al. 2009) uses only ranks, so cosine similarities (≈0.7–0.9 for e5) and
BM25 scores (0–30+) need no common scale: score(d) = Σ_r w_r / (rrf_k + rank_r(d)), rank starting at 1.
Weighted fusion min-max normalises each list to [0, 1] first, then adds the weighted scores; a row a retriever
did not return counts 0 for it.
"""
from __future__ import annotations

from collections.abc import Sequence

Ranking = Sequence[tuple[int, float]]


def _check_weights(rankings: Sequence[Ranking], weights: Sequence[float] | None) -> Sequence[float]:
    if weights is None:
        return [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"need one weight per ranking: got {len(weights)} weights for {len(rankings)} rankings")
    if any(w < 0 for w in weights):
        raise ValueError(f"fusion weights must be >= 0, got {list(weights)}")
    return weights


def rrf(rankings: Sequence[Ranking], *, k: int = 60, weights: Sequence[float] | None = None) -> dict[int, float]:
    """Reciprocal rank fusion.

    >>> rrf([[(7, 0.9), (3, 0.8)], [(3, 12.0)]], k=60) == {7: 1/61, 3: 1/62 + 1/61}
    True
    """
    if k <= 0:
        raise ValueError(f"rrf_k must be > 0, got {k}")
    weights = _check_weights(rankings, weights)
    fused: dict[int, float] = {}
    for ranking, w in zip(rankings, weights, strict=False):
        for rank, (row, _score) in enumerate(ranking, start=1):
            fused[row] = fused.get(row, 0.0) + w / (k + rank)
    return fused


def min_max(ranking: Ranking) -> dict[int, float]:
    """Scores scaled to [0, 1] within one list; all equal scores become 1 (each is the best there is)."""
    if not ranking:
        return {}
    scores = [s for _, s in ranking]
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return {row: 1.0 for row, _ in ranking}
    return {row: (s - lo) / (hi - lo) for row, s in ranking}


def weighted(rankings: Sequence[Ranking], weights: Sequence[float]) -> dict[int, float]:
    """Weighted sum of min-max normalised scores.

    >>> weighted([[(1, 0.9), (2, 0.5)], [(2, 8.0), (3, 4.0)]], [0.5, 0.5]) == {1: 0.5, 2: 0.5, 3: 0.0}
    True
    """
    weights = _check_weights(rankings, weights)
    fused: dict[int, float] = {}
    for ranking, w in zip(rankings, weights, strict=False):
        for row, s in min_max(ranking).items():
            fused[row] = fused.get(row, 0.0) + w * s
    return fused


def agreement(a: Ranking, b: Ranking, depth: int = 10) -> float:
    """Share of the top `depth` rows two rankings have in common, in [0, 1] (0 when either is empty).

    >>> agreement([(1, .9), (2, .8)], [(2, 5.0), (3, 4.0)], depth=2)
    0.5
    """
    top_a, top_b = {r for r, _ in a[:depth]}, {r for r, _ in b[:depth]}
    if not top_a or not top_b:
        return 0.0
    return len(top_a & top_b) / min(depth, len(top_a), len(top_b))


def confidence(ranking: Ranking) -> float:
    """How clearly a ranking's first result stands out: the gap between the first and second score, on the list's
    own min-max scale (1 = the second result is as weak as the last, 0 = a tie or a single result)."""
    if len(ranking) < 2:
        return 0.0
    scaled = min_max(ranking)
    return 1.0 - scaled[ranking[1][0]]


def adaptive(dense: Ranking, sparse: Ranking, *, dense_weight: float = 0.5, depth: int = 10) -> dict[int, float]:
    """Weighted fusion whose weights follow the two lists: when they agree, `dense_weight` as set; the less they agree,
    the more weight goes to the list whose best result stands out more clearly (its `confidence`).

    w_dense = agreement · dense_weight + (1 − agreement) · conf_dense / (conf_dense + conf_sparse)

    >>> fused = adaptive([(1, .9), (2, .5), (3, .4)], [(4, 9.0), (5, 8.9), (6, 8.8)])
    >>> max(fused, key=fused.get)        # the lists disagree and dense's first result stands out: dense wins
    1
    """
    a = agreement(dense, sparse, depth)
    cd, cs = confidence(dense), confidence(sparse)
    share = cd / (cd + cs) if cd + cs > 0 else dense_weight
    w = a * dense_weight + (1 - a) * share
    return weighted([dense, sparse], [w, 1 - w])
