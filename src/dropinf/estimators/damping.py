"""Choosing each layer's damping λ_l without retraining.

The paper damps every layer by 0.1 × its mean squared compressed entry (App. D.1). Published work
(LoGra, GraSS) finds the best damping differs by orders of magnitude between coordinate masks and
dense sketches, and a retraining-based search (LDS) costs hundreds of trainings. This picks λ_l
from the features alone, by cross-validated shrinkage: H̃_l + λ_l I is the covariance of a zero-mean
Gaussian model of the layer's per-example gradients; fit its empirical part S on a random 80 % of
the training rows and choose, on a grid of λ = c × (mean squared entry), the λ that maximises the
likelihood of the held-out 20 % (the classical cross-validated ridge/shrinkage estimate of a
covariance). Too little damping overfits S's noise directions (held-out rows fall where S is
near zero); too much ignores the structure. O(n·r·min(n, r)) per layer, from one eigendecomposition.

Returns {layer: λ_l}, for ``GaussNewton(damping=...)``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

GRID = tuple(float(c) for c in np.logspace(-4, 2, 25))


def heldout_nll(train_rows: torch.Tensor, test_rows: torch.Tensor, lams: list[float]) -> np.ndarray:
    """Mean negative Gaussian log-likelihood (up to constants) of test_rows under N(0, S + λI), S
    the second moment of train_rows, for every λ."""
    a = train_rows.double()
    b = test_rows.double()
    n, r = a.shape
    if n <= r:                                   # eigenpairs of S from the n × n Gram
        sig, v = torch.linalg.eigh(a @ a.T / n)
        keep = sig > sig.max() * 1e-12
        sig, v = sig[keep], v[:, keep]
        u = a.T @ v / torch.sqrt(sig * n)
    else:
        sig, u = torch.linalg.eigh(a.T @ a / n)
        sig = sig.clamp_min(0)
    proj2 = ((b @ u) ** 2).mean(0)               # (k,) mean squared projections
    resid = float((b * b).sum(1).mean() - proj2.sum())
    k = sig.numel()
    out = []
    for lam in lams:
        out.append(float(torch.log(sig + lam).sum() + (r - k) * np.log(lam) + (proj2 / (sig + lam)).sum()
                         + max(resid, 0.0) / lam))
    return np.asarray(out)


def choose_damping(features, grid=GRID, holdout: float = 0.2, seed: int = 0, max_rows: int = 20_000) -> dict[str, float]:
    """{layer: λ_l} by held-out likelihood (see the module doc). ``features``: in-memory train
    Features (``attr.train_features``); at most ``max_rows`` rows are used."""
    data = getattr(features, "data", None)
    if not data:
        raise ConfigError("choose_damping needs in-memory train features (attr.train_features)")
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}")
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, rows in data.items():
        n = min(rows.shape[0], max_rows)
        perm = torch.randperm(rows.shape[0], generator=g)[:n]
        n_test = max(1, int(round(holdout * n)))
        if n - n_test < 2:
            raise ConfigError(f"choose_damping needs at least 3 train rows, layer {name!r} has {rows.shape[0]}")
        x = rows[perm].double()
        mean_sq = float((x * x).mean())
        if mean_sq == 0:
            continue                                 # a dead layer: the estimator drops it
        lams = [c * mean_sq for c in grid]
        nll = heldout_nll(x[n_test:], x[:n_test], lams)
        out[name] = lams[int(np.argmin(nll))]
    return out
