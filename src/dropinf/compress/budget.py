"""Layer budgets: split a total number of kept coordinates across layers from one pilot pass.

The paper keeps the same r in every layer. A layer whose gradients carry more energy contributes
more to every inner product (and so to the scores), so sampling it more finely removes more
error per byte. ``split_budget`` runs one cheap pilot capture — rotated dropout with
``scale=True``, whose kept entries give unbiased estimates of each layer's mean squared gradient
norm E‖g_l‖² — and allocates r_l ∝ (E‖g_l‖²)^power (power 1: "energy", ½: "sqrt-energy", 0:
"uniform"), at least ``min_r`` and at most the layer's coordinates, the remainder refilled by
water-filling, rounded so that Σ_l r_l = total exactly. The result is a dict {layer: r} to pass
as Dropout's ``r``.
"""

from __future__ import annotations

import itertools
from typing import Iterable

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


def split_budget(model, loss_fn, loader: Iterable, total: int, track=None, rule: str = "energy",
                 rotate: bool = True, pilot_examples: int = 256, pilot_r: int = 512, min_r: int = 8,
                 seed: int = 0, progress: bool = False) -> dict[str, int]:
    """{layer: r} with Σ r = total, from a pilot pass over the first ``pilot_examples`` of ``loader``.

    rule: "energy" (r_l ∝ E‖g_l‖²), "sqrt-energy" or "uniform". rotate: the budget is for
    Dropout(rotate=True) (caps are the rotated coordinates) or plain Dropout (caps d_l)."""
    from ..attribute import Attributor
    from ..capture.functional import batch_size
    from .dropout import Dropout

    if rule not in RULES:
        raise ConfigError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if not isinstance(total, int) or total < 1:
        raise ConfigError(f"total must be a positive int (coordinates per example, all layers), got {total!r}")
    import warnings
    with warnings.catch_warnings():      # pilot_r above a small layer's size just keeps all of it
        warnings.simplefilter("ignore", UserWarning)
        pilot = Attributor(model, loss_fn, compressor=Dropout(r=pilot_r, seed=seed + 7919, rotate=True, scale=True),
                           track=track, progress=progress)
    batches, seen = [], 0
    for batch in itertools.islice(loader, 10_000):
        batches.append(batch)
        seen += batch_size(batch)
        if seen >= pilot_examples:
            break
    feats = pilot.compute_features(batches, desc="pilot pass (layer budgets)")
    energy = {n: float((v.double() ** 2).sum(1).mean()) for n, v in feats.data.items()}
    probe = Attributor(model, loss_fn, compressor=Dropout(r=1, rotate=rotate), track=track, progress=False)
    caps = {n: int(getattr(c, "space", c.dim)) for n, c in probe.compressors.items()}
    weights = {n: energy[n] ** RULES[rule] if energy[n] > 0 else 0.0 for n in energy}
    return allocate(weights, caps, total, min_r)

