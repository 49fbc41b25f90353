"""Hessian-free influence (Pruthi et al. 2020; paper App. B): H̃ replaced by the identity.

I(q, i) = − g̃_qᵀ g̃_i — a plain gradient dot product, on full (Identity) or compressed features.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import FitContext
from .preconditioner import Block, Preconditioner, estimator_signature


@dataclass(frozen=True)
class GradDot:
    name: str = "hessian-free"

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        """M_l = I for every layer; no pass over the rows."""
        return Preconditioner(estimator_signature(self), train.n,
                              [Block((l,), scale=1.0) for l in train.layer_names()])
