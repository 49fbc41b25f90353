"""Layer budgets, the allocation rule: integers r_l ∝ a weight per layer, between ``min_r`` and the
layer's coordinates, summing to the total (water-filling). ``store.budget.split_budget`` measures
the weights (each layer's E‖g_l‖²) in one pilot pass and explains the rules.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

RULES = {"energy": 1.0, "sqrt-energy": 0.5, "uniform": 0.0}


def allocate(weights: dict[str, float], caps: dict[str, int], total: int, min_r: int = 8) -> dict[str, int]:
    """Integers r_l ∝ weights, min_r ≤ r_l ≤ caps[l], Σ r_l = min(total, Σ caps) (water-filling)."""
    names = list(weights)
    cap = np.array([caps[n] for n in names], dtype=np.int64)
    total = int(min(total, cap.sum()))
    floor = np.minimum(cap, min_r)
    if floor.sum() > total:
        raise ConfigError(f"a total budget of {total} cannot give every one of the {len(names)} layers "
                          f"min_r={min_r} coordinates; raise the total or lower min_r")
    w = np.array([max(float(weights[n]), 0.0) for n in names])
    if not (w > 0).any():
        w = np.ones_like(w)
    r = floor.astype(np.float64)
    free = np.ones(len(names), dtype=bool)
    for _ in range(len(names) + 1):        # water-filling: cap the layers that overflow, refill the rest
        left = total - r[~free].sum() - floor[free].sum()
        share = floor[free] + left * w[free] / max(w[free].sum(), 1e-300)
        over = share > cap[free]
        idx = np.flatnonzero(free)
        r[idx] = np.minimum(share, cap[free])
        if not over.any():
            break
        free[idx[over]] = False
    out = np.floor(r).astype(np.int64)
    rest = total - out.sum()
    order = np.argsort(-(r - out) + (out >= cap) * 1e9)       # largest remainders among uncapped layers
    for i in order[:max(0, rest)]:
        out[i] += 1
    return {n: int(v) for n, v in zip(names, out)}
