"""Scoring: one blockwise scorer for score, top-k, per-layer and self-influence."""

from __future__ import annotations

import numpy as np

from .blockwise import TopK, topk_merge
from .scorer import ScoreOptions, Scorer


def influence(estimator, train, query, ctx=None, options: ScoreOptions | None = None) -> np.ndarray:
    """(n_query, n_train) scores of query rows against train rows (both Features or stores):
    fit ``estimator`` on ``train`` and score — the whole pipeline after capture in one call."""
    return Scorer(estimator.fit(train, ctx), train, options, progress=False).dense(query)


__all__ = ["TopK", "topk_merge", "ScoreOptions", "Scorer", "influence"]
