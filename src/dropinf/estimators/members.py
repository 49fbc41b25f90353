"""Mask ensembles inside one fit: ``GaussNewton(members=K)``.

Each layer's r kept coordinates are split into K disjoint random groups (``member_columns``); each
group is a Dropout feature set of its own, with its own H̃_lk = G_lkᵀG_lk/n + λ_lk I and its own
damping λ_lk (the rule on that group's entries). Averaging the K members' scores is exactly one
preconditioner that is block-diagonal within the layer:

    M_l = (1/K) · blockdiag_k (H̃_lk⁻¹)      (rows and columns in the layer's own column order)

kept as its K blocks (the preconditioner's members form; the fit accumulates only those blocks
of the Gram matrix, estimators.stats), so the ensemble is one ``Preconditioner`` served by the one ``Scorer`` — score, top-k, per-layer,
self-influence, stores, torchrun, reports — and each member's own scores stay available
(``member_preconditioner``: the spread of a score across members, top-k stability).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import layer_damping, spd_inverse


def member_columns(width: int, members: int, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random partition of range(width) into ``members`` groups of near-equal size (sorted)."""
    if members < 1 or members > width:
        raise ConfigError(f"members must be between 1 and the layer's {width} kept coordinates, got {members}")
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
    return [torch.sort(perm[k::members]).values for k in range(members)]


def layer_member_seed(seed: int, names: list[str], name: str) -> int:
    """The partition seed of one layer: ``seed`` + its position among the layer names in sorted order."""
    return seed + sorted(names).index(name)


def member_owner(width: int, members: int, seed: int = 0) -> torch.Tensor:
    """(width,) the group of every column under ``member_columns``."""
    owner = torch.empty(width, dtype=torch.long)
    for k, c in enumerate(member_columns(width, members, seed)):
        owner[c] = k
    return owner


def member_block(grams: torch.Tensor, n: int, sizes: list[int], damping_dim: int | None, factor: float,
                 fixed: float | None, what: str) -> tuple[torch.Tensor, dict]:
    """(the members' blocks of M_l (K, m, m) float64, zero-padded, each H̃_lk⁻¹ / K; {member: λ_lk})
    from the layer's grouped Gram matrix (K, m, m) (estimators.stats, ``grouped``), group k
    holding ``sizes[k]`` columns. ``damping_dim``: D_k of the rule for every member (None:
    coordinate sampling, D_k = the member's own size)."""
    K = grams.shape[0]
    parts = torch.zeros_like(grams)
    lams = {}
    for k, size in enumerate(sizes):
        g = grams[k, :size, :size]
        lam = layer_damping(float(g.diagonal().sum()), n, damping_dim or size, factor, fixed)
        if lam <= 0 and size > n:
            raise ConfigError(f"{what}: member {k} keeps {size} coordinates > n={n}; undamped Gauss-Newton "
                              f"is singular there. Use damping > 0, fewer coordinates or more members.")
        h = g / n + lam * torch.eye(size, dtype=torch.float64, device=grams.device)
        parts[k, :size, :size] = spd_inverse(h, f"H̃ of member {k} of {what}") / K
        lams[k] = lam
    return parts, lams
