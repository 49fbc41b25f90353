"""Metrics on score arrays (thin wrappers over scikit-learn / scipy, imported when called:
``pip install 'dropinf[eval]'``; the core library never needs them)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def _need(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"this metric needs {module.split('.')[0]} ({exc}); install it with "
                          f"pip install 'dropinf[eval]'") from exc


def mislabel_auc(harm: np.ndarray, flipped: np.ndarray) -> float:
    """AUC of ranking train points by `harm` (higher = more suspicious) against the flip mask."""
    harm = np.asarray(harm, dtype=np.float64).reshape(-1)
    if not np.isfinite(harm).all():
        raise ValueError("scores contain NaN/inf; cannot compute AUC")
    return float(_need("sklearn.metrics").roc_auc_score(np.asarray(flipped, dtype=bool), harm))
