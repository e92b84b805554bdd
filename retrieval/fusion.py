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
