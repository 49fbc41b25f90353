"""Metrics on score arrays (thin wrappers over scikit-learn / scipy)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def mislabel_auc(harm: np.ndarray, flipped: np.ndarray) -> float:
    """AUC of ranking train points by `harm` (higher = more suspicious) against the flip mask."""
    harm = np.asarray(harm, dtype=np.float64).reshape(-1)
    if not np.isfinite(harm).all():
        raise ValueError("scores contain NaN/inf; cannot compute AUC")
    return float(roc_auc_score(np.asarray(flipped, dtype=bool), harm))
