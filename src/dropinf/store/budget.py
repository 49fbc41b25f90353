"""Layer budgets from one pilot pass: ``split_budget`` splits a total number of kept coordinates
across layers (see compress.budget for the rule).

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

import dataclasses
import itertools
import warnings
from dataclasses import dataclass
from typing import Iterable, Literal

from ..capture.functional import batch_size
from ..compress.budget import RULES, allocate
from ..compress.dropout import Dropout
from ..errors import ConfigError
from ..options import option
from .featurizer import Featurizer


@dataclass(frozen=True)
class BudgetOptions:
    """How ``split_budget`` splits the total (see the module's docstring)."""

    rule: Literal["energy", "sqrt-energy", "uniform"] = option(
        "energy", "r_l ∝ E‖g_l‖² (energy), its square root, or the same r everywhere (uniform)")
    rotate: bool = option(True, "the budget is for Dropout(rotate=True) (caps: the rotated coordinates) "
                                "rather than plain Dropout (caps: d_l)")
    pilot_examples: int = option(256, "examples in the pilot pass (from the start of the loader)")
    pilot_r: int = option(512, "coordinates per layer the pilot pass keeps to estimate E‖g_l‖²")
    min_r: int = option(8, "the fewest coordinates any layer gets")
    seed: int = option(0, "seed of the pilot pass's random coordinates")


def split_budget(model, loss_fn, loader: Iterable, total: int, track=None, options: BudgetOptions | None = None,
                 progress: bool = False, **kw) -> dict[str, int]:
    """{layer: r} with Σ r = total, from a pilot pass over the first ``pilot_examples`` of ``loader``.
    ``options``: BudgetOptions; keyword arguments replace single fields of it."""
    try:
        o = dataclasses.replace(options or BudgetOptions(), **kw)
    except TypeError as exc:
        raise ConfigError(f"split_budget: {exc}; BudgetOptions has "
                          f"{[f.name for f in dataclasses.fields(BudgetOptions)]}") from None
    rule, rotate, pilot_examples, pilot_r, min_r, seed = (o.rule, o.rotate, o.pilot_examples, o.pilot_r,
                                                          o.min_r, o.seed)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if not isinstance(total, int) or total < 1:
        raise ConfigError(f"total must be a positive int (coordinates per example, all layers), got {total!r}")
    with warnings.catch_warnings():      # pilot_r above a small layer's size just keeps all of it
        warnings.simplefilter("ignore", UserWarning)
        pilot = Featurizer(model, loss_fn, compressor=Dropout(r=pilot_r, seed=seed + 7919, rotate=True, scale=True),
                           track=track, progress=progress)
    batches, seen = [], 0
    for batch in itertools.islice(loader, 10_000):
        batches.append(batch)
        seen += batch_size(batch)
        if seen >= pilot_examples:
            break
    feats = pilot.features(batches, desc="pilot pass (layer budgets)")
    energy = {n: float((v.double() ** 2).sum(1).mean()) for n, v in feats.data.items()}
    # the coordinates each layer can keep: d_l, or the rotated space (a padded power of two) with rotate
    probe = Dropout(r=1, rotate=rotate)
    caps = {l.name: int(getattr(c, "space", c.dim)) for l in pilot.layers for c in [probe.build(l)]}
    weights = {n: energy[n] ** RULES[rule] if energy[n] > 0 else 0.0 for n in energy}
    return allocate(weights, caps, total, min_r)

