"""Mask ensembles inside one fit: ``GaussNewton(members=K)``.

Each layer's r kept coordinates are split into K disjoint random groups (``member_columns``); each
group is a Dropout feature set of its own, with its own H̃_lk = G_lkᵀG_lk/n + λ_lk I and its own
damping λ_lk (the rule on that group's entries). Averaging the K members' scores is exactly one
preconditioner that is block-diagonal within the layer:

    M_l = (1/K) · blockdiag_k (H̃_lk⁻¹)      (rows and columns in the layer's own column order)

so the ensemble is one ``Preconditioner`` served by the one ``Scorer`` — score, top-k, per-layer,
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


def member_block(gram: torch.Tensor, n: int, cols: list[torch.Tensor], damping_dim: int | None, factor: float,
                 fixed: float | None, what: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(M_l (r × r, float64, block-diagonal over ``cols``, scaled 1/K), {member: λ_lk}, member id
    of every column) from the layer's Gram matrix Gᵀ G (r × r). ``damping_dim``: D_k of the rule for
    every member (None: coordinate sampling, D_k = the member's own size)."""
    r, K = gram.shape[0], len(cols)
    m = torch.zeros(r, r, dtype=torch.float64, device=gram.device)
    owner = torch.empty(r, dtype=torch.long)
    lams = {}
    for k, c in enumerate(cols):
        c_dev = c.to(gram.device)
        g = gram.index_select(0, c_dev).index_select(1, c_dev)
        lam = layer_damping(float(g.diagonal().sum()), n, damping_dim or c.numel(), factor, fixed)
        if lam <= 0 and c.numel() > n:
            raise ConfigError(f"{what}: member {k} keeps {c.numel()} coordinates > n={n}; undamped Gauss-Newton "
                              f"is singular there. Use damping > 0, fewer coordinates or more members.")
        h = g / n + lam * torch.eye(c.numel(), dtype=torch.float64, device=gram.device)
        m[c_dev[:, None], c_dev[None, :]] = spd_inverse(h, f"H̃ of member {k} of {what}") / K
        owner[c] = k
        lams[k] = lam
    return m, lams, owner
